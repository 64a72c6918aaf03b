"""Optimiser construction: one seam for every trainer (stage 1, stage 2), so memory levers live in one place.

`build_optimizer(params, spec, kind)` returns the optimiser named by `optim.optimizer` in the job spec:

- `adamw`: torch AdamW. On CUDA it uses the fused kernel: the default multi-tensor ("foreach") step allocates
  a temporary as large as the parameters (sqrt of exp_avg_sq), ~9.6 GiB for an SDXL UNet, at the moment the
  gradients are alive as well. The fused kernel updates in place.
- `adamw8bit`: bitsandbytes' block-wise 8-bit AdamW (Dettmers et al. 2022). Each state is one byte per
  element plus one fp32 absmax per block of 256; tensors under 4096 elements keep fp32 states. We use
  bitsandbytes rather than torchao because it is what diffusers' training scripts, kohya and SimpleTuner use
  for SDXL (`--use_8bit_adam`), and because its CUDA kernels need no torch.compile warm-up. It needs CUDA, so
  `check_runtime` refuses it before a run starts (`optim.optimizer`), never mid-run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.config import OptimizerSpec
from trainer.errors import InputError

# bitsandbytes' defaults (bitsandbytes/optim/optimizer.py): states of smaller tensors stay fp32,
# and the block-wise quantiser keeps one fp32 absmax per block of 256 elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
GPU_EXTRA = "pip install 'flashdmd[gpu]'"


def trainable(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters that require grad, from a module or an iterable of tensors."""
    it = params.parameters() if isinstance(params, nn.Module) else params
    return [p for p in it if p.requires_grad]


def runtime_problem(kind: str, *, cuda: bool | None = None, has_bnb: bool | None = None) -> str | None:
    """Why `kind` cannot run on this machine, or None. `cuda`/`has_bnb` default to what this process sees."""
    if kind == "adamw":
        return None
    if kind != "adamw8bit":
        return f"optim.optimizer: unknown optimiser {kind!r} (adamw, adamw8bit)"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return ("optim.optimizer: adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels) and this machine "
                "has none; use optim.optimizer: adamw")
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None if has_bnb is None else has_bnb
    if not has_bnb:
        return f"optim.optimizer: adamw8bit needs the bitsandbytes package: {GPU_EXTRA}"
    return None


def check_runtime(cfg: Any) -> None:
    """Refuse, before anything is loaded, a spec whose levers this machine cannot run (InputError, exit 2).

    Spec validation (trainer/config.py) must not import torch, so the checks that need to know the machine
    live here; the trainer CLI and `train()` call this before loading a model.
    """
    optim = getattr(cfg, "optim", None)
    if optim is None:  # eval jobs train nothing
        return
    problem = runtime_problem(optim.optimizer)
    if problem:
        raise InputError(problem)


def _bnb_adamw8bit(params: list[torch.Tensor], spec: OptimizerSpec) -> torch.optim.Optimizer:
    problem = runtime_problem("adamw8bit")
    if problem:
        raise InputError(problem)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                               weight_decay=spec.weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)


def build_optimizer(params: nn.Module | Iterable[torch.Tensor], spec: OptimizerSpec,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """The optimiser `kind` (the spec's optim.optimizer) over the trainable parameters of `params`."""
    ps = trainable(params)
    if kind == "adamw8bit":
        return _bnb_adamw8bit(ps, spec)
    if kind != "adamw":
        raise ValueError(f"optim.optimizer: unknown optimiser {kind!r}")
    # The fused kernel wants plain CUDA tensors; FSDP2's DTensor parameters (they have a device_mesh) keep the
    # default implementation.
    fused = bool(ps) and all(p.is_cuda and p.is_floating_point() and not hasattr(p, "device_mesh") for p in ps)
    return torch.optim.AdamW(ps, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                             eps=spec.eps, fused=fused or None)


# -------------------------------------------------------------------- state sizes (for trainer/plan.py)
def adamw_state_bytes(shapes: Iterable[int], kind: str) -> int:
    """Bytes of optimiser state after the first step, for parameter tensors of the given element counts.

    adamw: exp_avg + exp_avg_sq in fp32 (8 B/element) and a 4-byte `step` tensor per parameter.
    adamw8bit: two uint8 states + one fp32 absmax per 256-element block + a 256-entry fp32 quantisation
    map each, for tensors of at least
    4096 elements; smaller tensors keep fp32 states (bitsandbytes' min_8bit_size). `step` is kept per
    param group by bitsandbytes, not per tensor.
    """
    total = 0
    for n in shapes:
        if kind == "adamw8bit" and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + 4 * -(-n // BNB_BLOCK) + 4 * 256)  # states, absmax, 256-entry qmap each
        elif kind == "adamw8bit":
            total += 8 * n
        else:
            total += 8 * n + 4
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Measured bytes of every tensor in an optimiser's state."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
