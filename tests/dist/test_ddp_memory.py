"""DDP keeps one copy of each gradient: `.grad` is a view into the all-reduce bucket (gradient_as_bucket_view)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, accelerate_cmd

pytestmark = pytest.mark.slow


def test_a_ddp_backward_adds_one_gradient_copy_not_two(dist_env):
    # One backward through a DDP-wrapped 256 MiB layer on 2 gloo ranks. With gradient_as_bucket_view the
    # gradient lives in DDP's bucket: ~256 MiB more resident memory. Without it the bucket and a separate
    # .grad each hold a copy: measured ~516 MiB.
    probe = Path(__file__).with_name("ddp_memory_probe.py")
    res = subprocess.run([*accelerate_cmd(2), str(probe)], cwd=REPO, env=dist_env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", res.stdout)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["param_mib"] == 256
        assert 0.8 * r["param_mib"] < r["grown_mib"] < 1.4 * r["param_mib"], r
