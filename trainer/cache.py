"""Where flashdmd keeps what it builds once and reuses: tiny test pipelines, the digits teacher's references.

The root is `$FLASHDMD_CACHE` (default `~/.cache/flashdmd`). The process entry (trainer/cli.py
`configure_process`) reads that variable once and installs it here, so library code asks `flashdmd_cache()`
and never reads the environment itself. Imports nothing heavy: the API and the plan tool use it too.
"""

from __future__ import annotations

from pathlib import Path

CACHE_ENV = "FLASHDMD_CACHE"

_root: Path | None = None


def install_cache_root(root: str | Path | None) -> Path | None:
    """Make `root` (None: the default) the cache root of this process; returns the previous one."""
    global _root
    previous, _root = _root, (Path(root) if root else None)
    return previous


def installed_cache_root() -> Path | None:
    return _root


def flashdmd_cache(override: str | Path | None = None) -> Path:
    """`override` if given, else the installed root, else `~/.cache/flashdmd`."""
    if override is not None:
        return Path(override)
    return _root if _root is not None else Path.home() / ".cache" / "flashdmd"
