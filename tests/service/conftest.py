"""Service tier: the real Postgres and Redis, TestClient for HTTP, and real worker processes.

Each test session gets a fresh Postgres database (dropped at the end) and works in a
dedicated Redis database number (13) under keys tagged with the session, which it deletes
at the end: sessions running at the same time do not flush each other's queues. Servers
default to the local ones; override with FLASHDMD_TEST_PG_URL and FLASHDMD_TEST_REDIS_URL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import servicekit
from fastapi.testclient import TestClient
from servicekit import make_settings

from api import migrate
from api.auth import create_token
from api.db import make_engine, make_sessionmaker
from api.main import create_app
from api.settings import Settings

# The session fixtures the fault tier shares (servicekit): a fresh database, tagged Redis keys, the roots.
database_url = servicekit.database_url
redis_client = servicekit.redis_client
roots = servicekit.roots
no_jobs_left_waiting = servicekit.no_jobs_left_waiting  # autouse


@pytest.fixture(scope="session")
def settings(database_url: str, roots: dict[str, Path]) -> Settings:
    return make_settings(database_url, roots)


@pytest.fixture(scope="session")
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def sessions(client: TestClient) -> Any:
    return client.app.state.sessionmaker  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def new_token(sessions: Any, settings: Settings) -> Callable[[], dict[str, str]]:
    """Authorization headers for a brand-new token (a new owner)."""

    def make() -> dict[str, str]:
        with sessions() as session:
            _, token = create_token(session=session, name="test", prefix=settings.token_prefix)
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def auth(new_token: Callable[[], dict[str, str]]) -> dict[str, str]:
    return new_token()


@pytest.fixture(scope="session")
def sqlite_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A migrated SQLite database, for the embedded mode's dialect."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'flashdmd.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()
