"""bench/gpu_train_step.py: the presets it measures are the shipped ones, and the shortened accumulation's bound.
Its --dry-run runs end to end (both presets, torchao's 8-bit AdamW) in tests/unit/test_device_bundle.py, from
the offline-installed bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_train_step as gts  # noqa: E402

from trainer.jobspec import load_spec  # noqa: E402


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
