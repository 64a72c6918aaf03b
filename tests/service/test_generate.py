"""POST /generate against the real app (Postgres, auth, the job's checkpoint rows) and real tiny checkpoints."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading

import pytest
from PIL import Image
from servicekit import TINY_SPEC

from api.ingest import RunIngestor
from api.routes.generate import Limiter, runtime
from inference.testing import make_checkpoint
from trainer.sink import JsonlSink
from trainer.tiny import tiny_pipeline_dir

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def owner(new_token):
    return new_token()


@pytest.fixture(scope="module")
def job(client, owner, settings, sessions, tmp_path_factory):
    """A job whose run directory holds a (full-UNet, tiny SDXL) checkpoint, ingested like the worker does."""
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    run_dir = settings.run_dir(job_id)
    ckpt = make_checkpoint(run_dir, "sdxl", teacher)
    sink = JsonlSink(run_dir)
    sink.save_checkpoint(7, ckpt, {"generator": "unet"})
    sink.close()
    RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir).drain()
    return job_id


@pytest.fixture(scope="module")
def sd3_path(roots, tmp_path_factory):
    """A LoRA checkpoint (tiny SD3) under an allowed model root, addressed by path."""
    teacher = tiny_pipeline_dir("sd3", cache_root=tmp_path_factory.mktemp("tiny3"))
    return make_checkpoint(roots["models"] / "sd3-run", "sd3", teacher, lora={"rank": 4, "alpha": 2.0})


def _post(client, owner, **body):
    return client.post("/generate", json={"prompt": "a handwritten digit seven", **body}, headers=owner)


def test_png_for_a_job_is_deterministic_per_seed(client, owner, job):
    first = _post(client, owner, job=job, seed=5)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-seed"] == "5" and first.headers["x-checkpoint"] == f"{job}/step-00000007"
    assert first.headers["x-steps"] == "4"
    img = Image.open(io.BytesIO(first.content))
    assert img.format == "PNG" and img.size == (32, 32)
    again = _post(client, owner, job=job, seed=5)
    assert again.content == first.content
    assert _post(client, owner, job=job, seed=6).content != first.content
    random_seed = _post(client, owner, job=job)
    assert random_seed.status_code == 200 and int(random_seed.headers["x-seed"]) >= 0


@pytest.mark.parametrize("fmt, pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_formats_from_a_lora_checkpoint_path(client, owner, sd3_path, fmt, pil):
    res = _post(client, owner, checkpoint=str(sd3_path.parent.parent), seed=1, format=fmt, width=48, height=32)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == f"image/{fmt}"
    img = Image.open(io.BytesIO(res.content))
    assert img.format == pil and img.size == (48, 32)


def test_several_images_come_back_as_json_with_seeds(client, owner, job):
    res = _post(client, owner, job=job, seed=40, num_images=3, format="webp")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["checkpoint"] == f"{job}/step-00000007" and body["steps"] == 4 and body["format"] == "webp"
    assert [im["seed"] for im in body["images"]] == [40, 41, 42]
    datas = [base64.b64decode(im["data"]) for im in body["images"]]
    assert all(Image.open(io.BytesIO(d)).format == "WEBP" for d in datas)
    single = _post(client, owner, job=job, seed=41, format="webp")
    assert single.content == datas[1], "an image depends on its seed only, not on the batch"


def test_accept_picks_bytes_or_json_and_the_default_is_unchanged(client, owner, job):
    # Three requests only: the module's other tests share this token's /generate rate budget.
    def post(accept: str, n: int):  # noqa: ANN202
        return client.post("/generate", json={"prompt": "a handwritten digit seven", "job": job, "seed": 9,
                                              "num_images": n}, headers={**owner, "Accept": accept})

    raw = post("image/png", 1)
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png" and raw.headers["x-seed"] == "9"
    as_json = post("application/json", 1)  # one image as JSON: what a script that always parses JSON wants
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    assert base64.b64decode(as_json.json()["images"][0]["data"]) == raw.content
    several = post("image/png", 2)  # two images cannot be one PNG body: refused before any work
    assert several.status_code == 406 and several.json()["error"]["fields"] == ["num_images"]


@pytest.mark.parametrize("accept, n, want", [
    (None, 1, False), (None, 2, True),  # no header: as before negotiation existed
    ("*/*", 1, False), ("*/*", 2, True),  # httpx's and curl's default
    ("image/png, application/json;q=0.5", 2, True),  # JSON is still acceptable for several images
    ("application/json;q=0.2, image/*", 1, False),
    ("application/json, image/png;q=0.5", 1, True),
])
def test_the_accept_header_is_weighed_by_q(accept, n, want):
    from api.routes.generate import _answer_as_json

    assert _answer_as_json(accept, "image/png", n) is want


@pytest.mark.parametrize("accept, n", [("image/png", 2), ("text/html", 1), ("image/webp", 1)])
def test_an_unacceptable_accept_is_406_naming_the_field(accept, n):
    from api.errors import APIError
    from api.routes.generate import _answer_as_json

    with pytest.raises(APIError) as err:
        _answer_as_json(accept, "image/png", n)
    assert err.value.status == 406 and "application/json" in err.value.message


@pytest.mark.parametrize("body, fields", [
    ({"steps": 3}, ["steps"]),
    ({"width": 33}, ["width"]),
    ({"height": 8192}, ["height"]),
    ({"format": "gif"}, ["format"]),
    ({"num_images": 0}, ["num_images"]),
    ({"num_images": 5}, ["num_images"]),
    ({"width": 2048, "height": 2048, "num_images": 2}, ["num_images"]),  # the per-request pixel budget
    ({"prompt": ""}, ["prompt"]),
    ({"prompt": "x" * 2001}, ["prompt"]),
    ({"negative_prompt": "blurry"}, ["negative_prompt"]),
    ({"guidance_scale": 0.5}, ["guidance_scale"]),
    ({"seed": -1}, ["seed"]),
    ({"colour": "red"}, ["colour"]),
])
def test_bad_input_is_422_naming_the_field(client, owner, job, body, fields):
    res = _post(client, owner, job=job, **body)
    assert res.status_code == 422, res.text
    assert res.json()["error"]["fields"] == fields


def test_checkpoint_must_be_one_thing_under_the_allowed_roots(client, owner, job, roots, sd3_path):
    res = _post(client, owner, job=job, checkpoint=str(sd3_path))
    assert res.status_code == 422 and res.json()["error"]["fields"] == ["checkpoint", "job"]
    assert _post(client, owner).json()["error"]["fields"] == ["checkpoint", "job"]
    for path in (str(roots["outside"]), "relative/path", str(roots["models"]) + "/../outside"):
        res = _post(client, owner, checkpoint=path)
        assert res.status_code == 422 and res.json()["error"]["code"] == "path_not_allowed", path
    res = _post(client, owner, checkpoint=str(roots["models"] / "missing"))
    assert res.status_code == 422 and res.json()["error"]["fields"] == ["checkpoint"]
    orphan = roots["models"] / "orphan" / "checkpoints" / "step-00000001"
    shutil.copytree(sd3_path, orphan)
    meta = json.loads((orphan / "meta.json").read_text())
    (orphan / "meta.json").write_text(json.dumps({**meta, "teacher": str(roots["models"] / "gone")}))
    res = _post(client, owner, checkpoint=str(orphan))
    assert res.status_code == 422 and res.json()["error"]["fields"] == ["checkpoint"]
    assert "teacher" in res.json()["error"]["message"]


def test_jobs_are_private_and_need_a_checkpoint(client, owner, new_token, job):
    assert _post(client, new_token(), job=job).status_code == 404
    assert _post(client, owner, job="nope").status_code == 404
    assert client.post("/generate", json={"job": job, "prompt": "x"}).status_code == 401
    fresh = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    res = _post(client, owner, job=fresh)
    assert res.status_code == 409 and res.json()["error"]["fields"] == ["job"]


def test_a_burst_beyond_the_limit_gets_503_with_retry_after(client, owner, job):
    rt = runtime(client.app)
    saved = rt.limiter
    rt.limiter = Limiter(concurrency=1, queue=1, timeout=60, retry_after=7)
    results: list = []
    barrier = threading.Barrier(6)

    def fire() -> None:
        barrier.wait()
        results.append(_post(client, owner, job=job, seed=1, num_images=4))

    try:
        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        rt.limiter = saved
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 3, codes
    assert set(codes) <= {200, 503}
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "7" and busy.json()["error"]["code"] == "overloaded"
    assert _post(client, owner, job=job, seed=1).status_code == 200, "the service recovers after the burst"
