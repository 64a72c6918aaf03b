"""DMD2's latent GAN (the `dmd2` baseline): a conv head on the fake score's middle features.

DMD2 runs the fake UNet only up to its mid-block and classifies that output
(shared/reference/dmd2.md §3). We reuse diffusers' own forward and stop it with
an exception from a forward hook once the mid-block has run, so the up-blocks
are skipped without copying diffusers' forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models import Cond, Teacher, predict
from trainer.schedules import Parameterisation


class _Stop(Exception):
    pass


def _middle(net: nn.Module) -> nn.Module:
    if getattr(net, "mid_block", None) is not None:  # UNet2DConditionModel
        return net.mid_block
    blocks = getattr(net, "transformer_blocks", None)  # SD3Transformer2DModel: the middle joint block
    if blocks is None:
        raise TypeError(f"{type(net).__name__} has neither mid_block nor transformer_blocks")
    return blocks[len(blocks) // 2]


def mid_features(net: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, param: Parameterisation) -> Tensor:
    """Features after the middle of the denoiser: [B, C, h, w] (grads flow to x_t)."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[-1] if isinstance(output, tuple) else output)
        raise _Stop

    handle = _middle(net).register_forward_hook(hook)
    try:
        predict(net, x_t, t, cond, param)
    except _Stop:
        pass
    finally:
        handle.remove()
    feat = captured[0]
    if feat.ndim == 3:  # transformer tokens [B, N, D] -> [B, D, s, s]
        b, n, dim = feat.shape
        side = int(round(n**0.5))
        feat = feat.transpose(1, 2).reshape(b, dim, side, side)
    return feat


class LatentHead(nn.Module):
    """DMD2's classifier branch: [Conv4x4 s2, GN, SiLU] down to 4x4, a 4x4 conv to 1x1, then Conv1x1 -> logit."""

    def __init__(self, channels: int, spatial: int) -> None:
        super().__init__()
        self.spatial = spatial
        groups = 32 if channels % 32 == 0 else 1
        layers: list[nn.Module] = []
        size = spatial
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(groups, channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, size, size, 0), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, feats: Tensor) -> Tensor:  # [B, C, s, s] -> [B, 1]
        if feats.shape[-2] != feats.shape[-1] or feats.shape[-1] != self.spatial:
            # Bucketed batches have other sizes: pool to the square the conv stack was built for.
            feats = nn.functional.adaptive_avg_pool2d(feats, self.spatial)
        return self.net(feats).flatten(1)


def latent_head_for(fake: nn.Module, teacher: Teacher, device: torch.device) -> LatentHead:
    """A head for `fake`'s mid features: a dry run on one latent tells it their channels and spatial size."""
    x = torch.zeros(teacher.latent_shape(1), device=device)
    cond = teacher.encode([""])
    with torch.no_grad():
        feat = mid_features(fake, x, torch.zeros(1, dtype=torch.long, device=device), cond, teacher.param)
    return LatentHead(feat.shape[1], feat.shape[-1])
