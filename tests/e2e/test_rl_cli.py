"""Stage 2 as a user runs it: `flashdmd train presets/tiny-sdxl-rl.yaml`, init from stage 1, resume, and HTTP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.sink import read_metrics

pytestmark = pytest.mark.e2e

RL_KEYS = ("loss/rl", "rl/reward_gap", "rl/reward_mean", "rl/kept_frac", "rl/H", "grad_norm/rl")
PRESET = "presets/tiny-sdxl-rl.yaml"


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _fast(steps: int, every: int | None = None) -> list[str]:
    every = every or steps
    return ["--set", f"train.max_steps={steps}", "--set", f"train.checkpoint_every={every}",
            "--set", f"train.sample_every={every}", "--set", "train.num_samples=2"]


def test_rl_preset_runs_logs_rl_metrics_and_checkpoint_loads_in_diffusers(run_cli, cli_env, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(PRESET, "--run-dir", str(run_dir), *_fast(5))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        for key in RL_KEYS:
            assert key in r["metrics"], (r["step"], key)
    assert rows[0]["metrics"]["loss/rl"] == pytest.approx(math.log(2), abs=1e-9), "policy = reference at step 1"
    turns = [r["step"] for r in rows if r["metrics"]["distill_turn"] == 1.0]
    assert turns == [5], "ratio 5: one distillation update after every five RL updates"
    assert "loss/dm" in rows[4]["metrics"] and "loss/disc" in rows[4]["metrics"], "Pixel-GAN on by default"
    assert "eval/reward" in rows[-1]["metrics"]
    events = _events(run_dir)
    warned = {e["data"].get("field") for e in events if e["kind"] == "warning"}
    assert warned == {"rl.init_from", "rl.reward.path"}
    assert events[-1]["kind"] == "finished"

    ckpt = run_dir / "checkpoints" / "step-00000005"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 5 and meta["generator"] == "unet" and meta["timesteps"] == [999, 749, 499, 249]
    assert json.loads((ckpt / "rl.json").read_text())["rl_timesteps"] == [999, 749]
    import diffusers

    from trainer.tiny import tiny_pipeline_dir

    unet = diffusers.UNet2DConditionModel.from_pretrained(ckpt / "unet")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir("sdxl", cli_env["FLASHDMD_CACHE"]),
                                                               unet=unet)
    img = pipe("a handwritten digit three", num_inference_steps=4, guidance_scale=0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3)


def test_rl_initialises_from_a_stage1_run_and_resumes(run_cli, tmp_path):
    stage1 = tmp_path / "stage1"
    res = run_cli("presets/tiny-sdxl.yaml", "--run-dir", str(stage1), *_fast(2))
    assert res.returncode == 0, res.stderr[-3000:]

    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # stop after the first step, then resume
    args = (PRESET, "--run-dir", str(run_dir), "--set", f"rl.init_from={stage1}", "--set", "rl.ratio=2",
            *_fast(3, every=100))
    res = run_cli(*args)
    assert res.returncode == 3, res.stderr[-3000:]
    init = [e for e in _events(run_dir) if e["kind"] == "init"]
    assert init and init[0]["data"]["path"].endswith("step-00000002")
    assert set(init[0]["data"]["networks"]) == {"generator", "fake_score", "discriminator"}
    assert "rl.init_from" not in {e["data"].get("field") for e in _events(run_dir) if e["kind"] == "warning"}

    (run_dir / "STOP").unlink()
    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3], "no duplicate and no gap after the resume point"
    assert rows[0]["metrics"]["loss/rl"] == pytest.approx(math.log(2), abs=1e-9)
    assert rows[1]["metrics"]["distill_turn"] == 1.0
    started = [e for e in _events(run_dir) if e["kind"] == "started"]
    assert started[-1]["data"]["step"] == 1 and started[-1]["data"]["resumed"]


def test_bad_init_and_bad_reward_are_clear_errors(run_cli, tmp_path):
    res = run_cli(PRESET, "--run-dir", str(tmp_path / "a"), "--set", f"rl.init_from={tmp_path}/nope")
    assert res.returncode == 2 and "rl.init_from: no such folder" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(PRESET, "--run-dir", str(tmp_path / "b"), "--set", "rl.timesteps=[249]")
    assert res.returncode == 2 and "last step 249" in res.stderr


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rl_job_over_http_with_flashdmd_up(tmp_path):
    import httpx

    data_dir, port = tmp_path / "flashdmd", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDMD_")}
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen([str(Path(sys.executable).with_name("flashdmd")), "up", "--data-dir", str(data_dir),
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    spec = {"kind": "rl", "model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"},
            "distill": {"discriminator": {"backbone": "tiny"}, "real_guidance": 2.0},
            "rl": {"threshold_min": 0.0, "threshold_max": 0.0, "ratio": 2},
            "train": {"max_steps": 3, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 3,
                      "sample_every": 3, "num_samples": 2}}
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert up.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 120, "flashdmd up")
        token = (data_dir / "token").read_text().strip()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            bad = http.post("/jobs", json={"spec": {**spec, "rl": {"timesteps": [249]}}})
            assert bad.status_code == 422 and "last step" in bad.text
            created = http.post("/jobs", json={"spec": spec})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            assert created.json()["kind"] == "rl"

            def finished() -> dict | None:
                job = http.get(f"/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = _wait(finished, 480, "the rl job")
            assert job["status"] == "succeeded", (job, log_path.read_text()[-4000:])
            metrics = http.get(f"/jobs/{job_id}/metrics", params={"key": "loss/rl"}).json()
            assert [p["step"] for p in metrics["points"]] == [1, 2, 3]
            for key in ("rl/reward_gap", "rl/reward_mean", "rl/kept_frac"):
                assert key in metrics["keys"], key
            assert [c["step"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["data"]] == [3]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
