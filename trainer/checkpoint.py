"""Checkpoints: `run_dir/checkpoints/step-XXXXXXXX/`.

    meta.json                   written last: a folder without it is incomplete and ignored
    unet/ or transformer/       the generator as a diffusers model folder (full fine-tune), or
    lora/                       the generator's LoRA in diffusers' format (`load_lora_weights`)
    trainable/*.safetensors     the trainable weights (and buffers) of every network, for resume
    state/                      accelerate state: optimisers, GradScaler and RNG
    sharded/                    instead of trainable/ and state/ under FSDP: DCP shards (trainer/sharded.py)

A checkpoint is written into a temporary folder and renamed into place, so a
crash never leaves a half-written `step-*` folder; old ones are rotated away.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.sink import METRICS_FILE, Sink

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.jobspec import DistillJob, LoraSpec
    from trainer.method import Method

CKPT_DIR = "checkpoints"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus every buffer (e.g. spectral norm's power-iteration vectors _u/_v of the
    discriminator heads: without them a resumed D would restart its sigma estimate)."""
    state = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in module.named_buffers()})
    return {n: v.cpu().contiguous() for n, v in state.items()}


def _export_generator(distiller: Method, lora: LoraSpec | None, out: Path) -> str:
    t = distiller.teacher
    gen = distiller.generator
    if lora is None:
        gen.save_pretrained(out / t.denoiser_name, safe_serialization=True)
        return t.denoiser_name
    from peft.utils import get_peft_model_state_dict

    from trainer.models import pipeline_class

    layers = get_peft_model_state_dict(gen)
    # The adapter metadata carries lora_alpha: without it load_lora_weights assumes alpha = rank.
    metadata = gen.peft_config["default"].to_dict()
    prefix = t.denoiser_name
    pipeline_class(t.family).save_lora_weights(out / "lora", **{f"{prefix}_lora_layers": layers,
                                               f"{prefix}_lora_adapter_metadata": metadata}, safe_serialization=True)
    return "lora"


def save_checkpoint(run_dir: Path, step: int, distiller: Method, acc: Accelerator, cfg: DistillJob, sink: Sink, *,
                    sidecars: dict[str, dict] | None = None, slow_s: float = 0.0) -> Path | None:
    """Every rank joins (optimiser state and, under FSDP, weight shards are collective); rank 0 writes the
    model files, meta.json and the method's `sidecars` (file name -> JSON, e.g. stage 2's rl.json), then
    renames the folder into place. slow_s: the test hook of trainer/hooks.py (a slow SDXL checkpoint)."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainable").mkdir(parents=True)
    acc.wait_for_everyone()
    full = None
    if getattr(distiller, "sharded", False):
        from trainer.sharded import SHARDED_DIR, full_generator_state, save_sharded

        save_sharded(distiller, tmp / SHARDED_DIR)
        full = full_generator_state(distiller)
    else:
        acc.save_state(str(tmp / "state"))  # optimisers + scaler + RNG (accelerate writes them per process)
    if acc.is_main_process:
        if slow_s > 0:
            time.sleep(slow_s)
        if full is None:
            for name, mod in distiller.trainable_modules().items():
                save_file(trainable_state(mod), str(tmp / "trainable" / f"{name}.safetensors"))
            kind = _export_generator(distiller, cfg.model.lora, tmp)
        else:
            from trainer.sharded import export_full_generator

            kind = export_full_generator(distiller, full, tmp)
        t = distiller.teacher
        meta = {"step": step, "family": t.family, "teacher": cfg.model.teacher, "resolution": t.resolution,
                "timesteps": distiller.S, "num_steps": len(distiller.S), "generator": kind,
                "mode": cfg.distill.mode, "parameterisation": t.param.kind,
                "shift": getattr(t.param, "shift", None), "lora": cfg.model.lora.model_dump() if cfg.model.lora else None,
                "sharding": "fsdp" if full is not None else "none", "num_processes": acc.num_processes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for name, content in (sidecars or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        sink.save_checkpoint(step, final, {"generator": kind})
    acc.wait_for_everyone()
    return final


def load_trainable(module: nn.Module, path: Path, device: torch.device | str) -> None:
    """Copy a `trainable/*.safetensors` file into `module`; every trainable parameter must be present."""
    dev = torch.device(device)
    # safetensors takes "cpu" but not "cpu:0", the device of a rank in a multi-process CPU (gloo) run
    state = load_file(str(path), device="cpu" if dev.type == "cpu" else str(dev))
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    # Buffers are restored when present (checkpoints older than the buffer fix have none).
    targets = {**dict(module.named_buffers()), **params}
    with torch.no_grad():
        for n, v in state.items():
            if n in targets:
                targets[n].copy_(v)


def load_checkpoint(ckpt: Path, distiller: Method, acc: Accelerator) -> int:
    """Restore the trainable weights, the optimisers and RNG; returns the checkpoint's step."""
    from trainer.sharded import SHARDED_DIR, load_sharded

    sharded = (ckpt / SHARDED_DIR).is_dir()
    if sharded != bool(getattr(distiller, "sharded", False)):
        raise ValueError(f"checkpoint {ckpt} was written {'with' if sharded else 'without'} FSDP sharding; "
                         "resume it with the same train.sharding and number of processes")
    if sharded:
        load_sharded(distiller, ckpt / SHARDED_DIR)
        return int(json.loads((ckpt / "meta.json").read_text())["step"])
    for name, mod in distiller.trainable_modules().items():
        path = ckpt / "trainable" / f"{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} has no {name} weights ({path.name}); was it written by "
                                    "a run with a different mode?")
        load_trainable(mod, path, acc.device)
    acc.load_state(str(ckpt / "state"))
    return int(json.loads((ckpt / "meta.json").read_text())["step"])


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint so no (key, step) appears twice."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
