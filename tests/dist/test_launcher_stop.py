"""SIGTERM through the launcher, as the service starts it (api/proc.py: trainer_command + spawn).

`accelerate launch` forwards SIGTERM to every rank and SIGKILLs them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
later (torch's default: 30). The ranks finish the step, write the stop checkpoint and exit; the service
raises that window (api/proc.py launcher_env) so that an SDXL-sized checkpoint fits in it. Here rank 0
takes 40 s to write its checkpoint (a test hook standing in for ~10 GB of weights): with the default
window the launcher would kill it half-way, leaving no checkpoint and no `stopped` event.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import REPO, free_port
from distkit import TINY

from trainer.sink import read_metrics

pytestmark = pytest.mark.slow


def _events(run_dir) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_to_the_launcher_drains_to_a_resumable_checkpoint(launch, dist_env, tmp_path, monkeypatch):
    from api.proc import spawn, trainer_command
    from trainer.jobspec import load_spec

    spec = load_spec(REPO / TINY[0], [a for a in TINY[1:] if a != "--set"] + [
        "train.max_steps=200", "train.checkpoint_every=1000", "train.batch_size=2"])
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    for key, value in {**dist_env, "PET_MASTER_PORT": str(free_port()),  # torchrun's --master_port
                       "FLASHDMD_TEST_SLOW_CHECKPOINT_S": "40"}.items():
        monkeypatch.setenv(key, value)
    cmd = trainer_command(spec_path=spec_path, run_dir=run_dir, resume=False, num_processes=2)
    assert cmd[1] == "launch"
    proc = spawn(cmd, cwd=REPO, log_path=tmp_path / "trainer.log", job_id="sigterm-test", attempt=1)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)  # what the runner's escalation and a host's stop send
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "trainer.log").read_text()
    stopped = _events(run_dir)[-1]
    assert stopped["kind"] == "stopped", log[-3000:]
    step = stopped["data"]["step"]
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (ckpt / "meta.json").is_file() and (ckpt / "state").is_dir()
    # Resumable: the same spec continues from the stop checkpoint for one more step.
    monkeypatch.delenv("FLASHDMD_TEST_SLOW_CHECKPOINT_S")
    res = launch(2, str(spec_path), "--set", f"train.max_steps={step + 1}", "--run-dir", str(run_dir), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    started = [e for e in _events(run_dir) if e["kind"] == "started"]
    assert started[-1]["data"]["step"] == step and started[-1]["data"]["resumed"]
    assert [r["step"] for r in read_metrics(run_dir)][-1] == step + 1
