"""Reading a spec: a YAML/JSON file or a mapping, `--set` overrides, and the job model its `kind` names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from trainer.jobspec.base import SpecError, format_validation_error
from trainer.jobspec.distill import DistillJob
from trainer.jobspec.eval import EvalJob
from trainer.jobspec.limits import load_yaml
from trainer.jobspec.prepare import PrepareJob
from trainer.jobspec.rl import RLJob

JobSpec = Annotated[DistillJob | RLJob, Field(discriminator="kind")]


def _coerce(value: str) -> Any:
    """`--set` values are YAML scalars or lists: 20, 0.5, 1e-4, true, null, [999, 499]."""
    return load_yaml(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw spec dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {p} is not a section")
            node = child
        node[parts[-1]] = _coerce(value)
    return raw


def parse_spec(raw: dict[str, Any]) -> Any:
    """A DistillJob, RLJob, EvalJob or PrepareJob, by `kind` (default distill)."""
    if not isinstance(raw, dict):
        raise SpecError("<spec>: the spec must be a mapping")
    raw = dict(raw)
    raw.setdefault("kind", "distill")
    models: dict[Any, type[BaseModel]] = {"distill": DistillJob, "rl": RLJob, "eval": EvalJob,
                                          "prepare": PrepareJob}
    if not isinstance(raw["kind"], str) or raw["kind"] not in models:  # an object is unhashable: a 422, not a 500
        raise SpecError(f"kind: unknown job kind {raw['kind']!r} (expected 'distill', 'rl', 'eval' or 'prepare')")
    try:
        return models[raw["kind"]].model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def total_steps(spec: Any) -> int:
    """The progress total of a validated job: training steps, or scored checkpoints for an eval job."""
    return spec.total_steps if spec.kind in ("eval", "prepare") else spec.train.max_steps


def num_processes(spec: Any) -> int:
    return 1 if spec.kind in ("eval", "prepare") else spec.train.num_processes


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid YAML/JSON: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{path}: <spec>: the spec must be a mapping, got {type(raw).__name__}")
    return parse_spec(apply_overrides(raw or {}, overrides or []))
