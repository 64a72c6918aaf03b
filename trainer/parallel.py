"""The distributed seams of the trainer: one accelerator, wrapped networks, rank agreement, sharding.

Launch as users do: `accelerate launch --multi_gpu --num_processes N -m trainer SPEC` (GPU or CPU; on a
machine without CUDA the processes join a gloo group as MULTI_CPU), or `torchrun --nproc_per_node N -m trainer`.

Design:
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
- Start-up (process-group init, the teacher load, caption encoding, network wrapping, resume) runs under
  the start-up timeout (`FLASHDMD_STARTUP_TIMEOUT_S`, default 7200 s); `start_training` then sets the training
  timeout (`FLASHDMD_DIST_TIMEOUT_S`, default 1800 s). The process entry reads both (trainer/hooks.py) and
  passes them in. A collective that cannot complete fails with a
  TrainingError (or torch's timeout error), which the loop reports as a `failed` event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.hooks import DEFAULT_STARTUP_TIMEOUT_S, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

# The timeouts the process group was given (seconds), for the messages of a collective that timed out:
# `init_state` records the start-up one, `start_training` the training one.
_timeouts = {"startup": DEFAULT_STARTUP_TIMEOUT_S, "train": DEFAULT_TIMEOUT_S}


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def init_state(startup_timeout_s: float | None = None) -> PartialState:
    """The process group, created once per process (gloo on CPU, NCCL on GPU) with the start-up timeout
    (None: the one recorded by an earlier call, else the default)."""
    from accelerate import PartialState

    if startup_timeout_s is not None:
        _timeouts["startup"] = float(startup_timeout_s)
    return PartialState(cpu=use_cpu(), timeout=timedelta(seconds=_timeouts["startup"]))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def startup_barrier(what: str) -> None:
    """Wait for every rank under the start-up timeout; a rank that does not come fails with what it was doing."""
    if not _distributed():
        return
    try:
        torch.distributed.barrier()
    except RuntimeError as err:
        from trainer.errors import TrainingError

        raise TrainingError(f"rank {torch.distributed.get_rank()}: the other ranks did not finish {what} within "
                            f"{_timeouts['startup']:.0f} s (FLASHDMD_STARTUP_TIMEOUT_S): {err}") from None


@contextlib.contextmanager
def main_process_first(acc: Accelerator, what: str) -> Iterator[None]:
    """Rank 0 runs the body first (a download, a build), the others then find its result; both waits are
    start-up barriers (accelerate's main_process_first would wait under the training timeout)."""
    if not acc.is_main_process:
        startup_barrier(what)
    yield
    if acc.is_main_process:
        startup_barrier(what)


def start_training(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Every rank is set up: from here a collective that waits longer than the training timeout fails."""
    _timeouts["train"] = float(timeout_s)
    if _distributed():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=timeout_s))


def make_accelerator(mixed_precision: str, startup_timeout_s: float | None = None,
                     **tracking: object) -> Accelerator:
    """The run's Accelerator. fp16 on a CPU: fp32 compute (no fp16 autocast there) with a real GradScaler.

    Keeping the scaler on the CPU means a CPU run of an fp16 spec exercises the same unscale / skip / update
    path as a GPU run; only the autocast dtype differs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    init_state(startup_timeout_s)
    cpu_fp16 = mixed_precision == "fp16" and use_cpu()
    # gradient_as_bucket_view: each .grad is a view into DDP's all-reduce bucket, not a second copy of every
    # gradient (measured on the CPU: a 256 MiB layer grew by 516 MiB after one backward without it, 256 MiB
    # with it; tests/dist/test_ddp_memory.py).
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=_timeouts['startup'])), ddp]
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


# Shard units: a module of one of these classes becomes its own FSDP2 unit (diffusers' UNet ResNet and
# transformer blocks; SD3/Flux transformer blocks). Finer units mean a smaller peak of gathered weights
# (SDXL's up_blocks.0 alone is 1.2B parameters) and gathers that overlap the previous unit's compute.
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
                "FluxSingleTransformerBlock")


def _is_unit(m: nn.Module) -> bool:
    # by the class's lineage: fully_shard swaps a module's class for an FSDP subclass of it
    return any(c.__name__ in UNIT_CLASSES for c in type(m).__mro__)


def _block_units(block: nn.Module) -> list[nn.Module]:
    """A UNet block's ResNet and transformer blocks in forward order (resnet i, then attention i), then the
    block itself, which keeps what is left (the attentions' projections and norms, down/up samplers)."""
    resnets = list(getattr(block, "resnets", None) or [])
    attns = list(getattr(block, "attentions", None) or [])
    units: list[nn.Module] = []
    for i, res in enumerate(resnets):
        units.append(res)
        if i < len(attns):
            units += [m for m in attns[i].modules() if _is_unit(m)]
    units += [m for a in attns[len(resnets):] for m in a.modules() if _is_unit(m)]
    return [*units, block]


def shard_blocks(net: nn.Module) -> list[nn.Module]:
    """The FSDP2 shard units of a denoiser, in forward order and in the order they are sharded (each unit
    before the block that contains it); the root, sharded last, is not listed.

    UNet: per down/mid/up block, each ResNet block and each transformer block, then the block itself.
    Transformer (SD3): each transformer block. The memory plan reads the unit list from here.
    """
    units: list[nn.Module] = []
    for block in list(getattr(net, "down_blocks", None) or []):
        units += _block_units(block)
    mid = getattr(net, "mid_block", None)
    if mid is not None:
        units += _block_units(mid)
    for block in list(getattr(net, "up_blocks", None) or []):
        units += _block_units(block)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        units += list(getattr(net, name, None) or [])
    return units


def mp_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision under bf16: gather the weights in bf16 (half the bytes, and the dtype autocast
    computes in anyway) and reduce-scatter the gradients in fp32 (sums of 8+ ranks' bf16 gradients lose
    precision). Otherwise fp32 throughout: fp16 keeps fp32 weights for its GradScaler, as DDP does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fully_shard_net(net: nn.Module, mixed_precision: str = "no", mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2: shard each unit of `shard_blocks`, then the root (its own small layers are one more unit).

    Units reshard after forward (only one unit's full weights live at a time); the root keeps its few
    weights gathered between forward and backward, as FSDP2 does by default for the root.
    mesh: the device mesh (default: one over the whole default group); a trace on fake tensors builds it
    outside FakeTensorMode and passes it here.
    """
    from torch.distributed.fsdp import fully_shard

    policy = mp_policy(mixed_precision)
    for unit in shard_blocks(net):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return net


def _fsdp_units(net: nn.Module | None) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in (net.modules() if net is not None else []) if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(net: nn.Module | None, *, through_backward: bool = False) -> Iterator[None]:
    """Keep an FSDP2 network's full weights gathered for a stretch of forwards: one all-gather per unit on
    first use, instead of one per unit per forward. For the no-grad backward simulation and rollouts
    (Alg. 1 lines 5-8, Eq. 8; stage 2's rollouts), which call the generator up to K times in a row, and for a
    training phase's micro-batches (`through_backward`: the backward keeps them too, so the next
    micro-batch's forward does not gather again). Costs one unsharded copy of the network (in the gather
    dtype: bf16 under mixed precision) for the duration. On exit every unit is resharded and the
    after-forward/after-backward policy of `fully_shard_net` is restored. A no-op for an unsharded network.
    """
    units = _fsdp_units(net)
    if not units:
        yield
        return
    root = units[0] if units[0] is net else None
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        if through_backward:
            m.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not root, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
            m.reshard()


def wrap(acc: Accelerator, net: nn.Module, sharding: str) -> nn.Module:
    """The network as its owning loss calls it: DDP-prepared (ddp), or sharded in place (fsdp)."""
    if sharding == "fsdp" and acc.num_processes > 1:
        return fully_shard_net(net, acc.mixed_precision)
    return acc.prepare(net)


@contextlib.contextmanager
def no_sync(acc: Accelerator, *nets: nn.Module | None, enabled: bool = True) -> Iterator[None]:
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


def agree_any(acc: Accelerator, *flags: bool) -> list[bool]:
    """For each flag: is it set on any rank? One all-reduce (MAX) for all flags; every rank gets the same."""
    if acc.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=acc.device)
    try:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    except RuntimeError as err:  # gloo raises on timeout; NCCL's watchdog aborts the process itself
        from trainer.errors import TrainingError

        raise TrainingError(f"rank {acc.process_index}: the other ranks did not join a collective within "
                            f"{_timeouts['train']:.0f} s (FLASHDMD_DIST_TIMEOUT_S); a rank is stuck "
                            f"or died: {err}") from None
    return [bool(v) for v in t.tolist()]


def full_norm(norm: torch.Tensor) -> float:
    """A grad norm as a float; FSDP2's clip returns a DTensor, whose full value is the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over parameters with gradients; returns the global norm before clipping.

    One optimiser may hold both FSDP2-sharded (DTensor) and replicated parameters (dmd2's fake score and
    its DDP latent head): torch's clip cannot mix the two, so each kind's norm is taken apart and the
    gradients scaled by the coefficient of their combined norm, as clip_grad_norm_ would.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    if len(groups) < 2:
        return full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [full_norm(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups]
    total = sum(n * n for n in norms) ** 0.5
    coef = min(1.0, max_norm / (total + 1e-6))
    with torch.no_grad():
        for p in params:
            p.grad.mul_(coef)
    return total

