"""The fault tier: the real Postgres and Redis (as the service tier), broken on purpose.

Nothing here touches the shared servers' state beyond a fresh database and tagged Redis keys: a test that
restarts a broker starts its own throwaway redis-server on a free port (faultkit.RedisServer), and an
unresponsive database is a local listener that accepts and never answers (faultkit.SilentServer).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # servicekit, appkit

import redis  # noqa: E402
from servicekit import REDIS_URL, SESSION_TAG, fresh_pg_database  # noqa: E402

from api import migrate  # noqa: E402


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"*{SESSION_TAG}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    out = {name: base / name for name in ("models", "data", "outside", "storage", "home")}
    for path in out.values():
        path.mkdir()
    return out
