"""Helpers for the multi-process tests (imported by name, like tests/service/servicekit.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

# Adam's first steps move a weight by ~lr * g / (|g| + eps): with eps = 1e-8 an element whose gradient is at
# rounding level (batch 4 vs 2 + 2 sums in another order) still moves by up to lr. eps = 1e-6 keeps the
# comparison about the gradients, which is what data parallelism must preserve.
STEPS = ["--set", "train.max_steps=3", "--set", "train.checkpoint_every=3",
         "--set", "optim.generator.eps=1e-6", "--set", "optim.fake_score.eps=1e-6",
         "--set", "optim.discriminator.eps=1e-6"]
TINY = ["presets/tiny-sdxl.yaml", "--set", "train.sample_every=1000",
        "--set", "train.log_every=1", "--set", "train.keep_last=5"]


def weights(run_dir: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "trainable" / f"{name}.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
