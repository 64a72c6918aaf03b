"""Model and data locations in a spec: hub ids, `tiny:`/builtin ids, or paths under the allowed roots.

A path is resolved with realpath (so `..` and symlinks cannot escape a root) and the
resolved path is what the job stores, so the trainer opens exactly what was checked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.errors import APIError
from api.settings import Settings
from trainer.jobspec.limits import is_hub_ref
from trainer.roots import under_root

# org/name: one slash, no leading dot, slash or tilde, no "..". A bare name is not accepted as a hub id,
# so "models" cannot be mistaken for a relative folder (the trainer runs in its run directory anyway).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class _Field:
    path: tuple[str, ...]
    roots: str  # Settings attribute
    hub_ok: bool = False
    tiny_ok: bool = False
    # Weights fetched through trainer/hub.py: org/name[/path/in/repo][@revision]. Such a value is not absolute,
    # so it can never name a local file here; the trainer runs in the job's own run directory, so a relative
    # value that happens to exist there is that job's own file, not another owner's.
    hub_ref_ok: bool = False
    own_runs: bool = False  # also the run directories of the caller's own jobs (a stage-1 checkpoint)


FIELDS = (
    _Field(("model", "teacher"), "allowed_model_roots", hub_ok=True, tiny_ok=True),
    _Field(("distill", "discriminator", "checkpoint"), "allowed_model_roots", hub_ref_ok=True),
    _Field(("data", "images"), "allowed_data_roots"),
    _Field(("data", "manifest"), "allowed_data_roots"),
    _Field(("data", "prompts"), "allowed_data_roots"),
    _Field(("data", "cache"), "allowed_data_roots", own_runs=True),  # or a `kind: prepare` job's RUN_DIR/cache
    _Field(("prepare", "source"), "allowed_data_roots"),
    _Field(("rl", "init_from"), "allowed_model_roots", own_runs=True),
    _Field(("rl", "reward", "path"), "allowed_model_roots", hub_ref_ok=True),
    _Field(("eval", "checkpoint"), "allowed_model_roots", own_runs=True),
    _Field(("eval", "prompts"), "allowed_data_roots"),
    _Field(("eval", "scorers", "*", "path"), "allowed_model_roots", hub_ref_ok=True),
    _Field(("eval", "scorers", "*", "reference"), "allowed_data_roots"),
    _Field(("train", "validation", "file"), "allowed_data_roots"),
)


def _locations(spec: dict[str, Any], path: tuple[str, ...]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """(parent mapping, concrete path) for each place `path` names; "*" walks every item of a list."""
    found: list[tuple[Any, tuple[str, ...]]] = [(spec, ())]
    for key in path[:-1]:
        step: list[tuple[Any, tuple[str, ...]]] = []
        for node, where in found:
            if key == "*" and isinstance(node, list):
                step += [(item, (*where, str(i))) for i, item in enumerate(node)]
            elif isinstance(node, dict) and key in node:
                step.append((node[key], (*where, key)))
        found = step
    return [(node, (*where, path[-1])) for node, where in found if isinstance(node, dict)]


under_roots = under_root  # the one "path under root" check, shared with the trainer (trainer/roots.py)


def resolve_location(value: str, *, roots: list[Path], hub_ok: bool, tiny_ok: bool,
                     hub_ref_ok: bool = False) -> str | None:
    """The value to store, or None when it is not allowed."""
    if tiny_ok and value.startswith(("tiny:", "toy:")):  # built-in models (tiny random, shipped digits)
        return value
    if hub_ok and HUB_ID.match(value) and ".." not in value:
        return value
    if hub_ref_ok and is_hub_ref(value):
        return value
    expanded = os.path.expanduser(value)
    if "\x00" in expanded or not os.path.isabs(expanded):
        return None
    real = os.path.realpath(expanded)
    return real if under_roots(real, roots) else None


def _own_run(path: str, *, settings: Settings, owns_job: Callable[[str], bool]) -> bool:
    """Under <storage_root>/jobs/<id>/ of a job the caller owns (another owner's jobs stay invisible)."""
    run_root = os.path.realpath(settings.run_root)
    if not under_roots(path, [Path(run_root)]) or path == run_root:
        return False
    return owns_job(Path(os.path.relpath(path, run_root)).parts[0])


def _in_run_root(path: str, settings: Settings) -> bool:
    return under_roots(path, [Path(os.path.realpath(settings.run_root))])


# A manifest or image folder is checked entry by entry at submit only up to these sizes (reading more would
# make POST /jobs slow); the worker checks every entry again when it loads them (trainer/roots.py).
DATA_SOURCES = (("data", "manifest"), ("data", "images"))
MANIFEST_CHECK_BYTES = 8 * 2**20
FOLDER_CHECK_ENTRIES = 20_000
OUTSIDE = "is not under the allowed data roots"  # one message, whether or not the target exists


def _data_contents(kind: str, real: str, roots: list[Path]) -> str | None:
    """The first entry of a manifest or image folder that escapes the data roots (after realpath), or None.

    Only the manifest file itself passed resolve_location; its lines (and a folder's symlinks) can
    point anywhere, e.g. at another user's samples, so each is resolved and judged the same way.
    """
    if kind == "manifest":
        try:
            if os.path.getsize(real) > MANIFEST_CHECK_BYTES:
                return None
            with open(real, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return None  # missing or unreadable inside a root the caller may use: the trainer says which
        base = os.path.dirname(real)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                image = json.loads(line)["image"]
            except (ValueError, KeyError, TypeError):
                return f"line {n}: expected a JSON object with an \"image\" path and a \"caption\""
            if not isinstance(image, str) or "\x00" in image:
                return f"line {n}: \"image\" must be a path"
            target = os.path.realpath(os.path.join(base, image))  # as trainer/data.py joins it
            if not under_roots(target, roots):
                return f"line {n}: image {image!r} {OUTSIDE}"
        return None
    seen = 0
    for top, dirs, files in os.walk(real):  # does not descend into linked folders; they are judged as links
        for entry in (*dirs, *files):
            seen += 1
            if seen > FOLDER_CHECK_ENTRIES:
                return None
            path = os.path.join(top, entry)
            if os.path.islink(path) and not under_roots(os.path.realpath(path), roots):
                return f"{os.path.relpath(path, real)!r} is a link that {OUTSIDE}"
    return None


def check_spec_paths(
    spec: dict[str, Any], *, settings: Settings, owns_job: Callable[[str], bool] = lambda _id: False
) -> dict[str, Any]:
    """Check (and normalise, in place) every location in a validated spec dict; 422 names the field."""
    bad: list[tuple[str, str]] = []
    for field, parent, where in [(f, p, w) for f in FIELDS for p, w in _locations(spec, f.path)]:
        value = parent.get(field.path[-1])
        if not isinstance(value, str):
            continue
        roots: list[Path] = getattr(settings, field.roots)
        resolved = resolve_location(value, roots=roots, hub_ok=field.hub_ok, tiny_ok=field.tiny_ok,
                                    hub_ref_ok=field.hub_ref_ok)
        if resolved is None and field.own_runs and os.path.isabs(value):
            real = os.path.realpath(value)
            resolved = real if _own_run(real, settings=settings, owns_job=owns_job) else None
        if resolved is not None and os.path.isabs(resolved) and _in_run_root(resolved, settings):
            # Even when a configured root covers the storage root, run directories stay their owners' own.
            resolved = resolved if _own_run(resolved, settings=settings, owns_job=owns_job) else None
        name = "spec." + ".".join(where)
        if resolved is not None and field.path in DATA_SOURCES:
            problem = _data_contents(field.path[-1], resolved, roots)
            if problem:
                bad.append((name, problem))
                continue
        if resolved is None:
            allowed = ", ".join(str(r) for r in roots) or "none configured"
            what = "a hub id (org/name) or " if field.hub_ok else (
                "a hub id (org/name[/file][@revision]) or " if field.hub_ref_ok else "")
            also = " or in one of your own jobs' run directories" if field.own_runs else ""
            bad.append((name, f"{value!r} must be {what}an absolute path under the allowed roots ({allowed}){also}"))
        else:
            parent[field.path[-1]] = resolved
    if isinstance(spec.get("memory"), dict) and spec["memory"].get("cache_dir") is not None:
        # A path the trainer *writes*: a shared folder would let one user plant embeddings another user's run
        # then trusts. Over the API the cache always lives in the job's own run directory.
        bad.append(("spec.memory.cache_dir", "is set by the service (the job's run directory); leave it null"))
    if isinstance(spec.get("prepare"), dict) and spec["prepare"].get("output") is not None:
        # Written, then trusted by training runs: as memory.cache_dir, it lives in the job's run directory.
        bad.append(("spec.prepare.output", "is set by the service (the job's RUN_DIR/cache); leave it null"))
    if bad:
        raise APIError(
            "path_not_allowed", "; ".join(f"{n}: {m}" for n, m in bad), fields=[n for n, _ in bad]
        )
    return spec
