"""Memory levers that change how frozen networks run, not what they compute.

Each is switched on by a `memory.*` field of the job spec. Activation checkpointing recomputes the same
forward (bit-identical); the bf16 casts apply to frozen networks that already ran under bf16 autocast, whose
matmuls cast their weights to bf16 anyway (only norm weights and biases gain bf16 rounding). The trainable networks' levers (8-bit AdamW) live in trainer/optim.py, the text-embedding cache in
trainer/textcache.py, SAM's SDPA attention in trainer/discriminator.py.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = self._flashdmd_forward
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        # Non-reentrant: keyword arguments are allowed, and autocast state is replayed on recompute.
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def checkpoint_vae_decoder(vae: nn.Module) -> int:
    """Recompute the VAE decoder's resnets, attention and upsamplers in backward (memory.vae_decode_checkpointing).

    On the Pixel-GAN path the generator's x0 is decoded with grad (Eq. 9), and at 1024² the decoder's
    last up block alone keeps ~10 GB of activations for backward (3 resnets x ~8 tensors x 128 ch x 1024²).
    diffusers' own `enable_gradient_checkpointing` checkpoints whole up blocks, so its recompute of the last
    block needs the same ~10 GB again; per-layer checkpoints keep only each layer's input and recompute one
    layer at a time. The layers are patched per instance, so the state dict is unchanged, and only forwards
    that build a graph (the generator's decode) are checkpointed: no-grad decodes (D's fakes, samples) are not.
    Returns the number of layers wrapped.
    """
    decoder = vae.decoder
    layers: list[nn.Module] = []
    for block in [decoder.mid_block, *decoder.up_blocks]:
        for name in ("resnets", "attentions", "upsamplers"):
            layers += [m for m in (getattr(block, name, None) or []) if m is not None]
    for m in layers:
        if not hasattr(m, "_flashdmd_forward"):
            m._flashdmd_forward = m.forward
            m.forward = types.MethodType(_checkpointed_forward, m)
    return len(layers)


def cast_frozen_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen network's floating-point weights (e.g. p_ref, the reward model) to `dtype` in place."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError("cast_frozen_ is for frozen networks: this one has trainable parameters")
    return module.to(dtype)


class AutocastReward:
    """A reward model whose `score` runs under the trainer's autocast (memory.reward_bf16)."""

    def __init__(self, inner: Any, autocast: Any) -> None:
        self.inner, self.autocast = inner, autocast

    def score(self, latents: Tensor, t: Tensor, cond: Any) -> Tensor:
        with self.autocast():
            return self.inner.score(latents, t, cond).float()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def reward_for_training(reward: Any, cfg: Any, accelerator: Any) -> Any:
    """memory.reward_bf16: the LRM's UNet and text encoders in bf16, scored under autocast.

    The LRM is a frozen full UNet + text encoders (13.6 GiB in fp32 for SDXL) that only scores; its small
    projection and logit scale stay fp32, and `score` returns fp32. Pixel rewards keep their weights (they
    reuse the teacher's) and only gain the autocast.
    """
    if not cfg.memory.reward_bf16:
        return reward
    for name in ("unet", "text_encoders"):
        net = getattr(reward, name, None)
        if net is not None:
            cast_frozen_(net, torch.bfloat16)
    return AutocastReward(reward, accelerator.autocast)
