"""Helpers for the service tier (imported by its conftest and tests; a unique module name on purpose)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import make_url

from api import migrate
from api.models import ACTIVE, WAITING
from api.settings import Settings

PG_ADMIN_URL = os.environ.get("FLASHDMD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FLASHDMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
# Every Redis key this test session creates carries this tag (queue names, kombu's bindings), so that the
# session can clean up after itself without flushing the keys of another session running at the same time.
SESSION_TAG = f"t{secrets.token_hex(4)}"


def queue_name(purpose: str) -> str:
    return f"{purpose}-{SESSION_TAG}-{secrets.token_hex(2)}"

TINY_SPEC: dict[str, Any] = {
    "kind": "distill",
    "model": {"teacher": "tiny:sdxl"},
    "data": {"builtin": "digits"},
    "train": {"max_steps": 6, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 2, "sample_every": 3},
    "distill": {"discriminator": {"backbone": "tiny"}},
}


def tiny_spec(**train: Any) -> dict[str, Any]:
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_SPEC.items()}
    spec["train"].update(train)
    return spec


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty Postgres database; yields its SQLAlchemy URL and drops it afterwards."""
    name = f"flashdmd_test_{secrets.token_hex(4)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(database_url: str, roots: dict[str, Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": roots["home"],
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "storage_root": roots["storage"],
        "allowed_model_roots": [roots["models"]],
        "allowed_data_roots": [roots["data"]],
        # No worker consumes this queue: jobs created by the API tests stay queued.
        "queue": queue_name("api-tests"),
        # A pool that counts with no live worker (api/workers.py), so that jobs are accepted and routed
        # to its queue, `<queue>-cpu1` (pool_queue), while no worker runs.
        "pools": ["cpu1"],
        "reaper_interval_seconds": 0,  # tests call reap_once themselves, or start a Reaper
        "heartbeat_seconds": 1,
        "stale_after_seconds": 3,
        "ingest_poll_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process (worker, CLI) build the same Settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDMD_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        env[f"FLASHDMD_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """A real `flashdmd worker` (python -m api worker) in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "api", "worker"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if b" ready." in self.log_path.read_bytes()[start:]:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool child), as a crashed machine would."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the main process (a warm shutdown, as `docker stop` sends); SIGKILL after `timeout`."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout)
        self.kill()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def burst(post: Callable[..., Any], calls: list[tuple[dict[str, str], dict[str, Any]]],
          path: str = "/generate") -> list[Any]:
    """POST (headers, body) pairs all released at the same moment (a barrier); responses in call order."""
    out: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def one(i: int) -> None:
        barrier.wait()
        out[i] = post(path, headers=calls[i][0], json=calls[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# The session fixtures the service and fault tiers share (each conftest imports them by name).
@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    # Only this session's keys: other test sessions may share the database number.
    for key in client.scan_iter(match=f"*{SESSION_TAG}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(autouse=True)
def no_jobs_left_waiting(database_url: str) -> Iterator[None]:
    """After each test, end every job it left unfinished in the shared database.

    A worker that starts re-sends every waiting job its pool can run (api/reaper.py resend_waiting), and in one
    shared test database that is every job an earlier test queued with no worker: a later test's worker would
    train them all, one after another, before its own job (which made one test take many minutes in CI).
    """
    yield
    plain = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET status = 'cancelled' WHERE status = ANY(%s)", (list(WAITING + ACTIVE),))


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    out = {name: base / name for name in ("models", "data", "outside", "storage", "home")}
    for path in out.values():
        path.mkdir()
    return out
