"""Serving settings of POST /generate reach the pipeline, and a smaller fixed batch keeps bytes.

FLASHDMD_GENERATE_FIXED_ROWS lets a lone CPU request pay for fewer rows than max_batch: batches then go in
calls of that many rows, and a request's bytes must still not depend on who shared its call.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from servicekit import burst

from api.auth import create_token
from api.main import create_app
from api.routes.generate import runtime
from inference.serving import ServingError
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def checkpoint(roots, tmp_path_factory) -> str:
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    return str(make_checkpoint(roots["models"] / f"serving-{secrets.token_hex(3)}", "sdxl", teacher, seed=3))


@pytest.fixture(scope="module")
def app_client(settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={
        "generate_rate_burst": 1000, "generate_owner_share": 1.0, "generate_fixed_rows": 2,
        "generate_fuse_qkv": True, "generate_warm_batches": "2",
        "generate_max_batch": 4, "generate_max_wait_ms": 600, "generate_max_concurrency": 1, "generate_max_queue": 16,
        "generate_device": "cpu"}))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def headers(app_client, settings) -> dict[str, str]:
    with app_client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        _, token = create_token(session=session, name="serving", prefix=settings.token_prefix)
    return {"Authorization": f"Bearer {token}"}


def test_fixed_rows_keep_each_requests_bytes_and_settings_reach_the_pipeline(app_client, headers, checkpoint):
    bodies = [{"checkpoint": checkpoint, "prompt": f"digit {i}", "seed": 10 + i} for i in range(3)]
    alone = []
    for body in bodies:
        res = app_client.post("/generate", json=body, headers=headers)
        assert res.status_code == 200, res.text
        alone.append(res.content)
    together = burst(app_client.post, [(headers, body) for body in bodies])
    assert [r.status_code for r in together] == [200, 200, 200]
    assert [r.content for r in together] == alone

    rt = runtime(app_client.app)
    pipe = rt.cache().get(checkpoint)
    assert pipe.options.fuse_qkv is True and pipe.options.channels_last is False  # set vs the CPU default
    assert pipe.options.warm_batches == (2,) and rt.fixed_rows() == 2


def test_an_impossible_serving_setting_is_named(app_client, settings):
    rt = runtime(app_client.app)
    rt.settings = settings.model_copy(update={"generate_vae": "tiny"})
    try:
        with pytest.raises(ServingError) as err:
            rt.serving_options("cpu")
        assert err.value.setting == "FLASHDMD_GENERATE_TINY_VAE_PATH"
    finally:
        rt.settings = app_client.app.state.settings


def test_a_misconfigured_server_answers_503_naming_the_setting(settings, headers, checkpoint):
    # The pipeline cache is built at the first request: an impossible FLASHDMD_GENERATE_* combination then
    # surfaces as a 503 naming the setting (the server's state), never a 500 with a traceback.
    app = create_app(settings.model_copy(update={"generate_vae": "tiny", "generate_rate_burst": 1000,
                                                 "generate_device": "cpu", "generate_max_wait_ms": 0}))
    with TestClient(app) as client:
        res = client.post("/generate", json={"checkpoint": checkpoint, "prompt": "a", "seed": 1}, headers=headers)
    assert res.status_code == 503, res.text
    assert "FLASHDMD_GENERATE_TINY_VAE_PATH" in res.json()["error"]["message"] and "Retry-After" in res.headers


def test_a_bad_serving_json_in_the_checkpoint_is_a_422(app_client, headers, checkpoint, roots):
    import json
    import shutil
    from pathlib import Path

    bad = roots["models"] / f"bad-serving-{secrets.token_hex(3)}"
    shutil.copytree(checkpoint, bad)
    (Path(bad) / "serving.json").write_text(json.dumps({"vae": "huge"}))
    res = app_client.post("/generate", json={"checkpoint": str(bad), "prompt": "a", "seed": 1}, headers=headers)
    assert res.status_code == 422, res.text
    assert "serving.json" in res.json()["error"]["message"] and res.json()["error"]["fields"] == ["checkpoint"]
