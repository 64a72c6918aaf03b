"""Known answers for the memory trackers the trace relies on (trainer/trace.py).

A stack of `layers` Linear(d, d) layers, each its own FSDP2 unit, sharded over a fake process group of `world`
ranks, trained one step with AdamW on fake tensors. Per rank, by hand:

    parameters  = P x 4 B / world       (P = layers x (d^2 + d), fp32 shards)
    gradients   = P x 4 B / world       (sharded after the reduce-scatter)
    optimiser   = 2 x P x 4 B / world   (exp_avg, exp_avg_sq) + 4 B per tensor (AdamW's `step`)

`python -m trainer.trace_check [--world N] [--no-correction]` prints the figures of torch's FSDPMemTracker
(with and without the optimiser-step correction of trainer/trace_fake.py) and of the trace's PeakTracker.
Runs in its own process: it creates the process group.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

D_MODEL, LAYERS = 512, 4


def expected(world: int, d: int = D_MODEL, layers: int = LAYERS) -> dict[str, float]:
    p = layers * (d * d + d)
    return {"params": 4 * p / world, "grads": 4 * p / world, "optim": 8 * p / world + 4 * 2 * layers}


def _category(snap: dict[Any, int], name: str) -> int:
    return sum(v for k, v in snap.items() if getattr(k, "value", k) == name)


def linear_stack(world: int, tracker: str, foreach: bool = False, prime: bool = True) -> dict[str, float]:
    """Peak figures per rank of one training step (prime: the states exist before it, as from step 2 on)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from trainer.trace_fake import CorrectedFSDPMemTracker, PeakTracker

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # outside FakeTensorMode: the mesh holds a real rank tensor
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    with FakeTensorMode():
        net = torch.nn.Sequential(*[torch.nn.Linear(D_MODEL, D_MODEL) for _ in range(LAYERS)])
        for layer in net:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=foreach or None)
        x = torch.randn(8, D_MODEL)
        if prime:
            net(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if tracker == "peak":
            mt: Any = PeakTracker()
            mt.track_external(net, opt)
        else:
            mt = (CorrectedFSDPMemTracker if tracker == "fsdp-corrected" else FSDPMemTracker)(net, opt)
        with mt:
            net(x).sum().backward()
            opt.step()
        peak = next(iter(mt.get_tracker_snapshot("peak").values()))
        now = next(iter(mt.get_tracker_snapshot("current").values()))
        held = sum(v._local_tensor.untyped_storage().nbytes() if hasattr(v, "_local_tensor")
                   else v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values())
    names = ("Sharded Param", "Parameter"), ("Sharded Grad", "Gradient"), ("OptState", "Optstate")
    return {"params": sum(_category(peak, n) for n in names[0]),
            "grads_after_step": _grads(net), "grads_tracked_now": sum(_category(now, n) for n in names[1]),
            "optim_at_peak": sum(_category(peak, n) for n in names[2]),
            "optim_held": held, "total_peak": _category(peak, "Total")}


def _grads(net: torch.nn.Module) -> int:
    """Bytes of the gradients the parameters hold now (local shards)."""
    total = 0
    for p in net.parameters():
        g = p.grad
        if g is not None:
            g = getattr(g, "_local_tensor", g)
            total += g.numel() * g.element_size()
    return total


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer.trace_check")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--tracker", choices=["fsdp", "fsdp-corrected", "peak"], default="fsdp-corrected")
    ap.add_argument("--foreach", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="no priming step: the states are created in the step")
    args = ap.parse_args(argv)
    got = linear_stack(args.world, args.tracker, args.foreach, prime=not args.fresh)
    sys.stdout.write(json.dumps({"measured": got, "expected": expected(args.world)}) + "\n")


if __name__ == "__main__":
    main()
