"""The teacher's networks for `flashdmd plan` and `--trace`: architecture configs read from a local folder, the hub
cache, the configs shipped in trainer/arch, or the hub (config files only), built on the meta device, and their
parameter counts. No weights are loaded or allocated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import InputError

ARCH_DIR = Path(__file__).parent / "arch"
# Hub ids whose architecture ships with the package (configs only), used when the hub is unreachable.
KNOWN_ARCH = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
              "stabilityai/stable-diffusion-3-medium-diffusers": "sd3-medium"}


def teacher_folder(ref: str, revision: str | None = None) -> Path:
    """A folder with model_index.json and the component configs: local, tiny, hub cache, shipped, or hub."""
    from trainer.models import is_local_path, resolve_teacher

    if ref.startswith(("tiny:", "toy:")) or is_local_path(ref):
        return Path(resolve_teacher(ref))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "model_index.json", revision=revision)
        if isinstance(cached, str):
            return Path(cached).parent
    except Exception:  # a malformed id: fall through to the other sources  # noqa: S110
        pass
    if ref in KNOWN_ARCH:
        return ARCH_DIR / KNOWN_ARCH[ref]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, allow_patterns=["*.json"]))
    except Exception as err:
        raise InputError(f"model.teacher: cannot read the configs of {ref!r} for the plan: "
                         f"{type(err).__name__}: {err}") from None


def _read(folder: Path, name: str) -> dict[str, Any] | None:
    for rel in (f"{name}/config.json", f"{name}/scheduler_config.json"):
        p = folder / rel
        if p.is_file():
            return json.loads(p.read_text())
    return None


@dataclass
class Net:
    """One network's parameter tensors (element counts) and which of them train."""

    name: str
    sizes: list[int]
    trainable: list[int] = field(default_factory=list)
    buffers: int = 0  # elements of floating-point buffers (spectral-norm u/v, ...)

    @property
    def params(self) -> int:
        return sum(self.sizes)

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable)


def count(name: str, module: Any, trainable: bool = False) -> Net:
    sizes = [p.numel() for p in module.parameters()]
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return Net(name, sizes, list(sizes) if trainable else [], buffers)


@dataclass
class Arch:
    family: str
    folder: Path
    configs: dict[str, dict[str, Any]]
    nets: dict[str, Any]  # meta-device modules

    @property
    def denoiser(self) -> Any:
        return self.nets.get("unet") or self.nets["transformer"]


def load_arch(ref: str, revision: str | None = None) -> Arch:
    """The teacher's networks on the meta device, from its config files only."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from trainer.models import PIPELINE_FAMILY

    folder = teacher_folder(ref, revision)
    index = json.loads((folder / "model_index.json").read_text())
    family = PIPELINE_FAMILY.get(index.get("_class_name", ""))
    if family is None:
        raise InputError(f"model.teacher: unsupported pipeline {index.get('_class_name')!r} for the plan")
    configs, nets = {}, {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(name)
        cfg = _read(folder, name)
        if not entry or not entry[0] or cfg is None:
            continue
        lib, cls_name = entry
        configs[name] = cfg
        with init_empty_weights():
            if lib == "diffusers":
                nets[name] = getattr(diffusers, cls_name).from_config(cfg)
            else:
                cls = getattr(transformers, cls_name)
                nets[name] = cls(cls.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    return Arch(family, folder, configs, nets)


def lora_params(denoiser: Any, rank: int, targets: list[str]) -> list[int]:
    """LoRA adapter sizes: r x (in + out) per targeted Linear, as peft adds them (A: r x in, B: out x r)."""
    from torch import nn

    sizes = []
    for name, m in denoiser.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            sizes += [rank * m.in_features, m.out_features * rank]
    return sizes


def latent_head_net(arch: Arch, latent_size: int) -> Net:
    from trainer.gan import LatentHead

    den = arch.denoiser
    channels = int(den.config.block_out_channels[-1])
    spatial = latent_size // 2 ** (len(den.config.block_out_channels) - 1)
    return count("latent_head", LatentHead(channels, spatial), trainable=True)
