"""The inference tier: a real `--role inference` server behind a real control plane.

The inference server is the app of `flashdmd serve --role inference` run by uvicorn in a thread on a socket of
its own (a real TCP port, so the control plane's httpx client goes over the network as in a cluster); the
control plane is the role `control` app in a TestClient. Both use the session's Postgres: tokens and job
ownership are shared, as in production. The checkpoints are tiny random-weight SDXL ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from servicekit import TINY_SPEC, wait_for

from api.cli import cli
from api.ingest import RunIngestor
from api.main import create_app
from api.observability import LatencyMiddleware, Observability
from inference.testing import make_checkpoint
from trainer.sink import JsonlSink
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service
GS = {"generate_device": "cpu", "generate_max_batch": 2, "generate_max_wait_ms": 5}


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _url(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def inference_server(settings: Any) -> Iterator[str]:
    """`flashdmd serve --role inference`'s app under uvicorn in a thread; yields its base URL."""
    app = create_app(settings.model_copy(update={"role": "inference", **GS}))
    sock = _listener()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.05, "the inference server to start")
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _add_checkpoint(job_id: str, settings: Any, sessions: Any, teacher: Any) -> None:
    """A checkpoint in the job's run directory, ingested as the worker does."""
    run_dir = settings.run_dir(job_id)
    ckpt = make_checkpoint(run_dir, "sdxl", teacher)
    sink = JsonlSink(run_dir)
    sink.save_checkpoint(7, ckpt, {"generator": "unet"})
    sink.close()
    RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir).drain()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def owner(new_token):
    return new_token()


@pytest.fixture(scope="module")
def stranger(new_token):
    return new_token()


@pytest.fixture(scope="module")
def job(client, owner, settings, sessions, teacher) -> str:
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    _add_checkpoint(job_id, settings, sessions, teacher)
    return job_id


@pytest.fixture(scope="module")
def inference_settings(settings):
    # One token sends many requests here; the per-token rate and share have their own tests.
    return settings.model_copy(update={"generate_rate_burst": 1000, "generate_owner_share": 1.0,
                                       "generate_warm_retry_seconds": 0.2})


@pytest.fixture(scope="module")
def inference(inference_settings, job) -> Iterator[httpx.Client]:
    """A warm inference server (it loads the job's checkpoint before it says ready)."""
    with inference_server(inference_settings.model_copy(update={"generate_warm": [job]})) as url, \
            httpx.Client(base_url=url, timeout=60) as direct:
        wait_for(lambda: direct.get("/readyz").status_code == 200, 60, 0.1, "the inference server's warm-up")
        yield direct


def _control(settings: Any, url: str, **overrides: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"role": "control", "inference_url": url,
                                                             **overrides})))


@pytest.fixture(scope="module")
def control(settings, inference) -> Iterator[TestClient]:
    with _control(settings, str(inference.base_url)) as client:
        yield client


def _metrics(client: Any, headers: dict[str, str]) -> dict[str, float]:
    res = client.get("/metrics", headers=headers)
    assert res.status_code == 200, res.text
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(res.text) for s in family.samples}


def test_readyz_is_503_until_the_warm_up_has_run(client, owner, settings, sessions, teacher, inference_settings):
    # The job exists but has no checkpoint yet (a tier deployed before the training finished): warm-up
    # fails, retries, and the pod must not take traffic meanwhile.
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    with inference_server(inference_settings.model_copy(update={"generate_warm": [job_id],
                                                                 "generate_warm_shapes": ["32x32", "48x32x2"]})) as url, \
            httpx.Client(base_url=url, timeout=60) as direct:
        before = direct.get("/readyz")
        assert before.status_code == 503 and before.headers["retry-after"]
        assert before.json()["checks"] == {}, "a probe without a token learns nothing about the checkpoints"
        reason = direct.get("/readyz", headers=owner).json()["checks"]
        assert reason["database"] == "ok" and "broker" not in reason
        assert "0 of 1" in reason["warmup"] and "CheckpointError" in reason["warmup"], reason
        assert job_id not in reason["warmup"], "the warm list is the operator's: named in the log, not here"
        assert direct.get("/healthz").status_code == 200  # alive while warming: liveness must not kill it

        _add_checkpoint(job_id, settings, sessions, teacher)
        wait_for(lambda: direct.get("/readyz").status_code == 200, 60, 0.1, "readiness after the warm-up")
        assert direct.get("/readyz", headers=owner).json()["checks"]["warmup"] == "ok"
        warm = _metrics(direct, owner)
        # Loaded once by the pipeline's own warm-up (inference.serving.warm_up: its serving shapes, compiled when
        # FLASHDMD_GENERATE_COMPILE is on), then one sampler call per configured route shape (through the
        # batcher), both on that one cache entry.
        assert warm["flashdmd_generate_pipeline_cache_total{result=miss}"] == 1
        assert warm["flashdmd_generate_pipeline_cache_total{result=hit}"] == 2
        assert warm["flashdmd_generate_batch_images_count"] == 2 and warm["flashdmd_generate_batch_images_sum"] == 3
        res = direct.post("/generate", json={"job": job_id, "prompt": "a digit", "seed": 3}, headers=owner)
        assert res.status_code == 200, res.text
        after = _metrics(direct, owner)
        assert after["flashdmd_generate_pipeline_cache_total{result=miss}"] == 1, "the request loaded it again"


def test_the_control_plane_returns_the_inference_services_bytes(control, inference, owner, job):
    for body in ({"job": job, "prompt": "a handwritten digit seven", "seed": 11},
                 {"job": job, "prompt": "a digit two", "seed": 40, "num_images": 2, "format": "webp"}):
        direct = inference.post("/generate", json=body, headers=owner)
        proxied = control.post("/generate", json=body, headers=owner)
        assert direct.status_code == proxied.status_code == 200, (direct.text, proxied.text)
        assert proxied.content == direct.content
        for name in ("content-type", "x-seed", "x-checkpoint", "x-steps"):
            assert proxied.headers.get(name) == direct.headers.get(name), name
    assert proxied.json()["images"][1]["seed"] == 41
    other = control.post("/generate", json={"job": job, "prompt": "a handwritten digit seven", "seed": 12},
                         headers=owner)
    assert other.status_code == 200 and other.content != direct.content


def test_ownership_is_enforced_the_same_on_both_paths(control, inference, stranger, owner, job, settings):
    ckpt_dir = str(settings.run_dir(job))
    missing = str(settings.run_dir("j_" + "0" * 16))
    cases = [({"job": job}, 404), ({"checkpoint": ckpt_dir}, 422), ({"checkpoint": missing}, 422)]
    bodies = []
    for ref, status in cases:
        body = {**ref, "prompt": "a digit", "seed": 1}
        direct = inference.post("/generate", json=body, headers=stranger)
        proxied = control.post("/generate", json=body, headers=stranger)
        assert direct.status_code == proxied.status_code == status, (ref, direct.text, proxied.text)
        assert proxied.json() == direct.json()
        bodies.append(proxied.json())
    # Another owner's checkpoint reads exactly like a path where nothing exists.
    assert bodies[1] == bodies[2]
    assert control.post("/generate", json={"checkpoint": ckpt_dir, "prompt": "a digit", "seed": 1},
                        headers=owner).status_code == 200


def test_the_inference_services_refusals_come_back_with_their_retry_after(settings, inference_settings, owner, job):
    strict = inference_settings.model_copy(update={"generate_rate_per_minute": 1.0, "generate_rate_burst": 1})
    body = {"job": job, "prompt": "a digit", "seed": 2}
    with inference_server(strict) as url, _control(settings, url) as control, \
            httpx.Client(base_url=url, timeout=60) as direct:
        assert control.post("/generate", json=body, headers=owner).status_code == 200  # the token's one request
        proxied = control.post("/generate", json=body, headers=owner)
        straight = direct.post("/generate", json=body, headers=owner)
    for res in (proxied, straight):
        assert res.status_code == 429, res.text
        assert res.headers["content-type"] == "application/json"
        assert 1 <= int(res.headers["retry-after"]) <= 60
    assert proxied.json()["error"]["code"] == straight.json()["error"]["code"] == "rate_limited"


def test_the_inference_role_serves_only_generate_and_health(inference, owner):
    assert inference.get("/jobs", headers=owner).status_code == 404
    assert inference.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).status_code == 404
    assert inference.get("/jobs").status_code == 401  # the edge still asks for a token first
    metrics = _metrics(inference, owner)
    assert "flashdmd_generate_inflight" in metrics
    assert not any(name.startswith("flashdmd_jobs") for name in metrics), "job gauges belong to the control plane"
    assert inference.post("/generate", json={"prompt": "x", "job": "j"}).status_code == 401


def test_the_control_plane_answers_auth_and_validation_itself(settings, owner):
    silent = _listener()  # accepts connections (the kernel does) but never answers
    silent.setblocking(False)
    try:
        with _control(settings, _url(silent)) as control:
            res = control.post("/generate", json={"job": "j", "prompt": "x"})
            assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
            res = control.post("/generate", json={"job": "j", "prompt": "x"},
                               headers={"Authorization": "Bearer fdmd_not-a-token"})
            assert res.status_code == 401
            res = control.post("/generate", json={"job": "j", "seed": -1}, headers=owner)
            assert res.status_code == 422 and set(res.json()["error"]["fields"]) == {"prompt", "seed"}
            with pytest.raises(BlockingIOError):
                silent.accept()  # nobody connected: none of these reached the inference tier
    finally:
        silent.close()


def test_an_inference_tier_that_is_down_or_silent_gives_503_with_retry_after(settings, owner):
    silent = _listener()
    closed = _listener()
    down = _url(closed)
    closed.close()  # nothing listens there any more: connections are refused
    body = {"job": "j_" + "1" * 16, "prompt": "a digit"}
    try:
        for url, words in ((down, "unavailable"), (_url(silent), "did not answer within 0.5 s")):
            with _control(settings, url, inference_timeout_seconds=0.5, inference_retry_after_seconds=7) as control:
                res = control.post("/generate", json=body, headers=owner)
                assert res.status_code == 503, res.text
                assert res.headers["retry-after"] == "7"
                error = res.json()["error"]
                assert error["code"] == "inference_unavailable" and words in error["message"]
                assert "127.0.0.1" not in error["message"], "the upstream address is not the client's business"
    finally:
        silent.close()


def test_the_inflight_gauge_counts_generate_requests_while_they_run(sessions):
    obs = Observability(sessions, jobs=False)
    seen: list[float | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(obs.registry.get_sample_value("flashdmd_generate_inflight"))

    async def requests() -> None:
        middleware = LatencyMiddleware(app, obs)
        for path in ("/generate", "/jobs", "/generate"):
            await middleware({"type": "http", "method": "POST", "path": path}, None, None)

    asyncio.run(requests())
    assert seen == [1.0, 0.0, 1.0]
    assert obs.registry.get_sample_value("flashdmd_generate_inflight") == 0.0


def test_serve_refuses_the_control_role_without_an_inference_url(monkeypatch):
    monkeypatch.setenv("FLASHDMD_ROLE", "all")  # `serve` exports its role for uvicorn's workers: undone after
    monkeypatch.delenv("FLASHDMD_INFERENCE_URL", raising=False)
    res = CliRunner().invoke(cli, ["serve", "--role", "control"])
    assert res.exit_code != 0 and "FLASHDMD_INFERENCE_URL" in res.output
    monkeypatch.setenv("FLASHDMD_ROLE", "sideways")
    res = CliRunner().invoke(cli, ["serve"])
    assert res.exit_code == 2 and "sideways" in res.output


@pytest.mark.slow
def test_flashdmd_up_serves_generate_in_process_whatever_the_environment(tmp_path: Path):
    closed = _listener()
    nowhere = _url(closed)
    closed.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDMD_")}
    # Left over from a shell that talks to a cluster: `up` must not become a control plane for a missing tier.
    env.update(FLASHDMD_ROLE="control", FLASHDMD_INFERENCE_URL=nowhere)
    port_sock = _listener()
    port = port_sock.getsockname()[1]
    port_sock.close()
    data_dir = tmp_path / "flashdmd"
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "api", "up", "--data-dir", str(data_dir), "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            def healthy() -> bool:
                assert up.poll() is None, (tmp_path / "up.log").read_text()
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 90, 0.3, "flashdmd up")
            headers = {"Authorization": f"Bearer {(data_dir / 'token').read_text().strip()}"}
            res = http.post("/generate", json={"checkpoint": "/nowhere/at/all", "prompt": "x"}, headers=headers)
            # Judged by the in-process route (a forwarded request would get 503 inference_unavailable).
            assert res.status_code == 422 and res.json()["error"]["code"] == "path_not_allowed", res.text
            assert http.get("/jobs", headers=headers).status_code == 200
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
