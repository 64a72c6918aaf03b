"""Helpers for the hardening tests: the same API on Postgres and on SQLite, and a tiny checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from servicekit import TINY_SPEC, make_settings

from api import migrate
from api.auth import create_token
from api.ingest import RunIngestor
from api.main import create_app
from api.settings import Settings

BACKENDS = ("postgres", "sqlite")


@dataclass
class Api:
    backend: str
    client: TestClient
    settings: Settings

    def token(self) -> dict[str, str]:
        """Authorization headers of a brand-new token (a new owner)."""
        with self.client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            _, token = create_token(session=session, name="test", prefix=self.settings.token_prefix)
        return {"Authorization": f"Bearer {token}"}

    def job_with_checkpoint(self, owner: dict[str, str], teacher: Path) -> str:
        """A queued job whose run directory holds a tiny SDXL checkpoint, ingested as the worker would."""
        from inference.testing import make_checkpoint
        from trainer.sink import JsonlSink

        res = self.client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner)
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        run_dir = self.settings.run_dir(job_id)
        ckpt = make_checkpoint(run_dir, "sdxl", teacher)
        sink = JsonlSink(run_dir)
        sink.save_checkpoint(7, ckpt, {"generator": "unet"})
        sink.close()
        RunIngestor(sessions=self.client.app.state.sessionmaker, job_id=job_id, run_dir=run_dir).drain()  # type: ignore[attr-defined]
        return job_id


def sqlite_url(folder: Path) -> str:
    url = f"sqlite:///{folder / 'flashdmd.db'}"
    migrate.upgrade(url)
    return url


@contextmanager
def api_on(backend: str, *, pg_url: str, roots: dict[str, Path], tmp: Path, **overrides: Any) -> Iterator[Api]:
    """The app on the session's Postgres database or on a fresh migrated SQLite file."""
    url = pg_url if backend == "postgres" else sqlite_url(tmp)
    settings = make_settings(url, roots, **overrides)
    with TestClient(create_app(settings)) as client:
        yield Api(backend, client, settings)


def same_but(a: dict[str, Any], b: dict[str, Any], swap: Callable[[str], str]) -> bool:
    """a == b once `swap` is applied to b's error message (e.g. to replace one file name by another)."""
    eb = dict(b["error"], message=swap(b["error"]["message"]))
    return a["error"] == eb
