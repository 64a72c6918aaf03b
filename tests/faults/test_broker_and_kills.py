"""A broker restarted empty, and SIGKILL of the API and of the worker at random points of a job.

Both run the real trainer on the tiny spec, with a real `flashdmd worker` and (for the kills) a real
`flashdmd serve`. What must hold: nothing lost (the job finishes, every metric step is there), nothing
duplicated (one job per Idempotency-Key, one row per (key, step)), and the checkpoint serves /generate.
"""

from __future__ import annotations

import os
import random
import stat
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from faultkit import ApiProcess, RedisServer
from servicekit import WorkerProcess, make_settings, queue_name, settings_env, tiny_spec, wait_for

from api.auth import create_token
from api.db import make_engine, make_sessionmaker
from api.main import create_app
from api.workers import pool_queue

pytestmark = [pytest.mark.service, pytest.mark.slow]
RUN_TIMEOUT = 420  # the tiny run takes 10-30 s on an idle 2-core machine, much more on a busy one
TERMINAL = {"succeeded", "failed", "cancelled"}
# A client's patience, not a bound under test: the first /generate loads the pipeline in a busy API process.
HTTP_TIMEOUT = 180.0


def _token(settings) -> dict[str, str]:
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            _, token = create_token(session=session, name="faults", prefix=settings.token_prefix)
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {token}"}


def _series(get, job_id: str) -> list[int]:
    keys = get(f"/jobs/{job_id}/metrics").json()["keys"]
    series = [[p["step"] for p in get(f"/jobs/{job_id}/metrics", params={"key": k, "limit": 20000}).json()["points"]]
              for k in keys]
    return max(series, key=len)


def test_a_queued_job_runs_after_the_broker_restarts_empty(database_url, roots, tmp_path) -> None:
    """The finding: the job's message was lost with the broker, its dispatched_at was set, so the reaper never
    sent it again and it stayed queued for ever. Now it is sent again after redispatch_after_seconds."""
    import redis

    broker = RedisServer(tmp_path).start()
    settings = make_settings(database_url, roots, broker_url=broker.url, queue=queue_name("broker"), pools=["cpu1"],
                             worker_gpus=0, worker_processes=1, redispatch_after_seconds=3,
                             reaper_interval_seconds=0.5, heartbeat_seconds=1, stale_after_seconds=4)
    worker = None
    try:
        with TestClient(create_app(settings)) as client:
            auth = _token(settings)
            job_id = client.post("/jobs", json={"spec": tiny_spec()}, headers=auth).json()["id"]
            queue = pool_queue(settings, "cpu1")
            assert redis.Redis(port=broker.port).llen(queue) == 1  # sent: the message waits in the broker
            broker.kill()
            broker.start()  # same port, empty: the message is gone
            assert redis.Redis(port=broker.port).llen(queue) == 0

            def events() -> list[dict]:
                return client.get(f"/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()["data"]

            resent = wait_for(lambda: [e for e in events() if e["kind"] == "redispatched"], 60,
                              what="the reaper to send the job again")
            assert "not claimed" in resent[0]["message"]
            worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log").start()

            def done() -> dict | None:
                job = client.get(f"/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in TERMINAL else None

            job = wait_for(done, RUN_TIMEOUT, interval=0.5, what="the job after the broker restart")
            assert job["status"] == "succeeded", (job, worker.log()[-3000:])
            assert job["attempt"] == 1  # every extra copy (worker start, redispatch) was a no-op at the claim
            assert _series(lambda p, **kw: client.get(p, headers=auth, **kw), job_id) == [1, 2, 3, 4, 5, 6]
    finally:
        if worker is not None:
            worker.stop()
        broker.kill()


def test_sigkill_of_the_api_and_the_worker_at_random_points_loses_and_duplicates_nothing(
        database_url, roots, redis_client, tmp_path) -> None:
    seed = int(os.environ.get("FLASHDMD_FAULT_SEED", str(random.randrange(2**31))))
    rng = random.Random(seed)
    settings = make_settings(database_url, roots, queue=queue_name("kills"), pools=[], worker_gpus=0,
                             worker_processes=1, reaper_interval_seconds=0.5, heartbeat_seconds=1,
                             stale_after_seconds=4)
    env = settings_env(settings)
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    auth = _token(settings)
    body = {"spec": tiny_spec(max_steps=6, checkpoint_every=2, sample_every=1000)}
    headers = {**auth, "Idempotency-Key": f"faults-{seed}"}
    why = f"FLASHDMD_FAULT_SEED={seed}"
    try:
        http = httpx.Client(base_url=api.url, timeout=HTTP_TIMEOUT)
        job_id = http.post("/jobs", json=body, headers=headers).json()["id"]
        time.sleep(rng.uniform(0, 2))
        api.kill()  # the API dies at a random moment of the job's start
        api = ApiProcess(env, tmp_path / "api.log").start()
        http = httpx.Client(base_url=api.url, timeout=HTTP_TIMEOUT)
        again = http.post("/jobs", json=body, headers=headers)  # the client retries its request
        assert again.status_code == 200 and again.json()["id"] == job_id, (why, again.text)

        def job() -> dict:
            return http.get(f"/jobs/{job_id}", headers=auth).json()

        kill_at = rng.randint(1, 5)
        wait_for(lambda: job()["status"] == "running" and job()["progress"]["step"] >= kill_at, RUN_TIMEOUT,
                 what=f"step {kill_at} ({why})")
        worker.kill()  # the worker (and so its trainer) dies at a random step
        if rng.random() < 0.5:
            api.kill()  # and the API with it, half of the time
            api = ApiProcess(env, tmp_path / "api.log").start()
            http = httpx.Client(base_url=api.url, timeout=HTTP_TIMEOUT)
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        final = wait_for(lambda: job() if job()["status"] in TERMINAL else None, RUN_TIMEOUT, interval=0.5,
                         what=f"the job to finish ({why})")
        assert final["status"] == "succeeded", (why, final, worker.log()[-3000:])
        assert len(http.get("/jobs", headers=auth).json()["data"]) == 1, why  # one job for one key
        assert _series(lambda p, **kw: http.get(p, headers=auth, **kw), job_id) == [1, 2, 3, 4, 5, 6], why
        run_dir = settings.run_dir(job_id)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        image = http.post("/generate", json={"job": job_id, "prompt": "a digit", "seed": 1}, headers=auth)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), (why, image.text[:300])
        print(f"[faults] {why}: API killed at start, worker killed at step {kill_at}; attempt {final['attempt']}, "
              "steps 1-6 once each, checkpoint served")
    finally:
        worker.stop()
        api.kill()
