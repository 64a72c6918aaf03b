"""POST /specs/parse: a YAML spec as the JSON that POST /jobs takes (the dashboard's spec editor, curl users).

YAML is read here, not in the browser: the page ships no YAML library, and the server already reads YAML
the way `flashdmd train` does (trainer.jobspec.limits.load_yaml, so `1e-4` is a number in both). The
result is only a translation; POST /jobs validates it as for any JSON spec. The translation is strict:
one document, a mapping, string keys, no anchors or aliases (a few lines of aliases can expand to
gigabytes of JSON), and only values JSON can carry; every refusal names the field. The edge's body limit
applies as to any request.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentToken
from api.errors import APIError
from api.routes.jobs import errors
from trainer.jobspec.limits import load_yaml

router = APIRouter(prefix="/specs", tags=["jobs"], responses=errors)  # type: ignore[arg-type]
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MAX_DEPTH = 32  # deeper than any spec; stops a pathological nesting before the walk below


class ParsedSpec(BaseModel):
    spec: dict[str, Any]


def _refuse(field: str, message: str) -> APIError:
    return APIError("invalid_request", f"{field}: {message}", fields=[field])


def _check(value: Any, path: str, depth: int = 0) -> None:
    """Only what JSON carries, with string keys; the first offender is named by its dotted path."""
    if depth > MAX_DEPTH:
        raise _refuse(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _refuse(f"{path}.{key}", f"keys must be strings, got {type(key).__name__} {key!r}")
            _check(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{path}.{i}", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _refuse(path, f"{value} is not a JSON number")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise _refuse(path, f"a {type(value).__name__} is not a JSON value; quote it if it is meant as text")


def parse_yaml_spec(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _refuse("spec", f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        # Events only (no objects built yet): an alias is refused before anything could expand it, and deep
        # nesting before PyYAML's recursive composer could overflow the stack on it.
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _refuse("spec", f"YAML anchors and aliases are not accepted (line {line})")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _refuse("spec", f"nested deeper than {MAX_DEPTH} levels (line {line})")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        spec = load_yaml(text)  # several documents raise a ComposerError (below)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = ", ".join(filter(None, [err.context, err.problem])) or str(err)
        raise _refuse("spec", f"not valid YAML{where}: {why}") from None
    except yaml.YAMLError as err:
        raise _refuse("spec", f"not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise _refuse("spec", f"the spec must be a mapping, got {type(spec).__name__}")
    _check(spec, "spec")
    return spec


@router.post("/parse", response_model=ParsedSpec,
             openapi_extra={"requestBody": {"required": True, "content": {
                 t: {"schema": {"type": "string"}} for t in YAML_TYPES}}})
async def parse_spec_yaml(request: Request, _token: CurrentToken) -> ParsedSpec:
    """Translate a YAML spec (`Content-Type: application/yaml`) into the JSON object POST /jobs takes as `spec`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in YAML_TYPES:
        raise APIError("unsupported_media_type", f"Content-Type: send the spec as {YAML_TYPES[0]}, not "
                       f"{media or 'nothing'}", 415, fields=["Content-Type"])
    body = await request.body()  # bounded by the edge's max_body_bytes (413 past it)
    return ParsedSpec(spec=await run_in_threadpool(parse_yaml_spec, body))
