"""Small pieces of one training step: the agreed optimiser step, update records, temporary freezing,
spectral-norm power iterations under accumulation, micro-batch inputs, log averaging."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer.models import Cond
from trainer.parallel import agree_any, clip_grad_norm
from trainer.rng import Gen, SampleRNG

if TYPE_CHECKING:
    from accelerate import Accelerator


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Temporarily stop parameter grads (grads still flow to inputs), restoring the flags after."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def spectral_power(heads: nn.Module | None, update: bool):
    """Spectral norm runs one power iteration per forward in train mode. With grad_accum only the first
    micro-batch of a phase iterates (the others use the stored _u/_v, heads in eval mode), so a step with A
    micro-batches moves D exactly like one step with their union as a batch."""
    if heads is None or update:
        yield
        return
    heads.eval()
    try:
        yield
    finally:
        heads.train()


@dataclass
class Update:
    """What one optimiser update did: applied (finite) or skipped, and the pre-clip grad norm."""

    applied: bool
    grad_norm: float


def finish_update(acc: Accelerator, params: list[Tensor], opt: torch.optim.Optimizer, loss_finite: bool,
                  grad_clip: float | None) -> Update:
    """After the (accumulated) backward: agree, unscale, clip, step -- or skip on every rank together.

    The skip decision is agreed across ranks (a non-finite loss on any rank; the grad norm is computed
    from the already-synchronised gradients, so it is the same everywhere). With a GradScaler (fp16) a
    skipped step still calls `scaler.update()`, so the scale drops and the next unscale is legal.
    """
    (any_nonfinite,) = agree_any(acc, not loss_finite)
    scaler = acc.scaler
    if scaler is not None:
        scaler.unscale_(getattr(opt, "optimizer", opt))
    norm = clip_grad_norm(params, grad_clip or float("inf"))
    if any_nonfinite or not torch.isfinite(torch.tensor(norm)):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return Update(False, norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return Update(True, norm)


@dataclass
class Micro:
    """One micro-batch's inputs on this rank."""

    cond: Cond
    uncond: Cond
    rng: SampleRNG
    real: Tensor | None
    size: tuple[int, int] | None = None  # (height, width) in pixels of a bucketed batch; None: the resolution
    moments: Tensor | None = None  # cached VAE posterior parameters of `real` (trainer/datacache.py)


def mean_logs(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def cat_rng(gen: Gen) -> Gen:
    """Real and fake rows of one head call: the same samples' generators twice (real first, then fake)."""
    if isinstance(gen, SampleRNG):
        return gen.subset(list(range(len(gen))) * 2)
    return gen
