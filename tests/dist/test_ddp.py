"""DDP through accelerate: 2 ranks x batch 2 == 1 rank x batch 4 == 1 rank x batch 2 x grad_accum 2."""

from __future__ import annotations

import json

import pytest
from distkit import STEPS, TINY, max_diff, weights

from trainer.sink import read_metrics

pytestmark = pytest.mark.slow

def _assert_same_weights(a, b, tol: float = 1e-5) -> None:
    moved = max_diff(weights(a, 3, "generator"), {k: v * 0 for k, v in weights(a, 3, "generator").items()})
    assert moved > 0
    for name in ("generator", "fake_score", "discriminator"):
        assert max_diff(weights(a, 3, name), weights(b, 3, name)) < tol, name


def test_two_ranks_match_one_process_with_the_global_batch(launch, single_b4, tmp_path):
    run_dir = tmp_path / "ddp"
    res = launch(2, *TINY, *STEPS, "--set", "train.batch_size=2", "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(single_b4, run_dir)
    norms = [[r["metrics"]["grad_norm/generator"] for r in read_metrics(d)] for d in (single_b4, run_dir)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5), "the synchronised gradients are the global batch's"
    # only rank 0 writes: one metrics row per step, one `started` event
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    events = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events.count("started") == 1 and events[-1] == "finished"


def test_grad_accum_two_by_two_matches_batch_four(launch, single_b4, tmp_path):
    run_dir = tmp_path / "accum"
    res = launch(1, *TINY, *STEPS, "--set", "train.batch_size=2", "--set", "train.grad_accum=2",
                 "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(single_b4, run_dir)


def test_a_different_global_batch_gives_different_weights(launch, single_b4, tmp_path):
    # The contrast that shows the two tests above can fail: batch 2 on one process is not batch 4.
    run_dir = tmp_path / "b2"
    res = launch(1, *TINY, *STEPS, "--set", "train.batch_size=2", "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert max_diff(weights(single_b4, 3, "generator"), weights(run_dir, 3, "generator")) > 1e-4
