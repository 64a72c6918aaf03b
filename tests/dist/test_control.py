"""Rank-agreed control flow: a non-finite loss or a stop request seen by rank 1 alone; fp16's GradScaler."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from distkit import TINY

from trainer.sink import read_metrics

pytestmark = pytest.mark.slow


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_nonfinite_then_stop_on_rank_one_only(launch, tmp_path):
    # Rank 1 alone gets an infinite generator loss at update 1 (logged as step 2), and alone asks to stop
    # after step 3. Both ranks must skip the same update and stop at the same boundary: if rank 0 went on,
    # rank 1 would wait in a collective and the process-group timeout (90 s here) would fail the run.
    run_dir = tmp_path / "run"
    res = launch(2, *TINY, "--set", "train.max_steps=6", "--set", "train.checkpoint_every=100",
                 "--set", "train.batch_size=2", "--run-dir", str(run_dir),
                 env={"FLASHDMD_TEST_NONFINITE": "1:1", "FLASHDMD_TEST_STOP_AT": "1:3"}, timeout=200)
    # Each rank exits with code 3 (stopped); the launcher (torchrun under accelerate) reports any non-zero
    # rank as a failure, so the run's own record of the stop is the `stopped` event and both ranks' message.
    assert res.returncode != 0 and res.stderr.count("stopped on request at step 3") == 2, res.stderr[-3000:]
    rows = {r["step"]: r["metrics"] for r in read_metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3]
    assert rows[2]["skipped/generator"] == 1.0 and rows[1]["skipped/generator"] == 0.0
    assert rows[3]["skipped/generator"] == 0.0 and rows[2]["nonfinite/total"] == 1.0
    kinds = [e["kind"] for e in _events(run_dir)]
    assert "nonfinite" in kinds and kinds[-1] == "stopped"
    assert (run_dir / "checkpoints" / "step-00000003" / "meta.json").is_file()


def test_fp16_survives_a_forced_overflow(launch, tmp_path):
    # On a CPU an fp16 spec runs fp32 compute through a real GradScaler (trainer/parallel.py). An inf loss
    # at update 1 overflows the scaled gradients: the update is skipped, the scale drops, and the next
    # unscale must not raise (it did before: a skipped step never called scaler.update()).
    run_dir = tmp_path / "run"
    res = launch(1, *TINY, "--set", "train.mixed_precision=fp16", "--set", "train.max_steps=3",
                 "--set", "train.checkpoint_every=100", "--set", "train.batch_size=2", "--run-dir", str(run_dir),
                 env={"FLASHDMD_TEST_NONFINITE": "0:1"}, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["step"]: r["metrics"] for r in read_metrics(run_dir)}
    assert rows[2]["skipped/generator"] == 1.0 and rows[3]["skipped/generator"] == 0.0
    assert rows[2]["amp/scale"] < rows[1]["amp/scale"], "the overflow lowered the loss scale"
    assert rows[3]["skipped/fake_score"] == 0.0 and _events(run_dir)[-1]["kind"] == "finished"


@contextlib.contextmanager
def cpu_burner() -> Iterator[None]:
    """Another process spinning on a core for the duration: the loaded, shared 2-core host the stuck-rank
    test once failed on (the start-up barrier timed out under the short training timeout)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def test_a_stuck_rank_fails_the_run_with_a_clear_error_instead_of_hanging(launch, tmp_path):
    # Rank 1 hangs after step 2; rank 0 waits in the stop agreement until the training timeout (10 s
    # here), then fails the run with a message that says what happened; the launcher ends rank 1. Start-up
    # runs under its own timeout, so a slow start on a loaded host is not mistaken for a stuck rank.
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with cpu_burner():
        res = launch(2, *TINY, "--set", "train.max_steps=6", "--set", "train.checkpoint_every=100",
                     "--set", "train.batch_size=2", "--run-dir", str(run_dir),
                     env={"FLASHDMD_TEST_HANG_AT": "1:2", "FLASHDMD_DIST_TIMEOUT_S": "10"}, timeout=300)
    assert res.returncode != 0 and time.monotonic() - started < 250
    failed = _events(run_dir)[-1]
    assert failed["kind"] == "failed" and "did not join a collective within 10 s" in failed["message"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_a_slow_start_on_rank_zero_is_not_cut_off_by_the_training_timeout(launch, tmp_path):
    # Rank 0 takes 25 s before loading the teacher (a download), the training timeout is 10 s: the other
    # rank waits under the start-up timeout instead, and the run trains. It failed when the start-up
    # barrier ran under the training timeout.
    run_dir = tmp_path / "run"
    res = launch(2, *TINY, "--set", "train.max_steps=2", "--set", "train.checkpoint_every=100",
                 "--set", "train.batch_size=2", "--run-dir", str(run_dir),
                 env={"FLASHDMD_TEST_SLOW_START": "0:25", "FLASHDMD_DIST_TIMEOUT_S": "10"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _events(run_dir)[-1]["kind"] == "finished"


def test_a_rank_that_never_starts_fails_the_run_with_a_failed_event(launch, tmp_path):
    # Rank 1 is 120 s late; the start-up timeout is 5 s. Rank 0 (which writes the events) gives up at the
    # teacher-load barrier and records why: the barrier is inside the try that records failures.
    run_dir = tmp_path / "run"
    res = launch(2, *TINY, "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--run-dir", str(run_dir),
                 env={"FLASHDMD_TEST_SLOW_START": "1:120", "FLASHDMD_STARTUP_TIMEOUT_S": "5"}, timeout=200)
    assert res.returncode != 0
    failed = _events(run_dir)[-1]
    assert failed["kind"] == "failed", res.stderr[-3000:]
    assert "did not finish loading the teacher within 5 s" in failed["message"]
