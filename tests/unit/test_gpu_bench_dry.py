"""bench/gpu_train_step.py --dry-run: the GPU benchmark's code path runs end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run_runs_stage_2_with_every_lever(tmp_path):
    out = tmp_path / "levers.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train_step.py"), "--dry-run",
                           "--configs", "s2-all", "--warmup", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["results"]["s2-all"]
    assert "error" not in r, r.get("error")
    assert r["timing"]["iterations"] == 5, "one RL cycle: ratio 5 RL updates, the last with a distillation turn"
    rows = r["plan_rows"]
    assert rows["text encoders"] == 0 and "rl optimiser (generator)" not in rows, "levers reached the plan"
