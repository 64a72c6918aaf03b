"""Helpers for the multi-process tests (imported by name, like tests/service/servicekit.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["presets/tiny-sdxl.yaml", "--set", "train.sample_every=1000",
        "--set", "train.log_every=1", "--set", "train.keep_last=5"]


def weights(run_dir: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "trainable" / f"{name}.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
