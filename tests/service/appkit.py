"""One app per database dialect, for the issue-11 tests that must hold on Postgres and on SQLite alike.

Postgres is the session's database (conftest `database_url`); SQLite is a fresh, migrated file with the
embedded filesystem broker, as `flashdmd up` runs it. No worker consumes either queue: jobs stay queued.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from servicekit import make_settings
from sqlalchemy.orm import Session, sessionmaker

from api import migrate
from api.auth import create_token
from api.main import create_app
from api.settings import Settings

DIALECTS = ("postgres", "sqlite")


@dataclass
class App:
    dialect: str
    client: TestClient
    sessions: sessionmaker[Session]
    settings: Settings

    def token(self, name: str = "test") -> dict[str, str]:
        """Authorization headers of a brand-new token (a new owner)."""
        with self.sessions() as session:
            _, token = create_token(session=session, name=name, prefix=self.settings.token_prefix)
        return {"Authorization": f"Bearer {token}"}

    def post_json(self, path: str, body: Any, headers: dict[str, str]) -> Any:
        """POST a body serialised by us: httpx refuses NaN/Infinity and lone surrogates, which clients can send."""
        return self.client.post(path, content=json.dumps(body).encode(),
                                headers={**headers, "Content-Type": "application/json"})


@contextlib.contextmanager
def dialect_app(dialect: str, *, database_url: str, roots: dict[str, Path], tmp: Path, **overrides: Any) -> Iterator[App]:
    if dialect == "sqlite":
        url = f"sqlite:///{tmp / 'flashdmd.db'}"
        migrate.upgrade(url)
        settings = make_settings(url, roots, data_dir=tmp, broker_url="filesystem://", **overrides)
    else:
        settings = make_settings(database_url, roots, **overrides)
    with TestClient(create_app(settings)) as client:
        yield App(dialect, client, client.app.state.sessionmaker, settings)  # type: ignore[attr-defined]
