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

`optim.adamw8bit_backend` picks the library behind `adamw8bit`:

- `bitsandbytes` (the default): as above.
- `torchao`: torchao's `AdamW8bit`, the same block-wise scheme (block 256, signed dynamic map for exp_avg,
  unsigned for exp_avg_sq, fp32 states for tensors under 4096 elements) written in Python and compiled by
  torch.compile into Triton kernels, so it needs no CUDA extension build and its wheel is 3.4 MB against
  bitsandbytes' tens of MB; that is what lets the GPU check carry it to an offline machine (bench/README.md).
  It also quantises only tensors whose size is a multiple of the block; every such SDXL UNet tensor is, so its
  state bytes equal bitsandbytes' there. On CPU parameters the step runs eagerly: compiling it with the C++
  backend costs about a minute per parameter shape, for the same arithmetic.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.jobspec import OptimizerSpec

# bitsandbytes' defaults (bitsandbytes/optim/optimizer.py): states of smaller tensors stay fp32,
# and the block-wise quantiser keeps one fp32 absmax per block of 256 elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
GPU_EXTRA = "pip install 'flashdmd[gpu]'"
BACKENDS = ("bitsandbytes", "torchao")


def trainable(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters that require grad, from a module or an iterable of tensors."""
    it = params.parameters() if isinstance(params, nn.Module) else params
    return [p for p in it if p.requires_grad]


def runtime_problem(kind: str, *, backend: str = "bitsandbytes", cuda: bool | None = None,
                    has_lib: bool | None = None) -> str | None:
    """Why `kind` (with `backend` for adamw8bit) cannot run on this machine, or None. `cuda`/`has_lib` default
    to what this process sees (`has_lib`: the backend's package is importable)."""
    if kind == "adamw":
        return None
    if kind != "adamw8bit":
        return f"optim.optimizer: unknown optimiser {kind!r} (adamw, adamw8bit)"
    if backend not in BACKENDS:
        return f"optim.adamw8bit_backend: unknown backend {backend!r} ({', '.join(BACKENDS)})"
    if backend == "torchao":  # runs on CPU too (eagerly), so only the package matters
        has_lib = importlib.util.find_spec("torchao") is not None if has_lib is None else has_lib
        return None if has_lib else "optim.adamw8bit_backend: torchao needs the torchao package: pip install torchao"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return ("optim.optimizer: adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels) and this machine "
                "has none; use optim.optimizer: adamw, or optim.adamw8bit_backend: torchao")
    has_lib = importlib.util.find_spec("bitsandbytes") is not None if has_lib is None else has_lib
    if not has_lib:
        return f"optim.optimizer: adamw8bit needs the bitsandbytes package: {GPU_EXTRA}"
    return None


def check_runtime(cfg: Any) -> None:
    """Refuse, before anything is loaded, a spec whose levers this machine cannot run (InputError, exit 2).

    Spec validation (trainer/jobspec/) must not import torch, so the checks that need to know the machine
    live here; the trainer CLI and `train()` call this before loading a model.
    """
    optim = getattr(cfg, "optim", None)
    if optim is None:  # eval jobs train nothing
        return
    problem = runtime_problem(optim.optimizer, backend=optim.adamw8bit_backend)
    if problem:
        raise InputError(problem)


def _bnb_adamw8bit(params: list[torch.Tensor], spec: OptimizerSpec) -> torch.optim.Optimizer:
    problem = runtime_problem("adamw8bit")
    if problem:
        raise InputError(problem)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                               weight_decay=spec.weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)


def _torchao_adamw8bit(params: list[torch.Tensor], spec: OptimizerSpec) -> torch.optim.Optimizer:
    problem = runtime_problem("adamw8bit", backend="torchao")
    if problem:
        raise InputError(problem)
    from torchao.optim import AdamW8bit

    class TorchaoAdamW8bit(AdamW8bit):
        """torchao's AdamW8bit with a float learning rate outside `step`, like every other torch optimiser.

        torchao keeps each group's lr as a tensor (a float would recompile its step kernel at every new value)
        and refuses a float at step time; our schedulers and stage 2's shared optimiser assign floats. So the
        lr is a float between steps and a fresh 0-d tensor during one."""

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            super().add_param_group(param_group)
            self.param_groups[-1]["lr"] = float(self.param_groups[-1]["lr"])

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            lrs = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32)
            eager = not any(p.is_cuda for g in self.param_groups for p in g["params"])
            try:
                with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                    return super().step(closure)
            finally:
                for g, lr in zip(self.param_groups, lrs, strict=True):
                    g["lr"] = float(lr)

    return TorchaoAdamW8bit(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                            weight_decay=spec.weight_decay, block_size=BNB_BLOCK)


def build_optimizer(params: nn.Module | Iterable[torch.Tensor], spec: OptimizerSpec,
                    kind: str = "adamw", backend: str = "bitsandbytes") -> torch.optim.Optimizer:
    """The optimiser `kind` (the spec's optim.optimizer; `backend`: its optim.adamw8bit_backend) over the
    trainable parameters of `params`."""
    ps = trainable(params)
    if kind == "adamw8bit":
        if backend == "torchao":
            return _torchao_adamw8bit(ps, spec)
        if backend != "bitsandbytes":
            raise ValueError(f"optim.adamw8bit_backend: unknown backend {backend!r}")
        return _bnb_adamw8bit(ps, spec)
    if kind != "adamw":
        raise ValueError(f"optim.optimizer: unknown optimiser {kind!r}")
    # The fused kernel wants plain CUDA tensors; FSDP2's DTensor parameters (they have a device_mesh) keep the
    # default implementation.
    fused = bool(ps) and all(p.is_cuda and p.is_floating_point() and not hasattr(p, "device_mesh") for p in ps)
    return torch.optim.AdamW(ps, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                             eps=spec.eps, fused=fused or None)


# -------------------------------------------------------------------- state sizes (for trainer/plan.py)
def adamw_state_bytes(shapes: Iterable[int], kind: str, backend: str = "bitsandbytes") -> int:
    """Bytes of optimiser state after the first step, for parameter tensors of the given element counts.

    adamw: exp_avg + exp_avg_sq in fp32 (8 B/element) and a 4-byte `step` tensor per parameter.
    adamw8bit: two uint8 states + one fp32 absmax per 256-element block + a 256-entry fp32 quantisation
    map each, for tensors of at least
    4096 elements; smaller tensors keep fp32 states (bitsandbytes' min_8bit_size). `step` is kept per
    param group by bitsandbytes, not per tensor. torchao quantises only sizes that are a multiple of the
    block and keeps a 4-byte `step` tensor per parameter.
    """
    total = 0
    for n in shapes:
        quantised = n >= BNB_MIN_8BIT_SIZE and (backend == "bitsandbytes" or n % BNB_BLOCK == 0)
        if kind == "adamw8bit" and quantised:
            total += 2 * (n + 4 * -(-n // BNB_BLOCK) + 4 * 256)  # states, absmax, 256-entry qmap each
        elif kind == "adamw8bit":
            total += 8 * n
        else:
            total += 8 * n + 4
        if kind == "adamw8bit" and backend == "torchao":
            total += 4
    return total


def _tensor_bytes(v: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a wrapper subclass (torchao's 8-bit states report the
    logical fp32 shape; their storage is the uint8 codes, the block scales and the map)."""
    if hasattr(v, "__tensor_flatten__") and type(v) is not torch.Tensor:
        names, _ = v.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(v, name)) for name in names)
    return v.numel() * v.element_size()


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Measured bytes of every tensor in an optimiser's state."""
    return sum(_tensor_bytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
