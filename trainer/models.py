"""Load a teacher pipeline (hub id, local folder or tiny:<family>), encode text, call denoisers.

One code path for real and tiny teachers: everything goes through the diffusers
pipeline classes' `from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer.errors import InputError
from trainer.jobspec import ModelSpec
from trainer.roots import opened_model
from trainer.schedules import Parameterisation, parameterisation_for

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

PIPELINE_FAMILY = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusion3Pipeline": "sd3",
}
# LoRA targets: the attention projections (DMD2's LoRA also adapts these).
LORA_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


@dataclass
class Cond:
    """Text conditioning of a batch, in the form the denoiser's forward takes."""

    embeds: Tensor  # [B, L, D] encoder_hidden_states
    pooled: Tensor | None = None  # [B, P] SDXL text_embeds / SD3 pooled_projections
    time_ids: Tensor | None = None  # [B, 6] SDXL micro-conditioning

    def map(self, fn: Callable[[Tensor], Tensor]) -> Cond:
        return Cond(*(None if v is None else fn(v) for v in (self.embeds, self.pooled, self.time_ids)))

    def __getitem__(self, idx: int | slice | Tensor) -> Cond:
        return self.map(lambda v: v[idx])

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        first = conds[0]
        return Cond(*(None if getattr(first, f) is None else torch.cat([getattr(c, f) for c in conds])
                      for f in ("embeds", "pooled", "time_ids")))


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.exists(ref)


def resolve_teacher(ref: str) -> str:
    """Map a teacher reference to a folder or hub id, with clear errors for missing paths."""
    if ref.startswith("tiny:"):
        from trainer.tiny import tiny_pipeline_dir

        family = ref.split(":", 1)[1]
        if family not in ("sdxl", "sd15", "sd3"):
            raise InputError(f"model.teacher: unknown tiny family {family!r} (sdxl, sd15, sd3)")
        return str(tiny_pipeline_dir(family))
    if ref.startswith("toy:"):  # the teachers trainer/toy ships (the digits demo's): it owns their names
        from trainer.toy import toy_teacher_dir

        return str(toy_teacher_dir(ref.split(":", 1)[1]))
    if is_local_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise InputError(f"model.teacher: no such folder: {path}")
        if not (path / "model_index.json").is_file():
            raise InputError(f"model.teacher: {path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    return ref


def detect_family(ref: str, revision: str | None = None, *, cached_only: bool = False) -> str:
    from diffusers import DiffusionPipeline

    try:
        if os.path.isdir(ref):
            index = json.loads((Path(ref) / "model_index.json").read_text())
        else:
            index = DiffusionPipeline.load_config(ref, revision=revision, local_files_only=cached_only)
    except Exception as err:  # hub errors come in many types; the message is what matters
        raise InputError(f"model.teacher: cannot read {ref!r}: {err.__class__.__name__}: {err}") from None
    cls = index.get("_class_name", "")
    if cls not in PIPELINE_FAMILY:
        raise InputError(f"model.teacher: unsupported pipeline {cls!r}; expected one of {sorted(PIPELINE_FAMILY)}")
    return PIPELINE_FAMILY[cls]


def pipeline_class(family: str):  # noqa: ANN201
    import diffusers

    name = {v: k for k, v in PIPELINE_FAMILY.items()}[family]
    return getattr(diffusers, name)


class Teacher:
    """The frozen teacher pipeline plus what the trainer needs from it."""

    def __init__(self, pipe: DiffusionPipeline, family: str, ref: str, resolution: int | None,
                 shift: float | None) -> None:
        self.pipe, self.family, self.ref = pipe, family, ref
        self.denoiser_name = "transformer" if family == "sd3" else "unet"
        self.denoiser: nn.Module = getattr(pipe, self.denoiser_name)
        self.vae = pipe.vae
        self.param: Parameterisation = parameterisation_for(family, dict(pipe.scheduler.config), shift)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        default_res = int(self.denoiser.config.sample_size) * self.vae_scale
        self.resolution = resolution or default_res
        if self.resolution % (self.vae_scale * (2 if family == "sd3" else 1)):
            raise InputError(f"model.resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale}")
        self.latent_channels = int(self.denoiser.config.in_channels)
        self.latent_size = self.resolution // self.vae_scale
        for m in (self.denoiser, self.vae, *self.text_encoders()):
            m.requires_grad_(False).eval()
        self._uncond: Cond | None = None

    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str) -> Teacher:
        self.pipe.to(device)
        self._uncond = None
        return self

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.latent_channels, self.latent_size, self.latent_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        device, n = self.device, len(prompts)
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            return Cond(embeds, pooled, self.time_ids(n))
        if self.family == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=False)
            return Cond(embeds, pooled)
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return Cond(embeds)

    def uncond(self, batch: int) -> Cond:
        """The CFG unconditional input. SDXL uses zeros (DMD2; force_zeros_for_empty_prompt), others ""."""
        if self._uncond is None:
            if self.family == "sdxl":
                c = self.encode([""])
                self._uncond = Cond(torch.zeros_like(c.embeds), torch.zeros_like(c.pooled), c.time_ids)
            else:
                self._uncond = self.encode([""])
        return self._uncond.map(lambda v: v.expand(batch, *v.shape[1:]))

    def time_ids(self, batch: int) -> Tensor:
        """SDXL micro-conditioning [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (DMD2)."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device).expand(batch, 6)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w]."""
        with torch.no_grad():
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            lat = dist.sample(generator)
        return self.scale_latents(lat)

    def encode_moments(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> the VAE posterior's parameters [B, 2C, h, w] (mean, logvar): what the
        prepare cache stores, so training still draws a fresh posterior sample per step, as encode_images."""
        with torch.no_grad():
            return self.vae.encode(images.to(self.vae.dtype)).latent_dist.parameters

    def scale_latents(self, lat: Tensor) -> Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (keeps the graph when grad is enabled)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        lat = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(lat.to(self.vae.dtype), return_dict=False)[0]


def load_teacher(spec: ModelSpec, device: torch.device | str = "cpu", shift: float | None = None) -> Teacher:
    from trainer.hub import check_hub_model

    # A local folder is checked again here, after realpath, and its realpath is what gets read: a folder
    # swapped for a symlink after submit must not lead outside the model roots (trainer/roots.py).
    ref = resolve_teacher(opened_model(spec.teacher, "model.teacher"))
    # A hub id with the hub unreachable: the cache at once, or a model_unreachable error, not 40 s of retries.
    cached_only = check_hub_model(ref, "model.teacher", revision=spec.revision)
    family = detect_family(ref, spec.revision, cached_only=cached_only) if spec.family == "auto" else spec.family
    cls = pipeline_class(family)
    kwargs: dict[str, object] = {"revision": spec.revision} if spec.revision else {}
    if cached_only:
        kwargs["local_files_only"] = True
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(ref, **kwargs)  # float32 weights; bf16 is applied per network later
    except Exception as err:  # surface hub/IO errors as one clear line
        raise InputError(f"model.teacher: cannot load {spec.teacher!r} as {cls.__name__}: "
                         f"{err.__class__.__name__}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return Teacher(pipe, family, spec.teacher, spec.resolution, shift).to(device)


def predict(net: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, param: Parameterisation) -> Tensor:
    """The denoiser's raw prediction (eps, v or flow velocity).  x_t: [B, C, H, W], t: [B] -> [B, C, H, W]."""
    time = param.model_time(t)
    if cond.pooled is not None and cond.time_ids is None:  # SD3 transformer
        return net(hidden_states=x_t, timestep=time, encoder_hidden_states=cond.embeds,
                   pooled_projections=cond.pooled, return_dict=False)[0]
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if cond.time_ids is not None else None
    return net(x_t, time, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]


def guided_prediction(net: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, param: Parameterisation,
                      guidance: float = 1.0, uncond: Cond | None = None) -> Tensor:
    """The raw prediction with optional CFG: pred_u + w (pred_c - pred_u), one batched forward of 2B."""
    if guidance == 1.0 or uncond is None:
        return predict(net, x_t, t, cond, param)
    both = predict(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([uncond, cond]), param)
    pred_u, pred_c = both.chunk(2)
    return pred_u + guidance * (pred_c - pred_u)


def predict_x0(net: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, param: Parameterisation,
               guidance: float = 1.0, uncond: Cond | None = None) -> Tensor:
    """x0 estimate with optional CFG (the conversion in x_t's dtype)."""
    pred = guided_prediction(net, x_t, t, cond, param, guidance, uncond)
    return param.to_x0(x_t, pred.to(x_t.dtype), t)


def teacher_x0(net: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, param: Parameterisation,
               guidance: float = 1.0, uncond: Cond | None = None) -> Tensor:
    """The real score's x0 in fp32: the forward runs in the net's dtype (bf16 in mixed precision), but
    pred -> x0 uses the fp32 x_t. At t~980, 1/sqrt(alpha_bar)~13 would amplify a bf16 copy's rounding (DMD2
    converts in fp32 too)."""
    dt = next(net.parameters()).dtype
    pred = guided_prediction(net, x_t.to(dt), t, cond.map(lambda v: v.to(dt)), param, guidance,
                             None if uncond is None else uncond.map(lambda v: v.to(dt)))
    return param.to_x0(x_t.float(), pred.float(), t)


def trainable_copy(denoiser: nn.Module, lora: object | None, kind: str) -> nn.Module:
    """A trainable copy of the teacher's denoiser: full weights, or frozen weights plus a LoRA adapter."""
    net = copy.deepcopy(denoiser)
    if lora is None:
        return net.requires_grad_(True).train()
    from peft import LoraConfig

    net.requires_grad_(False)
    targets = lora.target_modules or LORA_TARGETS[kind]
    net.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=targets, init_lora_weights=True))
    return net.train()


@torch.no_grad()
def copy_trainable_(dst: nn.Module, src: nn.Module) -> int:
    """Copy src's trainable tensors into dst's of the same name (LoRA: the fake score's adapters from G's).

    Eq. (11) injects G into the fake score parameter by parameter. For LoRA that means averaging the factors
    A and B separately, which is only an approximation of averaging the update B A (a product is not linear
    in its factors); it is close while both adapters stay near common factors, and meaningless if lora_A
    started from independent random draws. Starting the fake score's adapters as copies of G's keeps them
    matched.
    """
    src_params = dict(src.named_parameters())
    n = 0
    for name, p in dst.named_parameters():
        q = src_params.get(name)
        if p.requires_grad and q is not None and q.shape == p.shape:
            p.copy_(q)
            n += 1
    return n

