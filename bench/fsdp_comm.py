"""FSDP2 communication per training iteration: bytes all-gathered and reduce-scattered, before and after.

"before" is the sharding the trainer had until this change, reproduced here by patching the three decision
points of trainer/parallel.py: whole down/mid/up blocks as shard units, no mixed-precision policy (fp32
gathers and reduce-scatters), and no `gathered` stretches (every forward, including the no-grad backward
simulation and the Eq. 8 rollouts, gathers the whole network again). "after" is the trainer as it is.

Two measurements:
  (a) tiny SDXL (presets/tiny-sdxl.yaml), 2 gloo ranks, the real `Distiller.step` (counted over steps 1..N
      after one warm-up step). Beside it, the same iteration replayed as a fixed sequence of UNet calls
      (`replay`, below); the two agree, which is what lets (b) use the replay.
  (b) the SDXL preset (presets/sdxl-4step-8gpu.yaml: bf16, grad_accum 4, K = 4) with the real SDXL UNet
      config (trainer/arch/sdxl-base/unet), rank 0 of a fake process group of 8, on fake tensors: no real
      weights are ever allocated. The device mesh is built outside FakeTensorMode.

Bytes are counted by wrapping torch.distributed's all_gather_single / reduce_scatter_single (what FSDP2
calls) and all_reduce: an all-gather counts its full output, a reduce-scatter its full input, per rank (ring
algorithms move (N-1)/N of that over each rank's link). They depend on parameter counts only, not on the
batch or resolution, so (b) replays at a small latent.

    python bench/fsdp_comm.py                 # both; prints a table, writes bench/results/fsdp_comm.json
    python bench/fsdp_comm.py --skip-sdxl     # (a) only (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

OUT = REPO / "bench" / "results" / "fsdp_comm.json"
GiB = 2**30


# ---------------------------------------------------------------- counting
class CommCounter:
    """Bytes per collective kind, from wrappers around the torch.distributed functions FSDP2 and DDP call."""

    def __init__(self) -> None:
        self.bytes = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self.calls = {k: 0 for k in self.bytes}
        self.on = False

    def _add(self, kind: str, t: torch.Tensor) -> None:
        if self.on:
            self.bytes[kind] += t.numel() * t.element_size()
            self.calls[kind] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[CommCounter]:
        ag, rs, ar = dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce

        def all_gather_single(output, input, *a, **k):  # noqa: ANN001, ANN202, A002
            self._add("all_gather", output)
            return ag(output, input, *a, **k)

        def reduce_scatter_single(output, input, *a, **k):  # noqa: ANN001, ANN202, A002
            self._add("reduce_scatter", input)
            return rs(output, input, *a, **k)

        def all_reduce(tensor, *a, **k):  # noqa: ANN001, ANN202
            self._add("all_reduce", tensor)
            return ar(tensor, *a, **k)

        dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce = (all_gather_single,
                                                                               reduce_scatter_single, all_reduce)
        try:
            yield self
        finally:
            dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce = ag, rs, ar

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)


# ---------------------------------------------------------------- the sharding before this change
def _legacy_units(net: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += list(getattr(net, name, None) or [])
    mid = getattr(net, "mid_block", None)
    return blocks + ([mid] if mid is not None else [])


@contextlib.contextmanager
def _no_hold(net: nn.Module | None, *, through_backward: bool = False) -> Iterator[None]:
    yield


@contextlib.contextmanager
def sharding(mode: str) -> Iterator[Callable]:
    """mode "after": the trainer as it is; "before": whole-block units, fp32 collectives, no gathered stretches.
    Yields the `gathered` context manager in force."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import trainer.distill as distill
    import trainer.parallel as parallel

    if mode == "after":
        yield parallel.gathered
        return
    saved = parallel.shard_blocks, parallel.mp_policy, distill.gathered
    parallel.shard_blocks, distill.gathered = _legacy_units, _no_hold
    parallel.mp_policy = lambda _mp: MixedPrecisionPolicy()
    try:
        yield _no_hold
    finally:
        parallel.shard_blocks, parallel.mp_policy, distill.gathered = saved


# ---------------------------------------------------------------- the replay of one iteration's UNet calls
def replay(gen: nn.Module, fake: nn.Module, call: Callable[[nn.Module], torch.Tensor], *, k: int, K: int,
           accum: int, hold: Callable) -> None:
    """The FSDP-relevant calls of one flash iteration on a generator turn (trainer/distill.py):
    generator phase per micro-batch: k no-grad simulation forwards (backward_simulate), x = G(x_tau) with
    grad, the fake score's no-grad forward of Eq. 4, K-1-k no-grad rollout forwards (Eq. 8), G at t_hat with
    grad (Eq. 9), one backward; gradient sync on the last micro-batch only. Fake-score phase: one forward and
    backward per micro-batch. The teacher (unsharded, frozen), the VAE and the DDP D heads make no FSDP
    traffic. `hold` is the `gathered` of the mode measured."""

    def sync(net: nn.Module, on: bool) -> None:
        net.set_requires_gradient_sync(on)

    with hold(gen, through_backward=True):
        for m in range(accum):
            with torch.no_grad():
                for _ in range(k):
                    call(gen)
            sync(gen, m + 1 == accum)
            x = call(gen)
            with torch.no_grad():
                call(fake)
                for _ in range(K - 1 - k):
                    call(gen)
            x_hat = call(gen)
            (x.float().mean() + x_hat.float().mean()).backward()
            sync(gen, True)
    with hold(fake, through_backward=True):
        for m in range(accum):
            sync(fake, m + 1 == accum)
            call(fake).float().mean().backward()
            sync(fake, True)
    for net in (gen, fake):
        for p in net.parameters():
            p.grad = None


def unet_call(net: nn.Module, x: torch.Tensor, cond: dict[str, Any], autocast: bool) -> torch.Tensor:
    t = torch.full((x.shape[0],), 999, dtype=torch.long, device=x.device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return net(x, t, **cond).sample


# ---------------------------------------------------------------- (a) tiny SDXL, 2 gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_worker(rank: int, world: int, port: int, overrides: list[str], mode: str, steps: int,
                queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from trainer.data import build_dataset, sharded_batches
    from trainer.distill import Distiller
    from trainer.jobspec import load_spec
    from trainer.models import load_teacher
    from trainer.parallel import make_accelerator

    cfg = load_spec(REPO / "presets" / "tiny-sdxl.yaml", ["train.sharding=fsdp", *overrides])
    acc = make_accelerator(cfg.train.mixed_precision)
    torch.manual_seed(cfg.train.seed)
    with acc.main_process_first():
        teacher = load_teacher(cfg.model, acc.device, cfg.schedule.shift)
    ds = build_dataset(cfg.data, teacher.resolution, cfg.train.seed)
    t = cfg.train
    counter = CommCounter()
    with counter.installed(), sharding(mode) as hold:
        d = Distiller.for_job(cfg, teacher, acc)
        batches = sharded_batches(ds, t.batch_size, t.seed, rank=rank, world=world, accum=t.grad_accum)
        d.step(next(batches), 0)  # warm-up: FSDP2's lazy init
        counter.on = True
        for s in range(1, steps + 1):
            d.step(next(batches), s)
        counter.on = False
        real = {k: v / steps for k, v in counter.bytes.items()}
        counter.bytes = dict.fromkeys(counter.bytes, 0)
        mb = d.micro_batches(next(batches)[0], 0)[0]
        x = torch.randn(d.teacher.latent_shape(t.batch_size))
        cond = {"encoder_hidden_states": mb.cond.embeds,
                "added_cond_kwargs": {"text_embeds": mb.cond.pooled, "time_ids": mb.cond.time_ids}}
        counter.on = True
        replay(d.generator, d.fake, lambda net: unet_call(net, x, cond, t.mixed_precision == "bf16"),
               k=1, K=len(d.S), accum=t.grad_accum, hold=hold)
        counter.on = False
    if rank == 0:
        params = sum(p.numel() for p in d.generator.parameters())  # a DTensor's numel is the global one
        queue.put({"real": real, "replay": dict(counter.bytes), "unet_params": params})
    dist.barrier()
    dist.destroy_process_group()


def run_tiny(overrides: list[str], mode: str, steps: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=tiny_worker, args=(r, 2, port, overrides, mode, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    # Poll: a rank that dies before putting its result must fail the run now, not after the queue's timeout.
    deadline = time.monotonic() + 900
    while True:
        try:
            out = queue.get(timeout=2)
            break
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"tiny {mode}: a rank exited with {dead} before reporting" if dead else
                                   f"tiny {mode}: no result within 900 s") from None
    for p in procs:
        p.join(timeout=120)
        if p.exitcode != 0:
            raise RuntimeError(f"tiny {mode} rank exited with {p.exitcode}")
    return out


# ---------------------------------------------------------------- (b) the SDXL preset, fake group of 8
def run_sdxl(mode: str, world: int, accum: int, K: int, mixed_precision: str) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import trainer.parallel as parallel

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # outside FakeTensorMode
    config = UNet2DConditionModel.load_config(str(REPO / "trainer" / "arch" / "sdxl-base" / "unet"))
    counter = CommCounter()
    with FakeTensorMode(), counter.installed(), sharding(mode) as hold:
        gen, fake = UNet2DConditionModel.from_config(config), UNet2DConditionModel.from_config(config)
        params = sum(p.numel() for p in gen.parameters())
        for net in (gen, fake):
            parallel.fully_shard_net(net, mixed_precision, mesh=mesh)
        b = 1
        x = torch.randn(b, 4, 16, 16)  # bytes do not depend on the latent size; a small one is faster
        cond = {"encoder_hidden_states": torch.randn(b, 77, 2048),
                "added_cond_kwargs": {"text_embeds": torch.randn(b, 1280), "time_ids": torch.randn(b, 6)}}
        counter.on = True
        replay(gen, fake, lambda net: unet_call(net, x, cond, mixed_precision == "bf16"), k=1, K=K, accum=accum,
               hold=hold)
    return {"replay": dict(counter.bytes), "calls": dict(counter.calls), "unet_params": params,
            "units": len(parallel.shard_blocks(gen)) if mode == "after" else len(_legacy_units(gen))}


def _fsdp_bytes(b: dict[str, float]) -> float:
    return b["all_gather"] + b["reduce_scatter"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="tiny: iterations counted after the warm-up")
    args = ap.parse_args()
    from trainer.jobspec import load_spec

    results: dict[str, Any] = {"command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]),
                               "torch": torch.__version__, "rows": []}
    tiny_cfgs = {"tiny-sdxl (fp32, grad_accum 1, batch 2)": ["train.batch_size=2"],
                 "tiny-sdxl (bf16, grad_accum 4, batch 2)": ["train.batch_size=2", "train.grad_accum=4",
                                                             "train.mixed_precision=bf16"]}
    if not args.skip_tiny:
        for name, ov in tiny_cfgs.items():
            row: dict[str, Any] = {"case": name, "world": 2, "backend": "gloo"}
            for mode in ("before", "after"):
                t0 = time.perf_counter()
                row[mode] = run_tiny(ov, mode, args.steps)
                row[mode]["seconds"] = round(time.perf_counter() - t0, 1)
            row["ratio_real"] = _fsdp_bytes(row["before"]["real"]) / _fsdp_bytes(row["after"]["real"])
            row["ratio_replay"] = _fsdp_bytes(row["before"]["replay"]) / _fsdp_bytes(row["after"]["replay"])
            results["rows"].append(row)
    if not args.skip_sdxl:
        spec = load_spec(REPO / "presets" / "sdxl-4step-8gpu.yaml")
        t = spec.train
        row = {"case": f"sdxl-4step-8gpu ({t.mixed_precision}, grad_accum {t.grad_accum})",
               "world": t.num_processes, "backend": "fake"}
        for mode in ("before", "after"):
            t0 = time.perf_counter()
            row[mode] = run_sdxl(mode, t.num_processes, t.grad_accum, spec.schedule.num_steps, t.mixed_precision)
            row[mode]["seconds"] = round(time.perf_counter() - t0, 1)
        row["ratio_replay"] = _fsdp_bytes(row["before"]["replay"]) / _fsdp_bytes(row["after"]["replay"])
        results["rows"].append(row)
    print(table(results["rows"]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT.relative_to(REPO)}")


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'case':44} {'how':7} {'AG before':>10} {'RS before':>10} {'AG after':>10} {'RS after':>10} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    unit = lambda v: f"{v / GiB:8.3f}Gi" if v >= GiB / 10 else f"{v / 2**20:8.2f}Mi"  # noqa: E731
    for r in rows:
        for how in ("real", "replay"):
            if how not in r["before"]:
                continue
            b, a = r["before"][how], r["after"][how]
            lines.append(f"{r['case']:44} {how:7} {unit(b['all_gather']):>10} {unit(b['reduce_scatter']):>10} "
                         f"{unit(a['all_gather']):>10} {unit(a['reduce_scatter']):>10} "
                         f"{_fsdp_bytes(b) / _fsdp_bytes(a):5.2f}x")
    lines.append("AG/RS: bytes all-gathered / reduce-scattered per iteration per rank (full buffers); "
                 "real = Distiller.step, replay = its UNet calls")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
