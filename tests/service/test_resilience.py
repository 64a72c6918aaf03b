"""Hostile load and broken dependencies: one test per finding of the probe (bounds, stuck jobs, Host, streams,
revocation, permissions, queue-friendly routing), on the real Postgres and Redis and, where the dialect
matters, on SQLite. The fault tier (tests/faults/) breaks the dependencies themselves."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import timedelta

import pytest
from appkit import DIALECTS, App, dialect_app
from click.testing import CliRunner
from servicekit import TINY_SPEC, make_settings, settings_env
from sqlalchemy import select, text, update

from api.celery_app import Dispatcher
from api.cli import cli
from api.db import make_engine, utcnow
from api.main import create_app
from api.models import Event, Job
from api.reaper import reap_once, resend_waiting
from api.runner import make_run_dir
from api.workers import pool_queue

pytestmark = pytest.mark.service


@pytest.fixture(scope="module", params=DIALECTS)
def app(request, database_url, roots, tmp_path_factory) -> App:
    with dialect_app(request.param, database_url=database_url, roots=roots, max_streams_per_token=2,
                     tmp=tmp_path_factory.mktemp("resilience")) as built:
        yield built


def _job(app: App, headers: dict[str, str], spec: dict | None = None) -> str:
    res = app.client.post("/jobs", json={"spec": spec or TINY_SPEC}, headers=headers)
    assert res.status_code == 201, res.text
    return res.json()["id"]


def _kinds(app: App, job_id: str) -> list[str]:
    with app.sessions() as session:
        return list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))


# ---------------------------------------------------------------- bounds that match the platform


def test_a_log_offset_far_past_the_end_is_empty_with_the_next_offset(app: App) -> None:
    """the OS refuses a seek near 2^44, and that was a 500. The offset is bounded by the file."""
    auth = app.token()
    job_id = _job(app, auth)
    log = app.settings.run_dir(job_id) / "trainer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"x" * 100)
    for offset in (100, 2**44, 2**62, 2**63 - 1):
        res = app.client.get(f"/jobs/{job_id}/logs", params={"offset": offset}, headers=auth)
        assert res.status_code == 200, (offset, res.text)
        assert res.content == b"" and res.headers["x-next-offset"] == "100"
    tail = app.client.get(f"/jobs/{job_id}/logs", params={"offset": 90}, headers=auth)
    assert tail.content == b"x" * 10 and tail.headers["x-next-offset"] == "100"


@pytest.mark.parametrize("kind", [{"a": 1}, ["distill"], 3, None])
def test_a_spec_kind_that_is_not_a_string_is_a_422_naming_it(app: App, kind) -> None:
    """an unhashable kind (an object, a list) raised TypeError in the kind lookup: a 500."""
    res = app.post_json("/jobs", {"spec": {**TINY_SPEC, "kind": kind}}, app.token())
    assert res.status_code == 422, res.text
    assert res.json()["error"]["fields"] == ["spec.kind"]


# ---------------------------------------------------------------- no reflected Host


def test_sample_urls_and_redirects_never_carry_the_request_host(app: App) -> None:
    auth = app.token()
    job_id = _job(app, auth)
    from api.models import Sample

    with app.sessions() as session:
        session.add(Sample(job_id=job_id, step=3, path="samples/step-3.png", created_at=utcnow()))
        session.commit()
    evil = {**auth, "Host": "evil.example"}
    url = app.client.get(f"/jobs/{job_id}/samples", headers=evil).json()["data"][0]["url"]
    assert url == f"/jobs/{job_id}/samples/3"
    redirect = app.client.get("/jobs/", headers=evil, follow_redirects=False)
    assert redirect.status_code in (307, 308) and redirect.headers["location"] == "/jobs"
    # With a public base URL configured, absolute URLs start with it (and still not with the Host header).
    base = "https://flashdmd.example.com"
    from fastapi.testclient import TestClient

    with TestClient(create_app(app.settings.model_copy(update={"public_base_url": base}))) as other:
        url = other.get(f"/jobs/{job_id}/samples", headers=evil).json()["data"][0]["url"]
        assert url == f"{base}/jobs/{job_id}/samples/3"
        assert other.get("/jobs/", headers=evil, follow_redirects=False).headers["location"] == f"{base}/jobs"


# ---------------------------------------------------------------- streams per token


def test_streams_are_capped_per_token_with_429(app: App) -> None:
    """300 streams from one token slowed everyone's GET /jobs; now a token holds max_streams_per_token (2 here)."""
    auth, other = app.token(), app.token()
    job_id = _job(app, auth)
    other_job = _job(app, other)
    client = app.client
    with client.stream("GET", f"/jobs/{job_id}/stream", headers=auth) as one, \
            client.stream("GET", f"/jobs/{job_id}/stream", headers=auth) as two:
        assert one.status_code == 200 and two.status_code == 200
        third = client.get(f"/jobs/{job_id}/stream", headers=auth)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"
        assert int(third.headers["retry-after"]) >= 1
        with client.stream("GET", f"/jobs/{other_job}/stream", headers=other) as theirs:  # another token: not capped
            assert theirs.status_code == 200
    # The closed streams gave their places back.
    with client.stream("GET", f"/jobs/{job_id}/stream", headers=auth) as again:
        assert again.status_code == 200


# ---------------------------------------------------------------- revocation and permissions


def test_token_revoke_cancel_jobs_cancels_the_owners_active_jobs(app: App) -> None:
    auth, bystander = app.token(), app.token()
    waiting = _job(app, auth)
    running = _job(app, auth)
    theirs = _job(app, bystander)
    with app.sessions() as session:
        session.execute(update(Job).where(Job.id == running).values(status="running", heartbeat_at=utcnow()))
        session.commit()
    public_id = auth["Authorization"].split("_")[1]
    out = CliRunner().invoke(cli, ["token", "revoke", public_id, "--cancel-jobs"], env=settings_env(app.settings))
    assert out.exit_code == 0, out.output
    assert "cancel requested for 2 job(s)" in out.output
    with app.sessions() as session:
        status = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_([waiting, running, theirs]))).all())
    assert status == {waiting: "cancelled", running: "cancelling", theirs: "queued"}
    assert app.client.get("/jobs", headers=auth).status_code == 401


def test_run_directories_are_private_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "jobs" / "j_new"
        make_run_dir(fresh)
        existing = tmp_path / "jobs" / "j_old"
        existing.mkdir(mode=0o755)
        make_run_dir(existing)  # a run directory from an older version is tightened on its next attempt
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(existing.stat().st_mode) == 0o700


# ---------------------------------------------------------------- no stuck jobs


def _copies(app: App, redis_client, queue: str, job_id: str) -> int:
    """Messages for the job waiting in the app's broker: Redis (Postgres app) or kombu's filesystem folder."""
    if app.settings.is_embedded_broker:
        raw = [f.read_bytes() for f in (app.settings.broker_folder / "queue").iterdir() if queue in f.name]
    else:
        raw = redis_client.lrange(queue, 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in raw]
    return sum(body[0][0] == job_id for body in bodies)


def _drain(app: App, redis_client, queue: str) -> None:
    """The broker loses every message (Redis restarted empty)."""
    if app.settings.is_embedded_broker:
        for f in (app.settings.broker_folder / "queue").iterdir():
            f.unlink()
    else:
        redis_client.delete(queue)


def test_a_sent_job_that_nobody_claims_is_sent_again_once_per_interval(app: App, redis_client) -> None:
    """the broker lost the message (Redis restarted empty); the job had a dispatched_at, so the
    reaper never sent it again and it stayed queued for ever (and counted against its owner's quota)."""
    settings = app.settings.model_copy(update={"redispatch_after_seconds": 60})
    queue = pool_queue(settings, "cpu1")
    job_id = _job(app, app.token())
    lost = utcnow() - timedelta(seconds=61)
    with app.sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=lost, updated_at=lost))
        session.commit()
    _drain(app, redis_client, queue)
    dispatcher = Dispatcher(settings)
    try:
        first = reap_once(sessions=app.sessions, settings=settings, send=dispatcher.send)
        assert job_id in first.redispatched
        assert _copies(app, redis_client, queue, job_id) == 1
        # Fenced: the next pass (another replica, or this one a moment later) does not send it again.
        assert job_id not in reap_once(sessions=app.sessions, settings=settings, send=dispatcher.send).redispatched
    finally:
        dispatcher.close()
    assert _copies(app, redis_client, queue, job_id) == 1
    assert _kinds(app, job_id).count("redispatched") == 1
    with app.sessions() as session:
        assert session.get(Job, job_id).status == "queued"


def test_a_starting_worker_resends_what_its_pool_has_waiting(app: App, redis_client) -> None:
    queue = pool_queue(app.settings, "cpu1")
    job_id = _job(app, app.token())
    _drain(app, redis_client, queue)
    dispatcher = Dispatcher(app.settings)
    try:
        sent = resend_waiting(sessions=app.sessions, queue=queue, queue_for=dispatcher.router.queue_for,
                              send=lambda j: dispatcher.send(j, queue=queue), worker="test:1")
    finally:
        dispatcher.close()
    assert job_id in sent and _copies(app, redis_client, queue, job_id) == 1
    assert "redispatched" in _kinds(app, job_id)


# ---------------------------------------------------------------- timeouts on the API's connections


def test_the_api_sessions_carry_lock_statement_and_connect_timeouts(database_url, roots) -> None:
    settings = make_settings(database_url, roots, db_statement_timeout_ms=4321, db_lock_timeout_ms=1234)
    engine = make_engine(settings.sqlalchemy_url, **settings.db_timeouts("api"))
    worker = make_engine(settings.sqlalchemy_url, **settings.db_timeouts("worker"))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "4321ms"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1234ms"
        with worker.connect() as conn:  # the worker's ingest is not latency-critical: its own, longer values
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1min"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "30s"
    finally:
        engine.dispose()
        worker.dispose()
