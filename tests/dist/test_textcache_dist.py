"""The text cache is encoded by every rank, not by rank 0 alone while the others wait."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, accelerate_cmd
from safetensors import safe_open

pytestmark = pytest.mark.slow


def test_two_ranks_each_encode_half_of_the_captions_into_one_cache(dist_env, tmp_path):
    probe = Path(__file__).with_name("textcache_probe.py")
    root = tmp_path / "cache"
    res = subprocess.run([*accelerate_cmd(2), str(probe), str(root)], cwd=REPO, env=dist_env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:  # every rank reads every entry, whoever wrote it, and it is the teacher's encoding
        assert r["entries"] == 11 and r["worst"] < 1e-5, r
    manifest = json.loads((root / "manifest.json").read_text())
    shards = manifest["text"]["shards"]
    assert sorted(shards) == [f"text/shard-{i:05d}.safetensors" for i in range(6)]  # 11 captions in chunks of 2
    writers = []
    for name in sorted(shards):
        with safe_open(str(root / name), framework="pt") as f:
            writers.append(f.metadata()["rank"])
    assert writers == ["0", "1", "0", "1", "0", "1"], "chunk i written by rank i mod 2"
