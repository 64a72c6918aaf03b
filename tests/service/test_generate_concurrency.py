"""/generate under concurrency: admission, the queue and one token's share of the slots.

The limiter: one token holds at most its share of slots and sends at most its rate; past
either it gets 429 with Retry-After, on Postgres and on SQLite.

The concurrency test, as it broke: the embedded database (SQLite) with a real worker running a job,
12 concurrent POST /generate and GET /jobs every 100 ms. Before, each /generate held SQLite's write lock
through the generation: 11 of 12 got 500 "database is locked", GET /jobs got 500, heartbeats waited.

Now: only 200, 429 (a token past its share) or 503 (the service is full), GET /jobs is always 200, and the
running job's heartbeat never goes stale (the API's reaper runs too and would move it to `recovering`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hardenkit import BACKENDS, Api, api_on, sqlite_url
from servicekit import WorkerProcess, burst, make_settings, queue_name, settings_env, tiny_spec, wait_for
from sqlalchemy import select

from api.auth import create_token
from api.db import utcnow
from api.generate_limits import Limiter
from api.main import create_app
from api.models import Job
from api.routes.generate import runtime
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service
LOAD_SECONDS = 12.0


@pytest.fixture(scope="module")
def checkpoint(roots, tmp_path_factory):
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    return make_checkpoint(roots["models"] / f"limits-{secrets.token_hex(3)}", "sdxl", teacher)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request, database_url, roots, tmp_path_factory, redis_client):
    with api_on(request.param, pg_url=database_url, roots=roots, tmp=tmp_path_factory.mktemp("db")) as a:
        yield a


def _fire(api: Api, requests: list[dict[str, str]], checkpoint) -> list:
    """POST /generate once per headers, all at the same moment; the responses in the same order."""
    body = {"checkpoint": str(checkpoint), "prompt": "a digit", "num_images": 4}
    return burst(api.client.post, [(h, {**body, "seed": i}) for i, h in enumerate(requests)])


def test_one_token_cannot_take_every_generate_slot(api: Api, checkpoint) -> None:
    """The finding: the limiter was global, so one user's burst took every slot. Now a token holds at most
    its share (here 2 of 1 running + 3 waiting); past it 429 + Retry-After, and another token still gets in."""
    rt = runtime(api.client.app)
    saved = rt.limiter
    rt.limiter = Limiter(concurrency=1, queue=3, timeout=60, retry_after=7, owner_share=0.5)
    a, b = api.token(), api.token()
    try:
        responses = _fire(api, [a] * 6 + [b], checkpoint)
    finally:
        rt.limiter = saved
    codes_a = sorted(r.status_code for r in responses[:6])
    assert codes_a.count(200) <= 2 and codes_a.count(429) >= 4 and set(codes_a) <= {200, 429}, codes_a
    limited = next(r for r in responses[:6] if r.status_code == 429)
    assert limited.headers["retry-after"] == "7" and limited.json()["error"]["code"] == "rate_limited"
    assert responses[6].status_code == 200, responses[6].text  # b was not starved by a's burst


def test_past_the_per_token_rate_429_with_retry_after(api: Api, checkpoint) -> None:
    rt = runtime(api.client.app)
    saved = rt.limiter
    rt.limiter = Limiter(concurrency=1, queue=4, timeout=60, retry_after=5, per_minute=6, burst=2)
    a, b = api.token(), api.token()
    body = {"checkpoint": str(checkpoint), "prompt": "a digit", "seed": 1}
    try:
        codes = [api.client.post("/generate", json=body, headers=a) for _ in range(3)]
        other = api.client.post("/generate", json=body, headers=b)
    finally:
        rt.limiter = saved
    assert [r.status_code for r in codes] == [200, 200, 429], [r.text for r in codes]
    # 6 a minute: one more request in at most 10 s.
    assert 1 <= int(codes[2].headers["retry-after"]) <= 10 and codes[2].json()["error"]["code"] == "rate_limited"
    assert other.status_code == 200  # the rate is per token


@pytest.mark.slow
def test_concurrent_generate_keeps_sqlite_and_heartbeats_alive(roots, tmp_path) -> None:
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path / "tiny")
    settings = make_settings(sqlite_url(tmp_path), roots, broker_url=f"filesystem://{tmp_path / 'broker'}",
                             queue=queue_name("conc"), reaper_interval_seconds=0.5, heartbeat_seconds=1,
                             stale_after_seconds=3)
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log")
    with TestClient(create_app(settings)) as client:
        sessions = client.app.state.sessionmaker  # type: ignore[attr-defined]
        reads = client.app.state.read_sessionmaker  # type: ignore[attr-defined]
        tokens = []
        for _ in range(4):
            with sessions() as session:
                tokens.append({"Authorization": f"Bearer {create_token(session=session, name='c', prefix='f_')[1]}"})
        worker.start()
        try:
            spec = tiny_spec(max_steps=5000, checkpoint_every=5000, sample_every=5000)
            job_id = client.post("/jobs", json={"spec": spec}, headers=tokens[0]).json()["id"]

            def row() -> Job:
                with reads() as session:
                    job = session.scalar(select(Job).where(Job.id == job_id))
                    assert job is not None
                    return job

            def running() -> bool:
                job = row()
                assert job.status in ("queued", "starting", "running"), (job.status, worker.log()[-3000:])
                return job.status == "running" and job.heartbeat_at is not None

            wait_for(running, 120, interval=0.5, what="the job to run")
            # Each token generates from a job of its own (they stay queued behind the running one): /generate
            # reads the job's checkpoint rows, as in the request that broke.
            api = Api("sqlite", client, settings)
            own_jobs = [api.job_with_checkpoint(headers, teacher) for headers in tokens]
            stop = threading.Event()
            list_codes: Counter[int] = Counter()
            staleness: list[float] = []
            statuses: set[str] = set()

            def poll_jobs() -> None:  # GET /jobs every 100 ms
                while not stop.is_set():
                    list_codes[client.get("/jobs", headers=tokens[0]).status_code] += 1
                    time.sleep(0.1)

            def watch_heartbeat() -> None:
                while not stop.is_set():
                    job = row()
                    statuses.add(job.status)
                    beat = job.heartbeat_at or job.created_at
                    staleness.append((utcnow() - beat).total_seconds())
                    time.sleep(0.2)

            gen_codes: Counter[int] = Counter()

            def generate(i: int) -> None:
                body = {"job": own_jobs[i % 4], "prompt": "a digit", "seed": i, "num_images": 2}
                res = client.post("/generate", json=body, headers=tokens[i % 4])
                gen_codes[res.status_code] += 1
                if res.status_code in (429, 503) and int(res.headers.get("retry-after", 0)) < 1:
                    gen_codes[-1] += 1  # a refusal without Retry-After: counted so the test fails

            background = [threading.Thread(target=poll_jobs), threading.Thread(target=watch_heartbeat)]
            for t in background:
                t.start()
            deadline = time.monotonic() + LOAD_SECONDS
            waves = 0
            try:
                while time.monotonic() < deadline or waves < 2:  # waves of 12: 3 from each of 4 tokens
                    wave = [threading.Thread(target=generate, args=(i,)) for i in range(12)]
                    for t in wave:
                        t.start()
                    for t in wave:
                        t.join(90)
                    waves += 1
            finally:
                stop.set()
                for t in background:
                    t.join(10)
            assert set(gen_codes) <= {200, 429, 503}, gen_codes
            assert gen_codes[200] >= 4, gen_codes
            assert set(list_codes) == {200} and sum(list_codes.values()) >= 20, list_codes
            assert statuses == {"running"}, statuses
            assert max(staleness) < settings.stale_after_seconds, max(staleness)
            print(f"waves={waves} generate={dict(gen_codes)} list={dict(list_codes)} "
                  f"max heartbeat age={max(staleness):.2f}s")
            assert client.post(f"/jobs/{job_id}/cancel", headers=tokens[0]).status_code == 200
        finally:
            worker.stop()
