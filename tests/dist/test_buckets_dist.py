"""Two ranks on bucketed data: in one update the ranks' micro-batches have different sizes, and DDP still
all-reduces every network's gradients (no rank waits in a collective the other skips)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_two_ranks_train_on_buckets_of_different_sizes(launch, tmp_path):
    from distkit import TINY

    folder = tmp_path / "imgs"
    folder.mkdir()
    # Two wide and two tall images, batch 1 per rank: seed 0's first update gives the ranks different buckets.
    for i, (w, h) in enumerate([(64, 32), (70, 30), (30, 64), (28, 60)]):
        Image.new("RGB", (w, h), (60 * i, 120, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    from trainer.buckets import BucketBatchSampler
    from trainer.jobspec import parse_spec
    from trainer.data import build_dataset

    spec = parse_spec({"model": {"teacher": "tiny:sdxl"}, "data": {"images": str(folder), "buckets": {
        "enabled": True, "step": 8, "target_pixels": 1024}}})
    ds = build_dataset(spec.data, 32, 0)
    first = [BucketBatchSampler(ds.buckets_of, 1, 0, rank=r, world=2).indices(0, 0) for r in range(2)]
    assert ds.buckets_of[first[0][0]] != ds.buckets_of[first[1][0]], "precondition: change train.seed"
    run = tmp_path / "run"
    res = launch(2, *TINY, "--set", "data.builtin=null", "--set", f"data.images={folder}",
                 "--set", "data.buckets={enabled: true, step: 8, target_pixels: 1024}",
                 "--set", "train.batch_size=1", "--set", "train.max_steps=2", "--set", "train.checkpoint_every=100",
                 "--set", "train.seed=0", "--run-dir", str(run), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 2
