"""The allowed data roots, checked again where the trainer opens each training image.

The API checks a spec's data paths at submit (api/spec_paths.py), but a manifest's
lines and an image folder's symlinks can change between submit and load, and a big
manifest is only checked here. The worker hands its `FLASHDMD_ALLOWED_DATA_ROOTS` to
the trainer through the environment it spawns it with; this module is the one place
in trainer/ that reads it (library modules otherwise never read env), because the
spec must not be able to widen its own roots. Unset (a trainer run by hand with
`flashdmd train`) means no check: the person at the shell can read the files anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.errors import InputError

ENV = "FLASHDMD_ALLOWED_DATA_ROOTS"
OUTSIDE = "is not under the allowed data roots"  # the same words whether or not the file exists


def allowed_data_roots() -> list[str] | None:
    """Realpaths of the roots (JSON list, or comma/os.pathsep separated, as api/settings.py reads them)."""
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    text = raw.strip()
    items = json.loads(text) if text.startswith("[") else text.replace(os.pathsep, ",").split(",")
    return [os.path.realpath(os.path.expanduser(str(p).strip())) for p in items if str(p).strip()]


def check_data_file(path: Path, where: str) -> None:
    """Raise InputError naming `where` (e.g. "data.manifest: m.jsonl:3") when `path` leads outside the roots."""
    roots = allowed_data_roots()
    if roots is None:
        return
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise InputError(f"{where}: image {str(path)!r} {OUTSIDE}")
