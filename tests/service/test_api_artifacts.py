"""GET events, metrics, checkpoints and samples of a job whose run directory went through the worker's sink."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image
from servicekit import TINY_SPEC
from sqlalchemy import update

from api.ingest import RunIngestor
from api.models import Sample
from trainer.sink import JsonlSink

pytestmark = pytest.mark.service


@pytest.fixture
def run(client, auth, settings, sessions):
    """A job with 50 logged steps, two checkpoints, one sample image and a few events."""
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"]
    run_dir = settings.run_dir(job_id)
    sink = JsonlSink(run_dir)
    sink.log_event("started", "go", step=0, max_steps=50, resumed=False)
    for step in range(1, 51):
        sink.log_metrics(step, {"loss/dm": step / 100, "loss/disc": math.nan if step == 7 else 1.0})
    for step in (2, 4):
        folder = run_dir / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "generator": "unet", "num_steps": 4}))
        sink.save_checkpoint(step, folder, {"generator": "unet"})
    (run_dir / "samples").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    (run_dir / "samples" / "step-00000003.png").write_bytes(png.getvalue())
    sink.log_event("sample", "grid", step=3, path=str(run_dir / "samples" / "step-00000003.png"))
    sink.close()
    RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir).drain()
    return job_id, png.getvalue()


def test_metrics_pages(client, auth, run) -> None:
    job_id, _ = run
    url = f"/jobs/{job_id}/metrics"
    body = client.get(url, headers=auth).json()
    assert body["keys"] == ["loss/disc", "loss/dm"] and body["key"] == "loss/disc"  # first key by default
    assert len(body["points"]) == 50 and body["has_more"] is False
    assert body["points"][6] == {"step": 7, "wall_time": body["points"][6]["wall_time"], "value": None}  # NaN

    page = client.get(url, params={"key": "loss/dm", "since_step": 10, "limit": 5}, headers=auth).json()
    assert [p["step"] for p in page["points"]] == [11, 12, 13, 14, 15] and page["has_more"] is True
    assert page["points"][0]["value"] == pytest.approx(0.11)

    strided = client.get(url, params={"key": "loss/dm", "stride": 10}, headers=auth).json()
    assert [p["step"] for p in strided["points"]] == [1, 11, 21, 31, 41]
    # Paging a strided series: since_step = the last step returned keeps the rhythm.
    first = client.get(url, params={"key": "loss/dm", "stride": 10, "limit": 2}, headers=auth).json()
    rest = client.get(url, params={"key": "loss/dm", "stride": 10, "since_step": first["points"][-1]["step"]},
                      headers=auth).json()
    assert [p["step"] for p in first["points"] + rest["points"]] == [1, 11, 21, 31, 41]

    assert client.get(url, params={"key": "nope"}, headers=auth).json()["points"] == []
    for bad in ({"stride": 0}, {"limit": 0}, {"limit": 20001}, {"since_step": "x"}):
        response = client.get(url, params=bad, headers=auth)
        assert response.status_code == 422 and response.json()["error"]["fields"] == list(bad), bad


def test_events_page_with_after(client, auth, run) -> None:
    job_id, _ = run
    everything = client.get(f"/jobs/{job_id}/events", headers=auth).json()
    kinds = [e["kind"] for e in everything["data"]]
    assert kinds == ["queued", "started", "checkpoint", "checkpoint", "sample"]
    assert everything["data"][1]["data"] == {"step": 0, "max_steps": 50, "resumed": False}
    first = client.get(f"/jobs/{job_id}/events", params={"limit": 2}, headers=auth).json()
    assert first["has_more"] is True
    rest = client.get(f"/jobs/{job_id}/events", params={"after": first["data"][-1]["id"]}, headers=auth).json()
    assert [e["kind"] for e in first["data"] + rest["data"]] == kinds and rest["has_more"] is False


def test_checkpoints_and_samples_are_served(client, auth, run, settings) -> None:
    job_id, png = run
    ckpts = client.get(f"/jobs/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [c["step"] for c in ckpts] == [2, 4]
    assert ckpts[0]["path"] == str(settings.run_dir(job_id) / "checkpoints" / "step-00000002")
    assert ckpts[1]["meta"] == {"step": 4, "generator": "unet", "num_steps": 4}

    samples = client.get(f"/jobs/{job_id}/samples", headers=auth).json()["data"]
    assert [s["step"] for s in samples] == [3]
    assert samples[0]["url"].endswith(f"/jobs/{job_id}/samples/3")
    image = client.get(samples[0]["url"], headers=auth)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == png
    missing = client.get(f"/jobs/{job_id}/samples/4", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_sample_path_cannot_leave_the_run_directory(client, auth, run, sessions) -> None:
    job_id, _ = run
    with sessions() as session:
        session.execute(update(Sample).where(Sample.job_id == job_id).values(path="../../../../../etc/hostname"))
        session.commit()
    assert client.get(f"/jobs/{job_id}/samples/3", headers=auth).status_code == 404
