"""Fixtures every tier shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


class ProcessEnv:
    """Set or unset environment variables, then install what they say as the process entry would
    (trainer/cli.py `configure_process`): library code reads the installed roots, cache root and tracker
    settings, not the environment, so an in-process test changes both together."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def setenv(self, key: str, value: str) -> None:
        self.monkeypatch.setenv(key, value)
        self.configure()

    def delenv(self, key: str) -> None:
        self.monkeypatch.delenv(key, raising=False)
        self.configure()

    def configure(self) -> None:
        from trainer.cli import configure_process

        configure_process()


@pytest.fixture
def process_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessEnv]:
    from trainer.cache import install_cache_root, installed_cache_root
    from trainer.roots import install_roots, installed_roots
    from trainer.trackers import install_tracker_env, installed_tracker_env

    roots, cache, trackers = installed_roots(), installed_cache_root(), installed_tracker_env()
    yield ProcessEnv(monkeypatch)
    install_roots(roots)
    install_cache_root(cache)
    install_tracker_env(trackers)
