"""`flashdmd plan SPEC --trace`: one whole iteration of the real trainer, traced on fake tensors.

The iteration is the trainer's own code: `trainer.parallel.make_accelerator` and `wrap` (DDP, or FSDP2 as rank 0
of a fake process group of the spec's world size), the `Distiller`'s phases (generator DM + GAN turn,
fake-score and discriminator updates, with the spec's grad_accum) and, for stage 2, `JointRL.step` (rollouts,
the DPO update, then the distillation/critic turn). Networks are built from the teacher's configs under
`FakeTensorMode` (trainer/trace_fake.py), at the spec's resolution, precision, checkpointing and memory levers,
and torch's `MemTracker` (`FSDPMemTracker` under FSDP) counts every storage by category.

It runs in its own process (`python -m trainer.trace SPEC ... --json`, which `flashdmd plan --trace` starts), so
the process group and accelerate's singletons never leak into the caller.

What the trace cannot follow, and how the result accounts for it (listed in the output's `notes`):
- bitsandbytes' 8-bit AdamW allocates its states in a CUDA kernel: the trace runs fp32 AdamW and swaps its
  traced states for the 8-bit sizes (trainer.optim.adamw_state_bytes), a constant held all run;
- CPU AdamW (single-tensor) vs the GPU's fused kernel: both update in place, temporaries of one tensor at most;
- attention: CPU fake tensors dispatch SDPA to the CPU flash kernel, the GPU to flash / memory-efficient
  kernels; both keep the output and a log-sum-exp, not the score matrix (a few MiB of workspace differ);
- long accumulation: `--micro-batches M` traces M micro-batches; after the second, each further one adds only
  the tensors kept across the accumulation, which the CLI adds for the rest of train.grad_accum.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from typing import Any

import torch

GIB = 2.0**30
PLANT_ENV = "FLASHDMD_TRACE_PLANT_MIB"  # test hook: a buffer of this size kept by the generator across the step


def _init_world(world: int) -> None:
    """Rank 0 of a fake process group of `world` ranks (collectives are no-ops), set up as a launcher would."""
    if world <= 1:
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    # fully_shard (trainer.parallel.fully_shard_net passes no mesh) builds its default mesh on each call; built
    # under FakeTensorMode the mesh's rank tensor would be fake. Build it once here and hand it out.
    from torch.distributed.fsdp._fully_shard import _fully_shard

    mesh = init_device_mesh("cpu", (world,))
    _fully_shard._init_default_mesh = lambda: mesh


def _trace_spec(spec: Any) -> Any:
    """The spec the trace runs: fp32 AdamW in place of the CUDA-only 8-bit AdamW (corrected afterwards)."""
    if spec.optim.optimizer == "adamw":
        return spec
    return spec.model_copy(update={"optim": spec.optim.model_copy(update={"optimizer": "adamw"})})


@contextlib.contextmanager
def _no_weight_files():  # noqa: ANN202
    """Build the SAM encoder from segment-anything's classes without reading its checkpoint (shapes only)."""
    from trainer import discriminator

    saved = discriminator._load_encoder_weights
    discriminator._load_encoder_weights = lambda encoder, checkpoint: None  # noqa: ARG005
    try:
        yield
    finally:
        discriminator._load_encoder_weights = saved


@contextlib.contextmanager
def _fake_ddp_checks(world: int):  # noqa: ANN202
    """DDP's constructor compares parameter shapes across ranks and broadcasts rank 0's weights, both reading
    tensor data, which fake tensors have none of. Under a fake process group every rank is this one: skip them."""
    if world <= 1:
        yield
        return
    from torch.nn.parallel import distributed

    saved = distributed._verify_param_shape_across_processes, distributed._sync_module_states
    distributed._verify_param_shape_across_processes = lambda *a, **k: None
    distributed._sync_module_states = lambda *a, **k: None
    try:
        yield
    finally:
        distributed._verify_param_shape_across_processes, distributed._sync_module_states = saved


def _in_place_allreduce(d: Any) -> None:
    """DDP's default all-reduce hook returns the fake group's (empty) result; torch's no-op hook returns the
    bucket itself, which is what an in-place all-reduce leaves there, at the same memory."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    for net in (d.generator_w, d.fake_w, d.disc_w, d.latent_head_w):
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net.register_comm_hook(None, noop_hook)


def _prime_optimizers(opts: list[torch.optim.Optimizer]) -> None:
    """One step on zero gradients, so every optimiser holds its states as it does from step 2 on."""
    for opt in opts:
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)


def _label(tracker: Any, obj: Any, method: str, label: str) -> None:
    """Run obj.method (the real one) with the tracker's phase set to `label`."""
    real = getattr(obj, method)

    def labelled(*args: Any, **kwargs: Any) -> Any:
        outer, tracker.phase = tracker.phase, label
        try:
            return real(*args, **kwargs)
        finally:
            tracker.phase = outer

    setattr(obj, method, labelled)


def _plant(net: torch.nn.Module, mib: int) -> None:
    """Test hook: the generator's first forward allocates `mib` MiB and keeps them (a known extra allocation)."""
    def hook(module: torch.nn.Module, args: Any) -> None:
        if not hasattr(module, "_trace_planted"):
            module._trace_planted = torch.empty(mib * 2**20, dtype=torch.uint8)

    net.register_forward_pre_hook(hook)


def trace(spec: Any, gpus: int | None = None, micro_batches: int | None = None, *,
          plant_mib: int = 0) -> dict[str, Any]:
    """Trace one iteration of `spec` on `gpus` ranks (default train.num_processes) with `micro_batches`
    micro-batches (default train.grad_accum); returns the peak by category and where it happened.
    plant_mib: a test hook, a buffer of that size kept by the generator across the step (main reads it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.distill import Distiller
    from trainer.optim import adamw_state_bytes
    from trainer.parallel import make_accelerator
    from trainer.trace_fake import (
        FreshCopyMode,
        PeakTracker,
        ScalarMode,
        fake_batches,
        fake_lrm,
        fake_module_moves,
        fake_teacher,
    )

    t0 = time.perf_counter()
    world = gpus or spec.train.num_processes
    _init_world(world)
    run = _trace_spec(spec)
    m, t = run.memory, run.train
    sharded = t.sharding == "fsdp" and world > 1
    acc = make_accelerator(t.mixed_precision)
    n_micro = micro_batches or t.grad_accum
    plant = plant_mib
    fake = FakeTensorMode()
    with fake, ScalarMode(), FreshCopyMode(), fake_module_moves(fake), _no_weight_files(), \
            _fake_ddp_checks(world):
        teacher = fake_teacher(run, on_gpu_text=not m.text_cache)
        d = Distiller.for_job(run, teacher, acc)
        rl = reward = None
        if run.kind == "rl":
            from trainer.memory import reward_for_training
            from trainer.rl import JointRL

            if run.rl.reward.kind == "lrm":
                reward = reward_for_training(fake_lrm(teacher), run, acc)
            else:
                raise ValueError("the trace follows rl.reward.kind lrm (pixel rewards reuse the teacher)")
            rl = JointRL(d, reward, acc, rl=run.rl)
        _in_place_allreduce(d)
        opts = list(rl.optimizers().values() if rl else d.optimizers().values())
        _prime_optimizers(opts)
        nets = [d.generator, d.fake, d.disc, d.latent_head, teacher.denoiser, teacher.vae, *teacher.text_encoders()]
        if rl is not None:
            nets += [rl.ref, getattr(reward, "inner", reward)]
        # torch's FSDPMemTracker follows one FSDP root and one optimiser; an iteration has several of each, so
        # the trace counts with MemTracker's dispatch hooks, which see DTensor shards and FSDP's gather buffers
        # (trainer/trace_check.py checks both trackers give the same per-rank figures on a known model).
        tracker = PeakTracker()
        tracker.track_external(*[n for n in nets if n is not None], *opts)
        if plant:
            _plant(d.generator, plant)
        _label(tracker, d, "generator_phase", "generator phase")
        _label(tracker, d, "fake_score_phase", "fake-score phase")
        _label(tracker, d, "discriminator_phase", "discriminator phase")
        batches = fake_batches(run, teacher, n_micro, with_images=d.use_gan and d.flash)
        with tracker:
            if rl is None:
                d.step(batches, 0)
            else:
                _label(tracker, rl, "rl_update", "rl update (rollouts, DPO)")
                step = run.rl.ratio - 1 if run.rl.joint else 0  # the iteration with the distillation turn
                rl.step(([f"prompt {i}" for i in range(run.rl.batch_size or t.batch_size)], lambda: batches), step)
        peak = tracker.peak()
    # 8-bit AdamW: swap the traced fp32 states for bitsandbytes' sizes (both held all run).
    opt_swap = 0
    if spec.optim.optimizer != "adamw":
        for opt in opts:
            for group in getattr(opt, "optimizer", opt).param_groups:
                shapes = [p.numel() for p in group["params"]]
                opt_swap += adamw_state_bytes(shapes, spec.optim.optimizer) - adamw_state_bytes(shapes, "adamw")
    # DDP's Reducer allocates its flat gradient buckets in C++ when the network is wrapped, before the tracker
    # starts, and the gradients are views into them (gradient_as_bucket_view): held all run, so counted here.
    buckets = sum(p.numel() * p.element_size() for net in (d.generator_w, d.fake_w, d.disc_w, d.latent_head_w)
                  if isinstance(net, torch.nn.parallel.DistributedDataParallel)
                  for p in net.parameters() if p.requires_grad)
    total = peak.get("Total", 0) + opt_swap + buckets
    notes = [f"traced on {world} rank(s){' (fake process group, rank 0)' if world > 1 else ''}, "
             f"{n_micro} micro-batch(es) of {t.batch_size}"]
    if opt_swap:
        notes.append(f"optimiser states: bitsandbytes' 8-bit AdamW allocates them in a CUDA kernel; the trace ran "
                     f"fp32 AdamW and swapped its states for the 8-bit sizes ({opt_swap / GIB:+.2f} GiB)")
    if buckets:
        notes.append(f"DDP gradient buckets ({buckets / GIB:.2f} GiB): allocated by the Reducer in C++ when the "
                     "networks are wrapped, before the tracker starts; counted from the wrapped parameters")
    return {"peak_bytes": total, "by_category": {**peak, "Optstate (8-bit swap)": opt_swap,
                                                  "DDP gradient buckets (counted)": buckets},
            "peak_phase": tracker.peak_phase, "phase_peaks": tracker.phase_peaks, "world": world,
            "micro_batches": n_micro, "sharded": sharded, "opt_swap_bytes": opt_swap, "notes": notes,
            "seconds": time.perf_counter() - t0,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from trainer.cli import configure_process
    from trainer.jobspec import load_spec

    ap = argparse.ArgumentParser(prog="python -m trainer.trace", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--micro-batches", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configure_process()  # the model roots a teacher config is read under, the cache root
    out = trace(load_spec(args.spec, args.overrides), args.gpus, args.micro_batches,
                plant_mib=int(os.environ.get(PLANT_ENV, "0")))
    sys.stdout.write(json.dumps(out, default=str) + "\n")


if __name__ == "__main__":
    main()
