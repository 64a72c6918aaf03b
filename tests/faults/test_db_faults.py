"""A locked database and one that never answers: 503 + Retry-After within the bound, on Postgres and SQLite.

The finding: with a table lock held for 30 s every authenticated request hung about 29 s and /readyz stayed
200; against a database that accepted connections and never answered, /readyz and GET /jobs had not
answered after 70 s. Each case below asserts the 503 arrives before GENEROUS (20 s, far above the 4 s
bound, so a busy CI machine does not fail it), then that the service recovers when the fault ends.
"""

from __future__ import annotations

import sqlite3
import threading

import psycopg
import pytest
from appkit import dialect_app
from fastapi.testclient import TestClient
from faultkit import GENEROUS, SilentServer, timed
from servicekit import TINY_SPEC, make_settings
from sqlalchemy import make_url

from api.main import create_app

pytestmark = [pytest.mark.service]


def _assert_503(response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body.get("error", {}).get("code") == "database_unavailable" or body.get("status") == "unavailable", body
    assert int(response.headers["retry-after"]) >= 1
    assert elapsed < GENEROUS, f"answered after {elapsed:.1f} s"
    print(f"[faults] {response.request.method} {response.request.url.path}: {response.status_code} in {elapsed:.2f} s")


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_postgres_table_locks_give_503_within_the_bound(database_url, roots, tmp_path) -> None:
    with dialect_app("postgres", database_url=database_url, roots=roots, tmp=tmp_path) as app:
        auth = app.token()
        assert app.client.get("/jobs", headers=auth).status_code == 200
        for table, call in (("api_tokens", lambda: app.client.get("/jobs", headers=auth)),  # every auth'd request
                            ("jobs", lambda: app.client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth))):
            with psycopg.connect(_plain(database_url)) as locker:
                locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # held until the block ends
                with timed() as t:
                    response = call()
                _assert_503(response, t[0])
                locker.rollback()
            assert call().status_code in (200, 201)  # the lock is gone: served again


def test_sqlite_write_lock_gives_503_within_the_bound_and_reads_go_on(database_url, roots, tmp_path) -> None:
    with dialect_app("sqlite", database_url=database_url, roots=roots, tmp=tmp_path) as app:
        auth = app.token()
        path = make_url(app.settings.sqlalchemy_url).database
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with timed() as t:
                response = app.client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth)
            _assert_503(response, t[0])
            assert app.client.get("/jobs", headers=auth).status_code == 200  # WAL: readers never wait
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert app.client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).status_code == 201


def test_sqlite_locked_for_readers_too_gives_503_and_readyz_fails(database_url, roots, tmp_path) -> None:
    """An exclusive lock (another process in locking_mode=EXCLUSIVE) blocks every reader: the embedded
    mode's 'database does not answer'."""
    with dialect_app("sqlite", database_url=database_url, roots=roots, tmp=tmp_path) as app:
        auth = app.token()
        path = make_url(app.settings.sqlalchemy_url).database
        app.client.app.state.engine.dispose()  # pooled connections would keep reading their WAL snapshot
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("UPDATE api_tokens SET name = name")
        try:
            for call in (lambda: app.client.get("/jobs", headers=auth), lambda: app.client.get("/readyz")):
                with timed() as t:
                    response = call()
                _assert_503(response, t[0])
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert app.client.get("/jobs", headers=auth).status_code == 200


def test_a_postgres_that_accepts_and_never_answers_gives_503_within_the_bound(roots) -> None:
    silent = SilentServer()
    try:
        settings = make_settings(f"postgresql://postgres@127.0.0.1:{silent.port}/flashdmd", roots)
        with TestClient(create_app(settings)) as client:
            results: dict[str, tuple[int, float]] = {}

            def call(name: str, path: str, headers: dict[str, str]) -> None:
                with timed() as t:
                    response = client.get(path, headers=headers)
                results[name] = (response, t[0])

            # At once, as a probe and clients would: none of them may wait for another.
            threads = [threading.Thread(target=call, args=a) for a in (
                ("readyz", "/readyz", {}), ("jobs", "/jobs", {"Authorization": "Bearer fdmd_0_x"}),
                ("job", "/jobs/j_1", {"Authorization": "Bearer fdmd_1_y"}))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(3 * GENEROUS)
            assert set(results) == {"readyz", "jobs", "job"}, "a request did not come back"
            for response, elapsed in results.values():
                _assert_503(response, elapsed)
        assert silent.held, "the API never reached the silent database"
    finally:
        silent.close()
