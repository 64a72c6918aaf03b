"""Stage 2 on 2 ranks through the same distributed path: DDP-wrapped G, agreed skips, critic updates every step."""

from __future__ import annotations

import json

import pytest

from trainer.sink import read_metrics

pytestmark = pytest.mark.slow


def test_joint_rl_on_two_ranks_updates_the_critics_every_iteration(launch, tmp_path):
    run_dir = tmp_path / "rl"
    res = launch(2, "presets/tiny-sdxl-rl.yaml", "--set", "train.max_steps=3", "--set", "train.batch_size=2",
                 "--set", "rl.ratio=3", "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100",
                 "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["step"]: r["metrics"] for r in read_metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3]
    assert [rows[s]["distill_turn"] for s in (1, 2, 3)] == [0.0, 0.0, 1.0]
    # rl.critic_updates: every (Alg. 1 lines 20-26): the fake score and D update on the RL iterations too
    assert all(rows[s]["skipped/fake_score"] == 0.0 and "loss/disc" in rows[s] for s in (1, 2, 3))
    assert "loss/dm" in rows[3] and "loss/dm" not in rows[1]
    meta = json.loads((run_dir / "checkpoints" / "step-00000003" / "rl.json").read_text())
    assert meta["critic_updates"] == "every"
