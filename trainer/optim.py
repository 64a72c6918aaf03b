"""Optimiser construction: one seam for every trainer (stage 1, stage 2), so memory levers live in one place.

`build_optimizer(params, spec, kind)` returns the optimiser named by `optim.optimizer` in the job spec.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import OptimizerSpec


def trainable(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters that require grad, from a module or an iterable of tensors."""
    it = params.parameters() if isinstance(params, nn.Module) else params
    return [p for p in it if p.requires_grad]


def build_optimizer(params: nn.Module | Iterable[torch.Tensor], spec: OptimizerSpec,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `params` (kind: the spec's optim.optimizer)."""
    if kind != "adamw":
        raise ValueError(f"optim.optimizer: unknown optimiser {kind!r}")
    return torch.optim.AdamW(trainable(params), lr=spec.lr, betas=tuple(spec.betas),
                             weight_decay=spec.weight_decay, eps=spec.eps)
