"""The atomic claim, heartbeat fencing and the reaper, on Postgres and Redis."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from servicekit import TINY_SPEC, make_settings, wait_for
from sqlalchemy import select, update

from api.celery_app import Dispatcher
from api.db import utcnow
from api.models import Event, Job
from api.reaper import Reaper, reap_once
from api.runner import Attempt, claim_job, run_job
from api.workers import pool_queue

pytestmark = pytest.mark.service


@pytest.fixture
def reaper_settings(database_url, roots):
    return make_settings(database_url, roots, stale_after_seconds=30, heartbeat_seconds=5, max_recoveries=2)


@pytest.fixture
def dispatcher(reaper_settings):
    d = Dispatcher(reaper_settings)
    yield d
    d.close()


def _job(client, auth, sessions, **values) -> str:
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"]
    if values:
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))
            session.commit()
    return job_id


def _get(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _kinds(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))


def _queued_ids(redis_client, queue: str) -> list[str]:
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in redis_client.lrange(queue, 0, -1)]


def test_a_job_is_claimed_once_even_by_concurrent_workers(client, auth, sessions) -> None:
    job_id = _job(client, auth, sessions)

    def claim(i: int):
        with sessions() as session:
            return claim_job(session=session, job_id=job_id, worker=f"w{i}")

    with ThreadPoolExecutor(8) as pool:
        claims = [c for c in pool.map(claim, range(8)) if c is not None]
    assert len(claims) == 1 and claims[0].attempt == 1
    job = _get(sessions, job_id)
    assert (job.status, job.attempt, job.worker) == ("starting", 1, claims[0].worker)
    with sessions() as session:
        assert claim_job(session=session, job_id=job_id, worker="late") is None


def test_a_duplicate_delivery_exits_quietly(client, auth, sessions, settings) -> None:
    job_id = _job(client, auth, sessions, status="succeeded", attempt=1)
    events = _kinds(sessions, job_id)
    run_job(job_id, settings=settings)  # the task body, as a redelivered message would run it
    assert _get(sessions, job_id).status == "succeeded" and _get(sessions, job_id).attempt == 1
    assert _kinds(sessions, job_id) == events
    assert not settings.run_dir(job_id).exists()  # no trainer was started
    run_job("job_doesnotexist", settings=settings)


def test_heartbeats_are_fenced_by_attempt(client, auth, sessions, settings, reaper_settings, dispatcher) -> None:
    job_id = _job(client, auth, sessions)
    with sessions() as session:
        claim = claim_job(session=session, job_id=job_id, worker="w")
    attempt = Attempt(settings, sessions, claim)
    assert attempt._heartbeat() is False  # owned, no cancel
    client.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert attempt._heartbeat() is True  # the cancel flag reaches the worker
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running",
                                                                   heartbeat_at=utcnow() - timedelta(hours=1)))
        session.commit()
    reap_once(sessions=sessions, settings=reaper_settings, send=dispatcher.send)
    assert _get(sessions, job_id).status == "recovering"
    assert attempt._heartbeat() is None  # the reaper gave the job away: this attempt must stop
    attempt._finish("failed", "x", "y")  # ...and cannot overwrite the new state
    assert _get(sessions, job_id).status == "recovering"


def test_reaper_requeues_stale_jobs_and_leaves_live_ones(client, auth, sessions, reaper_settings, dispatcher,
                                                        redis_client) -> None:
    old = utcnow() - timedelta(minutes=5)
    stale = _job(client, auth, sessions, status="running", attempt=1, heartbeat_at=old, worker="dead:1")
    fresh = _job(client, auth, sessions, status="running", attempt=1, heartbeat_at=utcnow())
    stopping = _job(client, auth, sessions, status="cancelling", attempt=1, heartbeat_at=old, cancel_requested=True)
    exhausted = _job(client, auth, sessions, status="starting", attempt=3, heartbeat_at=old, recoveries=2)

    result = reap_once(sessions=sessions, settings=reaper_settings, send=dispatcher.send)
    assert result.requeued == [stale] and result.cancelled == [stopping] and result.failed == [exhausted]
    assert stale in result.dispatched and stale in _queued_ids(redis_client, pool_queue(reaper_settings, "cpu1"))

    job = _get(sessions, stale)
    assert (job.status, job.recoveries, job.worker) == ("recovering", 1, None) and job.dispatched_at is not None
    assert _kinds(sessions, stale)[-1] == "recovering"
    assert _get(sessions, fresh).status == "running"
    assert _get(sessions, stopping).status == "cancelled"
    job = _get(sessions, exhausted)
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    # A second pass finds nothing to do: each move happens once.
    again = reap_once(sessions=sessions, settings=reaper_settings, send=dispatcher.send)
    assert (again.requeued, again.cancelled, again.failed) == ([], [], [])
    # The recovering job can be claimed again, as attempt 2.
    with sessions() as session:
        assert claim_job(session=session, job_id=stale, worker="new").attempt == 2


def test_reaper_thread_runs_in_the_background(client, auth, sessions, database_url, roots, dispatcher) -> None:
    settings = make_settings(database_url, roots, stale_after_seconds=2, heartbeat_seconds=1,
                             reaper_interval_seconds=0.2)
    job_id = _job(client, auth, sessions, status="running", attempt=1, heartbeat_at=utcnow() - timedelta(seconds=10))
    reaper = Reaper(sessions=sessions, settings=settings, send=dispatcher.send)
    reaper.start()
    try:
        wait_for(lambda: _get(sessions, job_id).status == "recovering", 10, what="the reaper")
    finally:
        reaper.stop()
    assert not reaper.is_alive()
