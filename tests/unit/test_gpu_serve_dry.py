"""bench/gpu_serve.py --dry-run: the GPU serving benchmark's code path runs end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_serve_dry_run_measures_each_option_and_the_load(tmp_path):
    """The options table (eager, fused QKV, channels-last) and the batched vs unbatched load section run end to
    end and land in the JSON. The compiled rows are left out here: tests/unit/test_serving.py compiles once."""
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_serve.py"), "--dry-run", "--no-compile",
                           "--sections", "options,load", "--rounds", "1", "--clients", "2", "--requests", "6",
                           "--seconds", "60", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["gpu"] is None
    rows = {row["config"]: row for row in r["results"]["options"]}
    assert list(rows) == ["eager", "+fused QKV", "+channels-last"]
    assert all(row["image_shape"] == [1, 64, 64, 3] and row["batch1_s"] > 0 for row in rows.values())
    assert all(row["max_abs_diff_vs_eager"] <= 2 for row in rows.values()), "an option changed the image"
    load = r["results"]["load"]
    assert load["unbatched"]["images"] > 0 and load["batched"]["images"] > 0
    assert load["unbatched"]["codes"] == {"200": load["unbatched"]["images"]}
    assert "clients: batched" in proc.stdout and "best batch-1 with the full VAE" in proc.stdout
