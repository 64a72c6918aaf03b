"""POST /generate under hostile requests: the work bound, the wall-clock limit of a sampler call, the token's
share of work, one request never holding every slot, and admission defaults that let a batch fill."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time

import pytest
from fastapi.testclient import TestClient
from servicekit import make_settings

from api.batcher import Batcher
from api.generate_limits import Limiter, RateLimited
from api.main import create_app
from api.routes.generate import Runtime, runtime
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def checkpoint(roots, tmp_path_factory):
    """A tiny SDXL checkpoint trained at 32 px (its K is 4)."""
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    return make_checkpoint(roots["models"] / f"bounds-{secrets.token_hex(3)}", "sdxl", teacher)


def _post(client, headers, checkpoint, **body):
    return client.post("/generate", json={"checkpoint": str(checkpoint), "prompt": "a digit", "seed": 1, **body},
                       headers=headers)


def test_work_beyond_the_budget_is_a_422_naming_the_fields(client, auth, checkpoint) -> None:
    """a request within the size limits but 64x the training pixels of a 32 px checkpoint held the
    only slot for minutes. Work (images x pixels / training pixels x steps) is bounded per request."""
    big = _post(client, auth, checkpoint, width=256, height=256)  # 64 x 32^2 pixels, 4 steps: 256 units
    assert big.status_code == 422, big.text
    error = big.json()["error"]
    assert error["fields"] == ["width", "height"] and "FLASHDMD_GENERATE_MAX_WORK" in error["message"]
    many = _post(client, auth, checkpoint, width=128, height=64, num_images=4)  # 4 x 8 x 4 = 128: the top
    assert many.status_code == 200, many.text
    assert len(many.json()["images"]) == 4


def test_a_sampler_call_past_its_wall_clock_limit_is_stopped_and_frees_its_slot(database_url, roots, checkpoint,
                                                                                new_token) -> None:
    settings = make_settings(database_url, roots, generate_call_timeout_seconds=0.001)
    with TestClient(create_app(settings)) as client:
        auth = new_token()
        stopped = _post(client, auth, checkpoint)
        assert stopped.status_code == 503, stopped.text
        assert stopped.json()["error"]["code"] == "generation_timeout" and "retry-after" in stopped.headers
        rt = runtime(client.app)
        assert rt.limiter.admitted == 0 and rt.batcher.queued == 0  # nothing held on to the slot
        rt.settings = settings.model_copy(update={"generate_call_timeout_seconds": 60.0})
        assert _post(client, auth, checkpoint).status_code == 200  # the slot serves the next request


def test_a_tokens_share_applies_to_work_not_only_to_request_count() -> None:
    async def scenario() -> None:
        limiter = Limiter(1, 16, 60, 5, owner_share=0.5, work_capacity=128)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(limiter.place("a", 128))  # one large request always gets in
            with pytest.raises(RateLimited):
                await stack.enter_async_context(limiter.place("a", 4))  # but then a holds more than its share
            await stack.enter_async_context(limiter.place("b", 128))  # another token is not starved
            for _ in range(7):  # many small requests fit within a third token's share of the work (64)
                await stack.enter_async_context(limiter.place("c", 4))
        assert limiter.admitted == 0 and limiter.work_by_owner == {}

    asyncio.run(scenario())


def test_one_request_never_holds_more_than_one_sampler_slot() -> None:
    """A request of many images goes in chunks of max_batch; they ran all at once and took every slot."""
    running, peak, lock = [0], [0], threading.Lock()

    def run(_key, rows):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return list(rows)

    async def scenario() -> list[int]:
        batcher: Batcher[int, int] = Batcher(run, max_batch=2, max_wait=0.0, workers=3)
        return await batcher.submit("k", list(range(6)))

    assert asyncio.run(scenario()) == list(range(6))  # every row, in order
    assert peak[0] == 1


def test_default_admission_holds_a_full_batch_per_slot(database_url, roots) -> None:
    """Six concurrent clients at the defaults got 503: 1 slot + 4 waiting could never fill a batch of 8."""
    gs = make_settings(database_url, roots)
    rt = Runtime(gs)

    async def scenario() -> int:
        async with contextlib.AsyncExitStack() as stack:
            for owner in range(gs.generate_max_concurrency * gs.generate_max_batch):
                await stack.enter_async_context(rt.limiter.place(owner, 4.0))
            return rt.limiter.admitted

    assert asyncio.run(scenario()) == gs.generate_max_concurrency * gs.generate_max_batch
    # And one token alone can fill a batch (its share of the places is at least max_batch).
    assert rt.limiter.owner_cap >= gs.generate_max_batch
