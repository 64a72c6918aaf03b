"""One micro-batch's inputs on this rank, from a data batch: conditioning, per-sample randomness, real
images or cached latent moments, and the bucket size (moved out of trainer/distill.py to keep it short)."""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.models import Cond, Teacher
from trainer.rng import SampleRNG, vae_generators
from trainer.updates import Micro


def make_micro(teacher: Teacher, batch: dict, rng: SampleRNG, device: torch.device | str, keep_moments: bool) -> Micro:
    prompts = list(batch["caption"])
    b = len(prompts)
    real = batch.get("image")
    cond, uncond = teacher.encode(prompts), teacher.uncond(b)
    size, moments = None, batch.get("moments")
    ids = batch.get("time_ids")
    if ids is not None:
        # Bucketed data: the batch's own size, and SDXL's per-sample (orig, crop, target) micro-conditioning
        # for both branches of CFG (as diffusers' SDXL pipeline passes add_time_ids to both).
        size = (int(ids[0, 4]), int(ids[0, 5]))
        if cond.time_ids is not None:
            ids = ids.to(device, cond.time_ids.dtype)
            cond, uncond = Cond(cond.embeds, cond.pooled, ids), Cond(uncond.embeds, uncond.pooled, ids)
    if not keep_moments:
        moments = None  # only DMD2's latent GAN reads real latents; the Pixel-GAN reads the pixels
    return Micro(cond, uncond, rng, None if real is None else real.to(device), size,
                 None if moments is None else moments.to(device))


def real_latents(teacher: Teacher, mb: Micro) -> Tensor:
    """DMD2's real latents: sampled from the cached posterior when there is one, else encoded now; the
    same per-sample generators either way, so both give the same latents."""
    gens = vae_generators(mb.rng)
    if mb.moments is None:
        return teacher.encode_images(mb.real, gens)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return teacher.scale_latents(DiagonalGaussianDistribution(mb.moments).sample(gens))


def latent_shape(teacher: Teacher, mb: Micro) -> tuple[int, int, int, int]:
    """The generator's latent shape for one micro-batch: its bucket's size, else the training resolution."""
    if mb.size is None:
        return teacher.latent_shape(len(mb.rng))
    f = teacher.vae_scale
    return (len(mb.rng), teacher.latent_channels, mb.size[0] // f, mb.size[1] // f)
