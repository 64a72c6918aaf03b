"""Where flashdmd keeps what it builds once and reuses: tiny test pipelines, the digits teacher's references.

The root is `$FLASHDMD_CACHE` (default `~/.cache/flashdmd`). The process entry (trainer/cli.py
`configure_process`) reads that variable once and installs it here, so library code asks `flashdmd_cache()`
and never reads the environment itself. Imports nothing heavy: the API and the plan tool use it too.
"""

from __future__ import annotations

from pathlib import Path

from trainer.installed import Installed

CACHE_ENV = "FLASHDMD_CACHE"

_root: Installed[Path | None] = Installed(None)
installed_cache_root = _root.get


def install_cache_root(root: str | Path | None) -> Path | None:
    """Make `root` (None: the default) the cache root of this process; returns the previous one."""
    return _root.install(Path(root) if root else None)


def flashdmd_cache(override: str | Path | None = None) -> Path:
    """`override` if given, else the installed root, else `~/.cache/flashdmd`."""
    if override is not None:
        return Path(override)
    root = _root.get()
    return root if root is not None else Path.home() / ".cache" / "flashdmd"
