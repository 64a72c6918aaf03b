"""bench/gpu_train_step.py: the presets it measures are the shipped ones, the shortened accumulation's bound,
and --dry-run runs the stage-1 preset end to end on the CPU with torchao's 8-bit AdamW."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_train_step as gts  # noqa: E402

from trainer.config import load_spec  # noqa: E402


@pytest.mark.parametrize(("config", "preset"), [("s1-all", "sdxl-4step.yaml"), ("s2-all", "sdxl-rl-4step.yaml")])
def test_preset_configs_keep_every_lever_of_the_preset(config, preset):
    shipped = load_spec(REPO / "presets" / preset)
    cfg = gts.spec_for(config, 1024, 1, "torchao")
    assert cfg.kind == shipped.kind
    assert cfg.memory == shipped.memory
    assert cfg.train.grad_accum == shipped.train.grad_accum
    assert cfg.schedule == shipped.schedule
    assert (cfg.optim.optimizer, cfg.optim.adamw8bit_backend) == (shipped.optim.optimizer, "torchao")
    assert cfg.train.mixed_precision == shipped.train.mixed_precision
    assert cfg.train.gradient_checkpointing == shipped.train.gradient_checkpointing
    assert cfg.distill.discriminator.backbone == shipped.distill.discriminator.backbone
    assert cfg.distill.discriminator.checkpoint is None and cfg.model.teacher.startswith("random:")
    if config == "s1-all":
        assert cfg.train.grad_accum == 64, "the headline number is the preset's own accumulation"


def test_shortened_accumulation_bounds_the_peak_and_extends_the_time():
    rows = [{"micro_batches": 2, "s": 6.0, "peak_alloc_gib": 60.0, "peak_reserved_gib": 70.0},
            {"micro_batches": 4, "s": 12.0, "peak_alloc_gib": 60.02, "peak_reserved_gib": 70.0}]
    ext = gts.extrapolate(rows, 64, kept_gib=0.025)
    assert ext["s_per_gen_update"] == pytest.approx(12.0 + 60 * 3.0)
    assert ext["peak_alloc_upper_gib"] == pytest.approx(60.02 + 60 * 0.025)
    assert ext["peak_alloc_lower_gib"] == pytest.approx(60.02 + 60 * 0.01)
    assert ext["peak_reserved_est_gib"] == pytest.approx(70.0 + 60 * 0.025)


@pytest.mark.slow
def test_gpu_bench_dry_run_runs_the_stage_1_preset_with_a_shortened_accumulation(tmp_path):
    pytest.importorskip("torchao", reason="torchao is in the test extra")
    out = tmp_path / "levers.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train_step.py"), "--dry-run",
                           "--configs", "s1-all", "--warmup", "0", "--accum", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["results"]["s1-all"]
    assert "error" not in r, r.get("error")
    assert r["spec"]["adamw8bit_backend"] == "torchao" and r["spec"]["grad_accum"] == 64
    assert [row["micro_batches"] for row in r["accumulation"]] == [2, 3]
    ext = r["accumulation_summary"]
    assert ext["kept_per_micro_batch_gib"] * 2**30 >= 4 * 2 * 3 * 64 * 64, "reals and fakes at 64² in fp32"
    t2, t3 = (row["s"] for row in r["accumulation"])
    assert ext["s_per_gen_update"] == pytest.approx(t3 + 61 * (t3 - t2))
    rows = r["plan_rows"]
    assert rows["text encoders"] == 0, "the preset's text cache reached the plan"
