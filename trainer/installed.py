"""One process-wide value that the process entry installs once (trainer/cli.py `configure_process`) and library
code reads: the allowed roots (trainer/roots.py), the cache root (trainer/cache.py) and the tracker settings
(trainer/trackers.py). Imports nothing: the API and the CLI load it without torch."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Installed(Generic[T]):
    def __init__(self, default: T) -> None:
        self._value = default

    def install(self, value: T) -> T:
        """Make `value` this process's; returns the previous one (to restore it)."""
        previous, self._value = self._value, value
        return previous

    def get(self) -> T:
        return self._value
