"""The distributed seams of the trainer: one accelerator, wrapped networks, rank agreement, sharding.

Launch as users do: `accelerate launch --multi_gpu --num_processes N -m trainer SPEC` (GPU or CPU; on a
machine without CUDA the processes join a gloo group as MULTI_CPU), or `torchrun --nproc_per_node N -m trainer`.

Design (issue 10):
- DDP with several forwards per step. Each network's DDP wrapper is called exactly once per micro-batch, by
  the forward that carries that network's own loss (G: x = G(x_tau); fake score: Eq. 6; D heads: real and fake
  images concatenated into one call). Every other forward (no-grad backward simulation, the frozen fake score
  inside the DM loss, the frozen D inside G's adversarial loss, G's Eq. 9 forward at t_hat) calls the
  underlying module. Gradients of those extra forwards still reach the same leaf parameters and are summed by
  autograd before the one gradient hook per parameter fires, so the bucketed all-reduce sees the full gradient.
  This keeps `find_unused_parameters=False` (no extra graph traversal) and lets frozen networks toggle
  `requires_grad` without confusing the reducer.
- FSDP2 (`train.sharding: fsdp`): torch's `fully_shard` is applied here, the same on GPU (NCCL) and CPU (gloo),
  because accelerate's FSDP plugin needs GPUs. Models are then not passed to `accelerator.prepare` (it would
  add a DDP wrapper on top); their optimisers are.
- Every control-flow decision goes through `agree_any`, one small all-reduce, so all ranks act together.
- A collective that cannot complete fails after the process-group timeout (`FLASHDMD_DIST_TIMEOUT_S`,
  default 1800 s) with torch's timeout error, which the loop reports as a `failed` event.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
from torch import nn

DEFAULT_TIMEOUT_S = 1800


def dist_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("FLASHDMD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def init_state():  # noqa: ANN201
    """The process group, created once per process (gloo on CPU, NCCL on GPU) with our timeout."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(), timeout=dist_timeout())


def make_accelerator(mixed_precision: str, **tracking: object):  # noqa: ANN201
    """The run's Accelerator. fp16 on a CPU: fp32 compute (no fp16 autocast there) with a real GradScaler.

    Keeping the scaler on the CPU means a CPU run of an fp16 spec exercises the same unscale / skip / update
    path as a GPU run; only the autocast dtype differs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    init_state()
    cpu_fp16 = mixed_precision == "fp16" and use_cpu()
    handlers = [InitProcessGroupKwargs(timeout=dist_timeout()), DistributedDataParallelKwargs()]
    # tracking: log_with and project_config for train.report_to (trainer/trackers.py accelerator_kwargs)
    acc = Accelerator(cpu=use_cpu(), mixed_precision="no" if cpu_fp16 else mixed_precision, kwargs_handlers=handlers,
                      **tracking)
    if acc.distributed_type.name == "FSDP":
        from trainer.errors import InputError

        raise InputError("this run was launched with accelerate's FSDP plugin; the trainer applies FSDP2 itself: "
                         "launch with a multi-GPU config (deploy/accelerate/ddp.yaml or --multi_gpu) and set "
                         "train.sharding: fsdp in the spec")
    if cpu_fp16:
        acc.scaler = torch.amp.GradScaler("cpu")
    # Accelerate would also write every prepared model into state/; checkpoint.py writes the weights itself.
    acc.register_save_state_pre_hook(lambda models, weights, _dir: (models.clear(), weights.clear()))
    acc.register_load_state_pre_hook(lambda models, _dir: models.clear())
    return acc


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def shard_blocks(net: nn.Module) -> list[nn.Module]:
    """The sub-modules FSDP2 shards one by one: a UNet's down/mid/up blocks, a transformer's blocks."""
    blocks: list[nn.Module] = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += list(getattr(net, name, None) or [])
    mid = getattr(net, "mid_block", None)
    return blocks + ([mid] if mid is not None else [])


def fully_shard_net(net: nn.Module) -> nn.Module:
    """FSDP2: shard each block, then the root (so the root's own small layers are one more unit)."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_blocks(net):
        fully_shard(block)
    fully_shard(net)
    return net


def wrap(acc, net: nn.Module, sharding: str) -> nn.Module:  # noqa: ANN001
    """The network as its owning loss calls it: DDP-prepared (ddp), or sharded in place (fsdp)."""
    if sharding == "fsdp" and acc.num_processes > 1:
        return fully_shard_net(net)
    return acc.prepare(net)


@contextlib.contextmanager
def no_sync(acc, *nets: nn.Module | None, enabled: bool = True) -> Iterator[None]:  # noqa: ANN001
    """Skip the gradient all-reduce (accumulation micro-batches but the last): DDP's no_sync, FSDP2's flag."""
    if not enabled or acc.num_processes == 1:
        yield
        return
    with contextlib.ExitStack() as stack:
        for net in nets:
            if isinstance(net, nn.parallel.DistributedDataParallel):
                stack.enter_context(net.no_sync())
            elif net is not None and hasattr(net, "set_requires_gradient_sync"):  # an FSDP2 module
                net.set_requires_gradient_sync(False)
                stack.callback(net.set_requires_gradient_sync, True)
        yield


def agree_any(acc, *flags: bool) -> list[bool]:  # noqa: ANN001
    """For each flag: is it set on any rank? One all-reduce (MAX) for all flags; every rank gets the same."""
    if acc.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=acc.device)
    try:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    except RuntimeError as err:  # gloo raises on timeout; NCCL's watchdog aborts the process itself
        from trainer.errors import TrainingError

        raise TrainingError(f"rank {acc.process_index}: the other ranks did not join a collective within "
                            f"{dist_timeout().total_seconds():.0f} s (FLASHDMD_DIST_TIMEOUT_S); a rank is stuck "
                            f"or died: {err}") from None
    return [bool(v) for v in t.tolist()]


def full_norm(norm: torch.Tensor) -> float:
    """A grad norm as a float; FSDP2's clip returns a DTensor, whose full value is the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
