"""Checkpoint folders in the trainer's layout, built from a teacher folder without running training.

For tests and benchmarks (like trainer/tiny.py for teachers).
A full checkpoint is the teacher's UNet with seeded perturbations; a LoRA checkpoint is
an adapter with random (non-zero) B matrices, saved with the pipeline class's
`save_lora_weights` exactly as trainer/checkpoint.py does. Both change the teacher's
output visibly, so tests can tell whether the generator was really loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.models import LORA_TARGETS, pipeline_class


def _perturb(module: torch.nn.Module, seed: int, scale: float, only: str | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or only in name:
                # Relative to the weight's spread; absolute for all-zero tensors (a fresh LoRA's B).
                spread = p.std().item() if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=gen) * scale * (spread or 1.0))


def make_checkpoint(run_dir: Path, family: str, teacher: Path, *, lora: dict | None = None, seed: int = 0,
                    step: int = 7, timesteps: tuple[int, ...] = (999, 749, 499, 249), resolution: int = 32,
                    step_sets: dict[int, list[int]] | None = None) -> Path:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    name = "transformer" if family == "sd3" else "unet"
    cls = SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    net = cls.from_pretrained(teacher, subfolder=name)
    if lora is None:
        _perturb(net, seed, 0.05)
        net.save_pretrained(ckpt / name, safe_serialization=True)
        kind = name
    else:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        net.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=LORA_TARGETS[name]))
        _perturb(net, seed, 0.1, only="lora_B")
        key = "unet_lora_layers" if name == "unet" else "transformer_lora_layers"
        pipeline_class(family).save_lora_weights(ckpt / "lora", **{key: get_peft_model_state_dict(net)},
                                                 safe_serialization=True)
        kind = "lora"
    meta = {"step": step, "family": family, "teacher": str(teacher), "resolution": resolution, "timesteps": list(timesteps),
            "num_steps": len(timesteps), "generator": kind, "mode": "flash",
            "parameterisation": "flow" if family == "sd3" else "eps", "shift": 3.0 if family == "sd3" else None,
            "lora": None if lora is None else {**lora, "target_modules": None, "dropout": 0.0}}
    if step_sets:
        meta["step_sets"] = {str(k): list(v) for k, v in step_sets.items()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt
