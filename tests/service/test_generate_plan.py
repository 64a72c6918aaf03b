"""POST /generate resolves its checkpoint once: a cold request reads the checkpoint's meta.json once (at
validation), although it also loads the pipeline and estimates its size; the plan carries the info onward."""

from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service

_opened: list[str] = []
_counting = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Python's audit hook sees every open() in the process, whichever thread or library makes it: no code of
    # ours is replaced. Audit hooks cannot be removed, so this one counts only while the event is set.
    if event == "open" and _counting.is_set() and isinstance(args[0], str) and args[0].endswith("meta.json"):
        _opened.append(args[0])


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def checkpoint(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    return str(make_checkpoint(roots["models"] / f"plan-{secrets.token_hex(3)}", "sdxl", teacher, seed=5))


def _meta_reads(client: TestClient, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    _opened.clear()
    _counting.set()
    try:
        res = client.post("/generate", json=body, headers=headers)
    finally:
        _counting.clear()
    return len(_opened), res


def test_a_cold_request_reads_the_checkpoints_meta_once(settings, new_token, checkpoint) -> None:
    app = create_app(settings.model_copy(update={"generate_rate_burst": 1000, "generate_device": "cpu",
                                                 "generate_max_wait_ms": 0}))
    headers = new_token()
    with TestClient(app) as client:
        cold, res = _meta_reads(client, {"checkpoint": checkpoint, "prompt": "a digit", "seed": 1, "steps": 4},
                                headers)
        assert res.status_code == 200, res.text
        assert res.headers["x-steps"] == "4" and res.headers["x-seed"] == "1"
        assert cold == 1, f"meta.json read {cold} times for one cold request"
        warm, again = _meta_reads(client, {"checkpoint": checkpoint, "prompt": "a digit", "seed": 1}, headers)
        assert again.status_code == 200 and again.content == res.content
        assert warm == 1
        stats = app.state.generate_runtime.cache().stats
        assert (stats.loads, stats.hits) == (1, 1)
