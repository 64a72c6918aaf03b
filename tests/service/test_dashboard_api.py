"""What the dashboard reads from the API: YAML specs, sample captions, checkpoint formats and step counts,
the worker's system sample on the heartbeat, the ETA of a stopping job, and a favicon without a token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from servicekit import TINY_SPEC
from sqlalchemy import update

from api.db import utcnow
from api.ingest import RunIngestor, sample_meta
from api.models import Checkpoint, Job
from api.runner import Attempt, claim_job

pytestmark = pytest.mark.service
YAML = {"Content-Type": "application/yaml"}


def _job(client, auth) -> str:  # noqa: ANN001
    return client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"]


def test_a_yaml_spec_becomes_the_json_post_jobs_takes(client, auth) -> None:
    text = ("kind: distill\nmodel: {teacher: 'tiny:sdxl'}\ndata:\n  builtin: digits\ntrain:\n  max_steps: 6\n"
            "optim:\n  generator: {lr: 1e-4}\n")
    reply = client.post("/specs/parse", content=text.encode(), headers={**auth, **YAML})
    assert reply.status_code == 200, reply.text
    spec = reply.json()["spec"]
    assert spec["optim"] == {"generator": {"lr": 1e-4}}  # 1e-4 a number, as `flashdmd train` reads it
    assert client.post("/jobs", json={"spec": spec}, headers=auth).status_code == 201


@pytest.mark.parametrize(("text", "field", "words"), [
    ("a: &x [1, 2]\nb: *x\n", "spec", "aliases"),
    ("train:\n  seed: 2024-01-01\n", "spec.train.seed", "date"),
    ("train: {max_steps: .inf}\n", "spec.train.max_steps", "not a JSON number"),
    ("1: one\n", "spec.1", "keys must be strings"),
    ("- a list\n", "spec", "must be a mapping"),
    ("a: 1\n---\nb: 2\n", "spec", "line 2"),
    ("model:\n  teacher: [tiny\n", "spec", "line 3"),
    ("a: " + "[" * 50_000, "spec", "nested deeper"),  # before the recursive composer could overflow
    ("a: !!binary aGVsbG8=\n", "spec.a", "bytes is not a JSON value"),
])
def test_a_bad_yaml_spec_is_refused_naming_the_field(client, auth, text: str, field: str, words: str) -> None:
    reply = client.post("/specs/parse", content=text.encode(), headers={**auth, **YAML})
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert error["fields"] == [field] and words in error["message"], error


def test_yaml_parsing_keeps_the_edge_rules(client, auth, settings) -> None:
    assert client.post("/specs/parse", content=b"a: 1\n", headers=YAML).status_code == 401
    wrong = client.post("/specs/parse", content=b"{}", headers={**auth, "Content-Type": "application/json"})
    assert wrong.status_code == 415 and wrong.json()["error"]["fields"] == ["Content-Type"]
    big = b"a: '" + b"x" * settings.max_body_bytes + b"'\n"
    assert client.post("/specs/parse", content=big, headers={**auth, **YAML}).status_code == 413


def test_favicon_needs_no_token(client) -> None:
    reply = client.get("/favicon.ico")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("image/svg+xml")


def test_samples_carry_their_prompts_and_checkpoints_their_formats(client, auth, sessions, settings) -> None:
    job_id = _job(client, auth)
    run_dir = settings.run_dir(job_id)
    samples, ckpts = run_dir / "samples", run_dir / "checkpoints"
    samples.mkdir(parents=True)
    (samples / "step-00000002.png").write_bytes(b"png")
    cells = [{"prompt": "a digit one", "seed": 0, "row": 0, "col": 0}, {"prompt": "a digit two", "seed": 1, "row": 0, "col": 1}]
    (samples / "step-00000002.json").write_text(json.dumps({"step": 2, "cells": cells, "grids": []}))
    (samples / "step-00000004.png").write_bytes(b"png")  # no JSON (an older trainer): no captions
    for step, meta in ((2, {"generator": "unet", "num_steps": 4, "timesteps": [999, 749, 499, 249]}),
                       (4, {"generator": "lora", "num_steps": 4, "timesteps": [999, 749, 499, 249],
                            "step_sets": {"2": [999, 499]}})):
        folder = ckpts / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, **meta}))
    RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir, since=0).drain()  # the worker's ingest

    listed = client.get(f"/jobs/{job_id}/samples", headers=auth).json()["data"]
    assert [s["cells"] for s in listed] == [cells, []]
    full, lora = client.get(f"/jobs/{job_id}/checkpoints", headers=auth).json()["data"]
    assert full["formats"] == ["diffusers", "unet"] and full["steps"] == [4]  # no LoRA in a full-weight one
    assert lora["formats"] == ["diffusers", "unet", "lora", "lora-kohya"] and lora["steps"] == [2, 4]
    with sessions() as session:
        assert session.get(Checkpoint, (job_id, 4)).meta["generator"] == "lora"


def test_sample_meta_is_empty_without_a_readable_json(tmp_path) -> None:
    png = tmp_path / "step-00000001.png"
    assert sample_meta(png) == {}
    png.with_suffix(".json").write_text('{"cells": [{"prompt": 3}]}')  # a cell without a seed
    assert sample_meta(png) == {}


def test_the_heartbeat_carries_the_system_sample(client, auth, sessions, settings) -> None:
    job_id = _job(client, auth)
    with sessions() as session:
        claim = claim_job(session=session, job_id=job_id, worker="w")
    attempt = Attempt(settings, sessions, claim)
    # A real child standing in for the trainer: a process tree that holds memory and burns CPU.
    # Written bytes (zeroed pages would not be resident); "ready" once they are.
    attempt.proc = subprocess.Popen([sys.executable, "-c", "x = b'x' * (64 << 20)\nprint('ready', flush=True)\n"
                                     "while True: pass"], stdout=subprocess.PIPE, text=True)
    try:
        assert attempt.proc.stdout.readline().strip() == "ready"
        assert client.get(f"/jobs/{job_id}", headers=auth).json()["system"] is None
        for _ in range(2):  # the CPU share needs two readings
            assert attempt._heartbeat() is False
        system = client.get(f"/jobs/{job_id}", headers=auth).json()["system"]
    finally:
        attempt.proc.kill()
        attempt.proc.wait()
    assert system["device"] == "cpu" and system["cpu_count"] >= 1
    assert system["process"]["rss_bytes"] > 64 << 20  # the child's bytes are resident
    assert 0 <= system["process"]["cpu_percent"] <= 100
    assert 0 < system["ram_used_bytes"] < system["ram_total_bytes"]


def test_a_stopping_job_has_no_eta(client, auth, sessions) -> None:
    job_id = _job(client, auth)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            status="running", progress_step=2, progress_rate=1.0, started_at=utcnow()))
        session.commit()
    assert client.get(f"/jobs/{job_id}", headers=auth).json()["progress"]["eta"] == 4.0  # 6 - 2 steps at 1/s
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelling"))
        session.commit()
    assert client.get(f"/jobs/{job_id}", headers=auth).json()["progress"]["eta"] is None
