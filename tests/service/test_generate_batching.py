"""Dynamic batching of POST /generate, against the real app and real tiny SDXL checkpoints.

The app here batches generously (max_wait 600 ms) so that a burst fired from threads lands in one
window even on busy CPUs; merging is counted by the app's own batch-size metric, read from /metrics.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from servicekit import burst

from api.auth import create_token
from api.generate_limits import Limiter
from api.main import create_app
from api.routes.generate import runtime
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service
MAX_BATCH = 8


@pytest.fixture(scope="module")
def checkpoints(roots, tmp_path_factory) -> tuple[str, str]:
    """Two tiny SDXL checkpoints of the same teacher that differ in their weights (seeded perturbations)."""
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    base = roots["models"] / f"batching-{secrets.token_hex(3)}"
    return (str(make_checkpoint(base / "a", "sdxl", teacher, seed=1)),
            str(make_checkpoint(base / "b", "sdxl", teacher, seed=2)))


@pytest.fixture(scope="module")
def app_client(settings) -> Iterator[TestClient]:
    # The per-token rate and share are tested elsewhere; here one token sends every burst.
    app = create_app(settings.model_copy(update={
        "generate_rate_burst": 1000, "generate_owner_share": 1.0, "generate_max_batch": MAX_BATCH,
        "generate_max_wait_ms": 600, "generate_max_concurrency": 1, "generate_max_queue": 16,
        "generate_device": "cpu"}))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def headers(app_client, settings) -> dict[str, str]:
    with app_client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        _, token = create_token(session=session, name="batching", prefix=settings.token_prefix)
    return {"Authorization": f"Bearer {token}"}


def _metrics(client: TestClient, headers: dict[str, str]) -> dict[str, float]:
    res = client.get("/metrics", headers=headers)
    assert res.status_code == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _burst(client: TestClient, headers: dict[str, str], bodies: list[dict[str, Any]]) -> list[Any]:
    return burst(client.post, [(headers, body) for body in bodies])


def _alone(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    res = client.post("/generate", json=body, headers=headers)
    assert res.status_code == 200, res.text
    return res.content


def test_a_burst_shares_sampler_calls_and_each_request_keeps_its_own_bytes(app_client, headers, checkpoints):
    a, _ = checkpoints
    bodies = [{"checkpoint": a, "prompt": f"digit {i % 3}", "seed": 100 + i} for i in range(5)]
    bodies.append({"checkpoint": a, "prompt": "digit 9", "seed": 200, "num_images": 2, "format": "webp"})
    alone = [_alone(app_client, headers, b) for b in bodies]  # one request at a time: no one to batch with
    assert len(set(alone)) == len(alone)
    before = _metrics(app_client, headers)
    responses = _burst(app_client, headers, bodies)
    after = _metrics(app_client, headers)
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    for i, (res, ref) in enumerate(zip(responses, alone, strict=True)):
        assert res.content == ref, f"request {i}: its bytes changed when batched"
    calls = after["flashdmd_generate_batch_images_count"] - before["flashdmd_generate_batch_images_count"]
    images = after["flashdmd_generate_batch_images_sum"] - before["flashdmd_generate_batch_images_sum"]
    assert images == 7, images  # every image counted once, padding rows not at all
    assert calls <= 3, f"6 concurrent requests took {calls} sampler calls: they were not merged"
    waited = after["flashdmd_generate_queue_seconds_count"] - before["flashdmd_generate_queue_seconds_count"]
    assert waited == len(bodies)
    assert after["flashdmd_generate_model_seconds_count"] - before["flashdmd_generate_model_seconds_count"] == calls
    assert after["flashdmd_generate_pipeline_cache_total{result=hit}"] >= calls
    assert after["flashdmd_generate_pipeline_cache_total{result=miss}"] >= 1


def test_a_mixed_checkpoint_burst_never_mixes_images(app_client, headers, checkpoints):
    a, b = checkpoints
    body = {"prompt": "a digit seven", "seed": 7}
    ref = {ck: _alone(app_client, headers, {**body, "checkpoint": ck}) for ck in (a, b)}
    assert ref[a] != ref[b], "the two checkpoints must give different images for the test to mean anything"
    order = [a, b, b, a, b, a, a, b]
    before = _metrics(app_client, headers)
    responses = _burst(app_client, headers, [{**body, "checkpoint": ck} for ck in order])
    after = _metrics(app_client, headers)
    for ck, res in zip(order, responses, strict=True):
        assert res.status_code == 200, res.text
        assert res.content == ref[ck], "an image came from the other checkpoint, or from a mixed batch"
    calls = after["flashdmd_generate_batch_images_count"] - before["flashdmd_generate_batch_images_count"]
    assert 2 <= calls <= 4, calls  # one call per checkpoint (a straggler may take its own)


def test_a_saturated_queue_answers_503_with_retry_after(app_client, headers, checkpoints):
    a, _ = checkpoints
    rt = runtime(app_client.app)
    saved = rt.limiter
    rt.limiter = Limiter(concurrency=1, queue=1, timeout=60, retry_after=9)
    try:
        responses = _burst(app_client, headers, [{"checkpoint": a, "prompt": "x", "seed": i} for i in range(6)])
    finally:
        rt.limiter = saved
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 3 and set(codes) <= {200, 503}, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "9" and busy.json()["error"]["code"] == "overloaded"
    assert rt.batcher.queued == 0
    assert _alone(app_client, headers, {"checkpoint": a, "prompt": "x", "seed": 1}), "it recovers after the burst"
