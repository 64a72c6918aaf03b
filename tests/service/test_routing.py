"""Jobs land where their GPUs are, on Postgres and Redis, and on the embedded SQLite.

Workers register their size (api/workers.py); POST /jobs refuses a job no live pool can run with a 422
on `spec.train.num_processes`, and sends the others to the queue of the smallest pool that fits.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from servicekit import TINY_SPEC, WorkerProcess, make_settings, queue_name, settings_env, tiny_spec, wait_for
from sqlalchemy import delete, select, text, update

from api import migrate
from api.auth import create_token
from api.celery_app import RUN_JOB, Dispatcher
from api.crud import create_job
from api.db import make_engine, utcnow
from api.main import create_app
from api.models import Job, Worker
from api.reaper import reap_once
from api.settings import Settings
from api.workers import Capacity, Registration, Router, check_capacity, live_pools, pool_queue, register

pytestmark = pytest.mark.service


@pytest.fixture
def fleet(database_url, roots, redis_client):
    """An API whose queues no one else uses and with no declared pool: only registered workers count."""
    settings = make_settings(database_url, roots, queue=queue_name("route"), pools=[])
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _add_worker(sessions, settings: Settings, gpus: int, processes: int | None = None, *, prefix: str | None = None
                ) -> str:
    """Register a worker row exactly as a worker's main process does (another deployment: `prefix`)."""
    capacity = Capacity(gpus, processes or gpus)
    name = f"node-{secrets.token_hex(3)}:1"
    queue = f"{prefix or settings.queue}-{capacity.pool}"
    with sessions() as session:
        register(session=session, name=name, capacity=capacity, queue=queue)
    return name


def _queued_ids(redis_client, queue: str) -> list[str]:
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in redis_client.lrange(queue, 0, -1)]


def _post(client, auth, processes: int):
    return client.post("/jobs", json={"spec": tiny_spec(num_processes=processes)}, headers=auth)


def _assert_422_names_num_processes(response, asked: int) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["fields"] == ["spec.train.num_processes"]
    assert error["message"].startswith(f"spec.train.num_processes: {asked} process(es) asked")


def test_no_live_worker_means_422_naming_the_field(fleet, auth) -> None:
    client, _ = fleet
    response = _post(client, auth, 1)
    _assert_422_names_num_processes(response, 1)
    assert "pools: none" in response.json()["error"]["message"]
    assert client.get("/jobs", headers=auth).json()["data"] == []  # nothing was created


def test_jobs_route_to_the_smallest_pool_that_fits(fleet, auth, sessions, redis_client) -> None:
    client, settings = fleet
    _add_worker(sessions, settings, gpus=1)
    _add_worker(sessions, settings, gpus=8)
    _add_worker(sessions, settings, gpus=0, processes=2)  # a CPU worker offering 2 gloo processes
    _add_worker(sessions, settings, gpus=16, prefix=queue_name("other"))  # another deployment's: unreachable
    expected = {1: "gpu1", 2: "cpu2", 3: "gpu8", 8: "gpu8"}
    for processes, pool in expected.items():
        response = _post(client, auth, processes)
        assert response.status_code == 201, response.text
        assert response.json()["id"] in _queued_ids(redis_client, pool_queue(settings, pool)), (processes, pool)
    too_many = _post(client, auth, 9)
    _assert_422_names_num_processes(too_many, 9)
    assert "pools: gpu1, cpu2, gpu8" in too_many.json()["error"]["message"]
    # Eval jobs run one process, so any live pool takes them.
    with sessions() as session:
        assert [p.name for p in live_pools(session=session, settings=settings)] == ["gpu1", "cpu2", "gpu8"]


def test_a_pool_with_no_live_worker_still_takes_jobs_and_says_so(fleet, auth, sessions, redis_client) -> None:
    """A rolling restart or a worker still starting: its pool was seen, so the job is queued there (201, with a
    notice that no worker is live), not refused. Only what no declared or ever-seen pool could run is a 422."""
    client, settings = fleet
    name = _add_worker(sessions, settings, gpus=4)
    live = _post(client, auth, 4)
    assert live.status_code == 201 and live.json()["notice"] is None and "x-worker-live" not in live.headers
    with sessions() as session:
        old = utcnow() - timedelta(seconds=settings.stale_after_seconds + 1)
        session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=old))
        session.commit()
    queued = _post(client, auth, 4)
    assert queued.status_code == 201, queued.text
    assert queued.json()["status"] == "queued" and "no worker of pool gpu4 is live" in queued.json()["notice"]
    assert queued.headers["x-worker-live"] == "false"
    assert queued.json()["id"] in _queued_ids(redis_client, pool_queue(settings, "gpu4"))
    _assert_422_names_num_processes(_post(client, auth, 5), 5)  # no pool ever offered 5


def test_declared_pools_count_without_a_live_worker(database_url, roots, redis_client, auth) -> None:
    """FLASHDMD_POOLS: a pool scaled to zero still takes jobs; they wait in its queue for a worker."""
    settings = make_settings(database_url, roots, queue=queue_name("declared"), pools=["gpu1", "gpu8"])
    with TestClient(create_app(settings)) as client:
        response = _post(client, auth, 2)
        assert response.status_code == 201, response.text
        assert response.json()["id"] in _queued_ids(redis_client, pool_queue(settings, "gpu8"))
        _assert_422_names_num_processes(_post(client, auth, 9), 9)


def test_a_job_whose_pool_left_waits_for_the_reaper_to_route_it(fleet, auth, sessions, redis_client) -> None:
    client, settings = fleet
    name = _add_worker(sessions, settings, gpus=2)
    job_id = _post(client, auth, 2).json()["id"]
    with sessions() as session:  # the pool goes away; the job must be sent again (as after a recovery)
        session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=utcnow() - timedelta(hours=1)))
        session.execute(update(Job).where(Job.id == job_id).values(
            dispatched_at=None, updated_at=utcnow() - timedelta(hours=1)))
        session.commit()
    with sessions() as session:  # and is forgotten: no pool fits any more
        session.execute(delete(Worker).where(Worker.name == name))
        session.commit()
    dispatcher = Dispatcher(settings)
    try:
        assert not dispatcher.send(job_id)  # no pool fits: not sent anywhere, dispatched_at stays empty
        assert job_id not in reap_once(sessions=sessions, settings=settings, send=dispatcher.send).dispatched
        _add_worker(sessions, settings, gpus=8)  # a bigger pool comes up: the next reaper pass routes there
        assert job_id in reap_once(sessions=sessions, settings=settings, send=dispatcher.send).dispatched
    finally:
        dispatcher.close()
    assert job_id in _queued_ids(redis_client, pool_queue(settings, "gpu8"))


@pytest.mark.slow
def test_a_real_worker_registers_heartbeats_refuses_a_larger_job_and_leaves(
        database_url, roots, redis_client, auth, sessions, tmp_path) -> None:
    settings = make_settings(database_url, roots, queue=queue_name("worker"), pools=[],
                             worker_gpus=0, worker_processes=1)
    queue = pool_queue(settings, "cpu1")
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log").start()
    try:
        with sessions() as session:  # registered before it said "ready."
            rows = session.scalars(select(Worker).where(Worker.queue == queue)).all()
        assert [(r.pool, r.gpus, r.processes) for r in rows] == [("cpu1", 0, 1)], worker.log()[-2000:]
        first = rows[0].heartbeat_at

        def beat_moved() -> bool:
            with sessions() as session:
                return session.scalar(select(Worker.heartbeat_at).where(Worker.name == rows[0].name)) > first

        wait_for(beat_moved, 15, what="a heartbeat")

        # A 2-process job that reaches this 1-process worker anyway (sent by hand to its queue) fails clearly.
        # The API declares a cpu2 pool that no worker serves, so the job is accepted and waits in its queue.
        with TestClient(create_app(settings.model_copy(update={"pools": ["cpu2"]}))) as client:
            refused = _post(client, auth, 3)
            _assert_422_names_num_processes(refused, 3)
            assert "pools: cpu1, cpu2 (declared)" in refused.json()["error"]["message"]
            job_id = _post(client, auth, 2).json()["id"]
            assert job_id in _queued_ids(redis_client, pool_queue(settings, "cpu2"))
            dispatcher = Dispatcher(settings)
            dispatcher.app.send_task(RUN_JOB, args=[job_id], queue=queue)
            dispatcher.close()

            def failed() -> dict | None:
                job = client.get(f"/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in ("failed", "succeeded") else None

            job = wait_for(failed, 120, what="the worker to refuse the job")
        assert job["status"] == "failed" and job["error"]["code"] == "worker_too_small", job
        assert "runs at most 1 process(es)" in job["error"]["message"]
        assert not (settings.run_dir(job_id) / "trainer.log").exists()  # no trainer was started
    finally:
        worker.stop(timeout=30)
    with sessions() as session:  # a warm shutdown deregisters: the pool stops counting at once
        assert session.scalars(select(Worker).where(Worker.queue == queue)).all() == []



@pytest.mark.slow
def test_a_cpu_worker_runs_the_gloo_processes_it_advertises(database_url, roots, redis_client, auth, tmp_path) -> None:
    """FLASHDMD_WORKER_PROCESSES=2 on a CPU worker: pool cpu2 takes a 2-process job and launches 2 ranks."""
    settings = make_settings(database_url, roots, queue=queue_name("cpu2"), pools=[],
                             worker_gpus=0, worker_processes=2)
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log").start()
    try:
        with TestClient(create_app(settings)) as client:
            spec = tiny_spec(num_processes=2, max_steps=4, checkpoint_every=2, sample_every=4)
            created = client.post("/jobs", json={"spec": spec}, headers=auth)
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]

            def finished() -> dict | None:
                job = client.get(f"/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in ("failed", "succeeded", "cancelled") else None

            job = wait_for(finished, 420, interval=1.0, what="the 2-process job")
        trainer_log = (settings.run_dir(job_id) / "trainer.log").read_text(errors="replace")
        assert job["status"] == "succeeded", (job, trainer_log[-3000:], worker.log()[-2000:])
        launch = next(line for line in trainer_log.splitlines() if line.startswith("==> attempt 1:"))
        assert "launch" in launch and "--num_processes 2" in launch, launch
    finally:
        worker.stop(timeout=30)


@pytest.mark.slow
def test_a_drained_2_process_job_goes_back_to_the_queue(database_url, roots, redis_client, auth, tmp_path) -> None:
    """A warm worker shutdown stops every rank at a checkpoint and each exits 3, but `accelerate launch` reports
    any non-zero rank as exit 1: the runner must read the trainer's `stopped` event, or a drained multi-process
    job would be marked failed instead of recovering."""
    settings = make_settings(database_url, roots, queue=queue_name("cpu2drain"), pools=["cpu2"],
                             worker_gpus=0, worker_processes=2)
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log").start()
    try:
        with TestClient(create_app(settings)) as client:
            spec = tiny_spec(num_processes=2, max_steps=400, checkpoint_every=200, sample_every=400)
            job_id = client.post("/jobs", json={"spec": spec}, headers=auth).json()["id"]

            def progressed() -> bool:
                return (client.get(f"/jobs/{job_id}", headers=auth).json()["progress"]["step"] or 0) >= 2

            wait_for(progressed, 300, interval=0.5, what="the 2-process job to make progress")
            assert worker.stop(timeout=120) == 0, worker.log()[-2000:]
            job = client.get(f"/jobs/{job_id}", headers=auth).json()
            events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()["data"]
        trainer_log = (settings.run_dir(job_id) / "trainer.log").read_text(errors="replace")
        assert job["status"] == "recovering", (job, trainer_log[-3000:])
        assert any(e["kind"] == "stopped" for e in events), events
    finally:
        worker.stop(timeout=30)

def test_embedded_sqlite_registration_and_routing(tmp_path, sqlite_sessions) -> None:
    """SQLite (`flashdmd up`): the router reads while another connection holds the write lock, as the
    reaper does when it sends from inside its transaction."""
    url = str(sqlite_sessions.kw["bind"].url)
    settings = Settings(data_dir=tmp_path, database_url=url, heartbeat_seconds=0.2, stale_after_seconds=1)
    registration = Registration(settings, Capacity(0, 2), name="embedded:1")
    registration.start()
    router = Router(settings)
    try:
        with sqlite_sessions() as session:
            owner, _ = create_token(session=session, name="embedded", prefix="fdmd_")
            job, _ = create_job(session=session, owner=owner, spec=tiny_spec(num_processes=2), total_steps=6,
                                name=None, idempotency_key=None, request_hash="x")
            job_id = job.id
            assert check_capacity(session=session, settings=settings, spec=job.spec).queue == pool_queue(settings, "cpu2")
            session.commit()
        with sqlite_sessions() as writer:
            writer.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))  # holds the lock
            assert router.queue_for(job_id) == pool_queue(settings, "cpu2")
            writer.commit()
        first = _heartbeat(sqlite_sessions, "embedded:1")
        wait_for(lambda: _heartbeat(sqlite_sessions, "embedded:1") > first, 10, what="an embedded heartbeat")
    finally:
        registration.stop()
        router.close()
    assert _heartbeat(sqlite_sessions, "embedded:1") is None
    assert TINY_SPEC["train"].get("num_processes") is None  # the shared spec was not modified


def _heartbeat(sessions, name: str):
    with sessions() as session:
        return session.scalar(select(Worker.heartbeat_at).where(Worker.name == name))


def test_waiting_jobs_are_sent_again_after_the_routing_upgrade(tmp_path) -> None:
    """0003_workers: jobs queued before it went to the old single queue; the reaper must route them again."""
    url = f"sqlite:///{tmp_path / 'flashdmd.db'}"
    migrate.upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO api_tokens (id, name, token_hash, prefix, created_at) "
                          "VALUES (1, 't', 'h', 'p', '2026-01-01 00:00:00')"))
        for job_id, status in (("job_a", "queued"), ("job_b", "recovering"), ("job_c", "running")):
            conn.execute(text(
                "INSERT INTO jobs (id, owner_id, kind, status, spec, total_steps, cancel_requested, attempt, "
                "recoveries, created_at, updated_at, dispatched_at, progress_step) VALUES (:id, 1, 'distill', "
                ":status, '{}', 1, 0, 0, 0, '2026-01-01', '2026-01-01', '2026-01-01', 0)"), {"id": job_id, "status": status})
    migrate.upgrade(url)
    with engine.connect() as conn:
        sent = dict(conn.execute(text("SELECT id, dispatched_at IS NOT NULL FROM jobs")).all())
    engine.dispose()
    assert sent == {"job_a": 0, "job_b": 0, "job_c": 1}
