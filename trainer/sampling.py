"""The one K-step sampler (DESIGN §3, §6): part of the method, owned by the trainer, re-exported by inference.

It keeps no scheduler object: the loop is written out, so concurrent requests share
nothing mutable. Each image has its own seed; its initial noise and every
re-noising draw come from its own `torch.Generator`, in the same order that
diffusers' `LCMScheduler` pipelines draw them, so `generator=[Generator().manual_seed(s)
for s in seeds]` in a diffusers pipeline reproduces our latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trainer.models import Cond, predict_x0
from trainer.schedules import Parameterisation


def _noise(gens: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    # One draw per image from its own generator (diffusers' randn_tensor with a generator list).
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens])


@torch.no_grad()
def sample(net: nn.Module, cond: Cond, timesteps: Sequence[int], param: Parameterisation, *,
           seeds: Sequence[int], latent_shape: tuple[int, int, int], noise: Tensor | None = None,
           guidance: float = 1.0, uncond: Cond | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Few-step sampling: x = noise; for t in S: x0 = G(x, t); x = step_to(x0, next t, fresh noise).

    net: the generator (UNet or SD3 transformer); cond: [B] conditioning; seeds: B ints.
    Returns the final x0 latents [B, C, H, W] (decode with the VAE).
    """
    device = next(net.parameters()).device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _noise(gens, latent_shape, torch.float32) if noise is None else noise.float().cpu()
    x = x.to(device, dtype)
    x0 = x
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        x0 = predict_x0(net, x, tt, cond, param, guidance, uncond)
        if i + 1 < len(timesteps):
            fresh = _noise(gens, latent_shape, torch.float32).to(device, dtype)
            x = param.step_to(x0, int(timesteps[i + 1]), fresh)
    return x0


def to_uint8(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images: Tensor, cols: int | None = None):  # noqa: ANN201
    """[B, 3, H, W] in [-1, 1] -> one PIL image, `cols` per row."""
    from PIL import Image

    arr = to_uint8(images).numpy()
    b, h, w, _ = arr.shape
    cols = cols or min(b, 8)
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i in range(b):
        grid.paste(Image.fromarray(arr[i]), ((i % cols) * w, (i // cols) * h))
    return grid
