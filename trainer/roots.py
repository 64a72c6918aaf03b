""""Path under root": the one check the API (at submit) and the trainer (where it opens a file) share.

The API checks a spec's paths at submit (api/spec_paths.py, api/routes/generate.py), but a file, a symlink
or a folder on the way can be swapped between submit and open, and a big manifest is only checked here.
So the trainer checks each path again, after realpath, where it opens it (`check_opened`; `opened_model`
for fields that may also be a builtin or a hub id, which name no local file). Both sides call `under_root`;
this module imports nothing heavy (no torch, nothing of api/), so the API can import it.

The worker hands the trainer its roots through the environment it spawns it with (api/runner.py):
FLASHDMD_ALLOWED_DATA_ROOTS, FLASHDMD_ALLOWED_MODEL_ROOTS and FLASHDMD_RUN_ROOT, never through the spec, which
must not be able to widen its own roots. The process entry (trainer/cli.py `configure_process`) parses them
once (`parse_roots`) and installs them here (`install_roots`); this module itself reads no environment.
Unset (a trainer run by hand with `flashdmd train`) means no check: the person at the shell can read the
files anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.errors import InputError
from trainer.installed import Installed

ENV = "FLASHDMD_ALLOWED_DATA_ROOTS"
MODEL_ENV = "FLASHDMD_ALLOWED_MODEL_ROOTS"
RUN_ROOT_ENV = "FLASHDMD_RUN_ROOT"  # <storage_root>/jobs: a `kind: prepare` job's cache, a stage-1 checkpoint
OUTSIDE = "is not under the allowed data roots"  # the same words whether or not the file exists


def under_root(real: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> bool:
    """Is `real` (already realpath'd, as the roots are) one of `roots` or inside one? Compared by whole
    components: /data-other is not under /data."""
    path = os.fspath(real)
    for root in roots:
        base = os.fspath(root)
        if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


@dataclass(frozen=True)
class Roots:
    """The roots a process checks opened paths against; None: that kind is unchecked (a run by hand)."""

    data: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    run_root: str | None = None  # <storage_root>/jobs: a `kind: prepare` job's cache, a stage-1 checkpoint


def _parse(raw: str | None) -> tuple[str, ...] | None:
    """Realpaths of a JSON list, or a comma/os.pathsep separated list (as api/settings.py reads them)."""
    if raw is None:
        return None
    text = raw.strip()
    items = json.loads(text) if text.startswith("[") else text.replace(os.pathsep, ",").split(",")
    return tuple(os.path.realpath(os.path.expanduser(str(p).strip())) for p in items if str(p).strip())


def parse_roots(env: Mapping[str, str]) -> Roots:
    """The roots the worker spawned this process with (api/runner.py roots_env), from `env`."""
    run_root = env.get(RUN_ROOT_ENV)
    return Roots(data=_parse(env.get(ENV)), model=_parse(env.get(MODEL_ENV)),
                 run_root=os.path.realpath(run_root) if run_root else None)


_installed: Installed[Roots] = Installed(Roots())
install_roots = _installed.install  # the roots every later check uses; returns the previous ones
installed_roots = _installed.get


def _named_run(spelled: str, run_root: str) -> str | None:
    """The run directory <run_root>/<job> that a spec value names as spelled (no realpath), or None.

    The service stores each path as the realpath it checked at submit, and accepts one under the run root only
    in a run directory of the caller's own jobs (api/spec_paths.py), so that directory is the caller's."""
    parts = Path(spelled).parts
    if not os.path.isabs(spelled) or ".." in parts or not under_root(spelled, [run_root]) or spelled == run_root:
        return None
    return os.path.join(run_root, Path(os.path.relpath(spelled, run_root)).parts[0])


def check_opened(path: str | os.PathLike[str], field: str, *, kind: Literal["data", "model"] = "data",
                 runs_ok: bool = False) -> Path:
    """The realpath to open, after checking it lies under the allowed roots of `kind` (or, with `runs_ok`,
    in the run directory the value names); InputError naming `field` otherwise. Open what this returns, not
    the spelling given: a link swapped in after this check is then not followed.

    Inside the run root only the run directory the value itself names passes, whatever roots also cover it
    (as at submit): a folder swapped for a link into another owner's run directory is refused."""
    spelled = os.path.expanduser(os.fspath(path))
    real = os.path.realpath(spelled)
    installed = installed_roots()
    roots = installed.data if kind == "data" else installed.model
    if roots is None:
        return Path(real)
    rr = installed.run_root
    if rr and under_root(real, [rr]):
        named = _named_run(spelled, rr)
        ok = named is not None and under_root(real, [named]) and (runs_ok or under_root(real, roots))
    else:
        ok = under_root(real, roots)
    if not ok:
        raise InputError(f"{field}: {str(path)!r} {OUTSIDE if kind == 'data' else 'is not under the allowed model roots'}")
    return Path(real)


BUILTIN = ("tiny:", "toy:")  # built-in models (trainer/models.py resolve_teacher): no file a spec can name


def opened_model(value: str, field: str, *, runs_ok: bool = False) -> str:
    """What a loader opens for a spec field naming model weights (model.teacher, rl.reward.path,
    distill.discriminator.checkpoint, eval.scorers[].path): a builtin or a hub reference unchanged, as at
    submit (api/spec_paths.py), and so is a name that is no local path (the loader asks the hub for it); a
    local path, as its realpath once `check_opened` finds it under the model roots. A relative hub-shaped
    value that exists is the job's own file (the trainer runs in its run directory), as submit judges it."""
    # Imported here: the process entry imports this module, and the spec package is heavier.
    from trainer.jobspec.limits import is_hub_ref

    expanded = os.path.expanduser(value)
    local = value.startswith(("/", "./", "../", "~")) or os.path.exists(value)  # as the loaders decide it
    if value.startswith(BUILTIN) or not local or (not os.path.isabs(expanded) and is_hub_ref(value)):
        return value
    return str(check_opened(expanded, field, kind="model", runs_ok=runs_ok))


def check_data_file(path: Path, where: str) -> None:
    """Raise InputError naming `where` (e.g. "data.manifest: m.jsonl:3") when `path` leads outside the roots."""
    roots = installed_roots().data
    if roots is None:
        return
    if not under_root(os.path.realpath(path), roots):
        raise InputError(f"{where}: image {str(path)!r} {OUTSIDE}")
