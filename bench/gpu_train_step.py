"""GPU benchmark of the memory levers: SDXL architecture, 1024², bf16, batch 1, each lever alone and the two
SDXL presets' levers, stage 1 and stage 2, with peak allocated/reserved memory beside `flashdmd plan`'s.

    python bench/gpu_train_step.py --configs s1-all,s2-all          # the presets (bench/device/run runs these)
    python bench/gpu_train_step.py                                   # every config (> 9 min on an H100)
    python bench/gpu_train_step.py --dry-run                         # CPU, scaled-down, end to end

Random weights throughout, built in memory from the configs in trainer/arch/sdxl-base (the same ones
`flashdmd plan` counts: SDXL base 1.0's UNet, VAE and both full-depth CLIP text encoders; the tokenizer is the
tiny CLIP BPE one, which only changes the token ids). The Pixel-GAN is a SAM ViT-L with random weights (the
trainer needs a checkpoint, so `trainer.discriminator.build_discriminator` is patched for the benchmark only).
Digits captions, random [-1, 1] real images. Each config runs in turn on a fresh teacher. Peaks are
torch.cuda.max_memory_allocated/reserved. A config that fails (out of memory, say) records the error, and
its peak is where it stopped. The JSON is rewritten after every measured step, so a run stopped from outside
still leaves what it measured.

Configs (levers are `memory.*` / `optim.*` values, see trainer/jobspec/):
  s1-baseline    flash TTUR 1, no lever (fp32 AdamW, text encoders on the GPU, ...): ~89 GiB, so an 80 GB
                 card records an OOM here
  s1-<lever>     that lever alone: adamw8bit, text-cache, vae-ckpt, sam-sdpa
  s1-all         presets/sdxl-4step.yaml itself (its levers, its grad_accum 64; see below)
  s2-stage1      stage 2 (joint RL, ratio 5, the untrained LRM reward) with the stage-1 levers only
  s2-all         presets/sdxl-rl-4step.yaml itself
The presets are used as shipped except for what an offline machine cannot have: the teacher (random weights,
SDXL architecture), the data (digits captions, random images), the SAM checkpoint and stage 2's init_from and
reward path (an untrained LRM from the teacher), and RL thresholds that keep every pair so every update runs.
`optim.optimizer: adamw8bit` runs on `--adamw8bit-backend` (default: bitsandbytes where it imports, else
torchao, the one bench/device carries; the plan counts the same state bytes for both on SDXL).

Shortened accumulation (a config whose spec has train.grad_accum A > 2; s1-all's is 64). One optimiser update
over A micro-batches costs A forward/backward passes (about 3 min for 64 on an H100), so the step is run with
2 and with `--accum` (4) micro-batches after a warm-up step, and the peak and time at A are derived from those:
  * Within `Distiller.step` every allocation is one of: fixed for the config (weights, the gradient buffers,
    allocated at the first micro-batch and accumulated in place, the optimiser states, allocated at the first
    update); transient to one micro-batch of one phase (activations, temporaries: freed before the next); or
    kept per micro-batch for the whole step (each micro-batch's real images and text conditioning, moved to
    the GPU up front, and the generator's x and the decoded fakes kept for the fake-score and discriminator
    phases). Only the micro-batch index m = 0 (spectral norm's power iteration) and the last (gradient sync)
    are treated specially, and both occur at every accumulation >= 2.
  * So any moment of the step with A micro-batches has a twin moment with n >= 2 micro-batches holding the
    same fixed and transient bytes and at most A - n fewer kept sets: peak(A) <= peak(n) + (A - n) * kept,
    and peak(A) >= peak(n) + (A - n) * slope, the slope between the two measured accumulations.
    `kept` is computed from the kept tensors' shapes in fp32 (their widest dtype). The JSON reports both
    bounds; `peak_alloc_gib` is the upper one, compared with the plan. Reserved memory is extrapolated the
    same way, as an estimate (fragmentation over 64 micro-batches is not measured).
  * Time is affine in the micro-batch count (one optimiser step per update, one pass per micro-batch), so
    s/update at A = t(n) + (A - n) * (t(n) - t(2)) / (n - 2).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, StepTimes, command_line, format_table, machine_info, write_json
from _gpu_models import arch_folder, build_teacher, random_batches, random_sam_discriminator

GIB = 2.0**30

LEVERS: dict[str, dict[str, Any]] = {
    "adamw8bit": {"optim": {"optimizer": "adamw8bit"}},
    "text-cache": {"memory": {"text_cache": True}},
    "vae-ckpt": {"memory": {"vae_decode_checkpointing": True}},
    "sam-sdpa": {"memory": {"sam_sdpa": True}},
}
PRESETS = {"s1-all": "sdxl-4step.yaml", "s2-all": "sdxl-rl-4step.yaml"}
CONFIGS = ["s1-baseline", *(f"s1-{k}" for k in LEVERS), "s1-all", "s2-stage1", "s2-all"]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_raw(name: str, res: int, batch: int) -> dict[str, Any]:
    """presets/sdxl-4step.yaml (s1-all) or presets/sdxl-rl-4step.yaml (s2-all) with only what an offline
    machine cannot have replaced (the module docstring lists it)."""
    import yaml

    raw = yaml.safe_load((REPO / "presets" / PRESETS[name]).read_text())
    raw["name"] = name
    raw["model"] = {**raw["model"], "teacher": "random:sdxl-architecture", "family": "sdxl", "resolution": res}
    raw["data"] = {"builtin": "digits"}
    disc = {k: v for k, v in raw["distill"]["discriminator"].items() if k != "checkpoint"}
    raw["distill"]["discriminator"] = {**disc, "img_size": 1024 if res >= 1024 else 64}
    raw["train"] = {**raw["train"], "batch_size": batch, "seed": 0}
    if raw.get("kind") == "rl":
        rl = {k: v for k, v in raw["rl"].items() if k not in ("init_from", "reward")}
        raw["rl"] = {**rl, "threshold_min": -1.0, "threshold_max": -1.0, "batch_size": batch}
    return raw


def spec_for(name: str, res: int, batch: int, backend: str, cpu: bool = False) -> Any:
    """The config's spec. `backend`: optim.adamw8bit_backend. cpu (--dry-run): adamw stands in for bitsandbytes,
    whose kernels need CUDA (torchao runs on the CPU)."""
    from trainer.jobspec import parse_spec

    if name in PRESETS:
        raw = preset_raw(name, res, batch)
    else:
        raw = {
            "kind": "rl" if name.startswith("s2") else "distill", "name": name,
            "model": {"teacher": "random:sdxl-architecture", "family": "sdxl", "resolution": res},
            "data": {"builtin": "digits"}, "schedule": {"num_steps": 4},
            "distill": {"mode": "flash", "real_guidance": 8.0,
                        "discriminator": {"backbone": "vit_l", "img_size": 1024 if res >= 1024 else 64}},
            "train": {"batch_size": batch, "mixed_precision": "bf16", "gradient_checkpointing": True, "seed": 0}}
        lever = name.split("-", 1)[1]
        if lever == "stage1":
            for extra in LEVERS.values():
                raw = _merge(raw, extra)
        elif lever in LEVERS:
            raw = _merge(raw, LEVERS[lever])
        if raw["kind"] == "rl":  # the untrained reward's gaps are tiny: keep every pair, so every RL update runs
            raw["rl"] = {"threshold_min": -1.0, "threshold_max": -1.0, "batch_size": batch, "ratio": 5}
    optim = raw.setdefault("optim", {})
    if optim.get("optimizer") == "adamw8bit":
        if cpu and backend == "bitsandbytes":
            optim["optimizer"] = "adamw"
        else:
            optim["adamw8bit_backend"] = backend
    return parse_spec(raw)


def default_backend(cuda: bool) -> str:
    """bitsandbytes where it can run, else torchao where it is installed, else bitsandbytes (which then records
    why it cannot run)."""
    import importlib.util

    if cuda and importlib.util.find_spec("bitsandbytes") is not None:
        return "bitsandbytes"
    return "torchao" if importlib.util.find_spec("torchao") is not None else "bitsandbytes"


def kept_bytes(cfg: Any, teacher: Any) -> int:
    """Upper bound on the bytes one micro-batch keeps for a whole `Distiller.step` (module docstring): its real
    images, its conditioning and the unconditional one (embeddings, pooled, time ids), the generator's x and
    the decoded fake, each counted in fp32."""
    from trainer.toy.prompts import digit_prompt

    b, res = cfg.train.batch_size, teacher.resolution
    cond = teacher.encode([digit_prompt(0)] * b)  # a cached caption when memory.text_cache is on
    cond_elems = sum(t.numel() for t in (cond.embeds, cond.pooled, cond.time_ids) if t is not None)
    latent = 1
    for d in teacher.latent_shape(b):
        latent *= d
    return 4 * (2 * b * 3 * res * res + 2 * cond_elems + latent)


def run_config(name: str, args: argparse.Namespace, device: str, folder: Path, tmp: Path,
               save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Build and measure one config; `save(out)` is called after each measured step with what is known so far."""
    import torch

    from trainer.distill import Distiller
    from trainer.loop import _accelerator
    from trainer.memory import reward_for_training
    from trainer.optim import check_runtime
    from trainer.plan import load_arch, make_plan
    from trainer.textcache import build_text_cache, use_text_cache
    from trainer.toy.prompts import digit_prompt

    cuda = device == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict[str, Any] = {}
    teacher = distiller = trainer = acc = reward = lrm = None
    try:
        cfg = spec_for(name, 64 if args.dry_run else 1024, args.batch, args.adamw8bit_backend, cpu=args.dry_run)
        out["spec"] = {"optimizer": cfg.optim.optimizer, "adamw8bit_backend": cfg.optim.adamw8bit_backend,
                       "grad_accum": cfg.train.grad_accum, "memory": cfg.memory.model_dump(mode="json")}
        plan = make_plan(cfg, gpus=1, gpu_mem_gib=args.gpu_mem_gib, arch=load_arch(str(folder)))
        out.update(plan_alloc_gib=plan.peak_allocated_gib, plan_reserved_gib=plan.reserved_gib,
                   plan_rows={r.component: r.bytes / GIB for r in plan.rows})
        if cuda:  # return the previous config's cached blocks first, or they count in this one's reserved peak
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            out["start_alloc_gib"] = torch.cuda.memory_allocated() / GIB
        check_runtime(cfg)
        built = time.perf_counter()
        teacher = build_teacher(folder, device, tmp)
        acc = _accelerator(cfg)
        torch.manual_seed(cfg.train.seed)
        if cfg.kind == "rl":  # built before the Distiller casts the teacher, as trainer/rl_loop.py does
            from trainer.reward import LatentRewardModel

            lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution)
            reward = reward_for_training(lrm.to(device).requires_grad_(False).eval(), cfg, acc)
        if cfg.memory.text_cache:
            use_text_cache(teacher, build_text_cache(teacher, [digit_prompt(i) for i in range(10)], tmp / name))
        with random_sam_discriminator(args.dry_run):
            distiller = Distiller.for_job(cfg, teacher, acc)
        if cfg.kind == "rl":
            from trainer.rl import JointRL

            trainer = JointRL(distiller, reward, acc, rl=cfg.rl)
        out["build_s"] = time.perf_counter() - built
        if cuda:
            out["after_build_alloc_gib"] = torch.cuda.memory_allocated() / GIB
        save(out)
        batches = random_batches(args.batch, teacher.resolution)
        peaks = {"alloc": 0.0, "reserved": 0.0}

        def measured(fn: Callable[[], Any]) -> tuple[float, float | None, float | None]:
            """(seconds, peak allocated GiB, peak reserved GiB; None on the CPU) of fn(), CUDA-synchronised."""
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            if not cuda:
                return dt, None, None
            a, r = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
            peaks.update(alloc=max(peaks["alloc"], a), reserved=max(peaks["reserved"], r))
            out.update(peak_alloc_measured_gib=peaks["alloc"], peak_reserved_measured_gib=peaks["reserved"])
            return dt, a, r

        accum = cfg.train.grad_accum if cfg.kind == "distill" else 1
        if accum > 2:
            short = sorted({2, min(args.accum, accum)})
            steps = [(2, False)] * args.warmup + [(n, True) for n in short]  # (micro-batches, timed)
            rows = []
            for i, (n, timed) in enumerate(steps):
                dt, a, r = measured(lambda n=n, i=i: distiller.step([next(batches) for _ in range(n)], i))
                if timed:
                    rows.append({"micro_batches": n, "s": dt, "peak_alloc_gib": a, "peak_reserved_gib": r})
                    out["accumulation"] = rows
                else:  # the first update compiles torchao's kernels: seen here, kept out of the timings
                    out.setdefault("warmup_s", []).append(dt)
                save(out)
            out["accumulation_summary"] = extrapolate(rows, accum, kept_bytes(cfg, teacher) / GIB)
        else:
            times = StepTimes(1 if cfg.kind == "distill" else cfg.rl.ratio)

            def one(step: int, timed: bool) -> None:
                if trainer is None:
                    dt = measured(lambda: distiller.step(next(batches), step))[0]
                    turn = step % cfg.distill.ttur == 0
                else:
                    dt = measured(lambda: trainer.step((list(next(batches)["caption"]), lambda: next(batches)), step))[0]
                    turn = step % cfg.rl.ratio == 0  # a cycle: ratio RL updates, the last with a distillation turn
                if timed:
                    times.seconds.append(dt)
                    times.turns.append(turn)
                    out["timing"] = times.summary() if times.cycles() else {"s_per_iter": list(times.seconds)}
                else:
                    out.setdefault("warmup_s", []).append(dt)
                save(out)

            warm = args.warmup if cfg.kind == "distill" else cfg.rl.ratio * min(args.warmup, 1)
            for s in range(warm):
                one(s, False)
            n = args.iters if cfg.kind == "distill" else cfg.rl.ratio * max(1, args.iters // cfg.rl.ratio)
            for s in range(warm, warm + n):
                one(s, True)
    except Exception as err:  # OOM, a missing library, a trainer error: record it and go on
        out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    finally:
        if cuda:
            out["peak_alloc_measured_gib"] = torch.cuda.max_memory_allocated() / GIB if "peak_alloc_measured_gib" \
                not in out else max(out["peak_alloc_measured_gib"], torch.cuda.max_memory_allocated() / GIB)
            out["peak_reserved_measured_gib"] = max(out.get("peak_reserved_measured_gib", 0.0),
                                                    torch.cuda.max_memory_reserved() / GIB)
            ext = out.get("accumulation_summary", {})
            out["peak_alloc_gib"] = ext.get("peak_alloc_upper_gib", out["peak_alloc_measured_gib"])
            out["peak_reserved_gib"] = ext.get("peak_reserved_est_gib", out["peak_reserved_measured_gib"])
            if "plan_alloc_gib" in out and out["peak_alloc_gib"] > 0:
                out["plan_error_alloc"] = out["plan_alloc_gib"] / out["peak_alloc_gib"] - 1
                out["plan_error_reserved"] = out["plan_reserved_gib"] / out["peak_reserved_gib"] - 1
        teacher = distiller = trainer = acc = reward = lrm = None  # noqa: F841 (drop every reference first)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    save(out)
    return out


def extrapolate(rows: list[dict[str, Any]], accum: int, kept_gib: float) -> dict[str, Any]:
    """Peak and time at `accum` micro-batches from the shortened steps (the module docstring's bounds); the
    peaks are None where none was measured (the CPU)."""
    two, last = rows[0], rows[-1]
    n, extra = last["micro_batches"], accum - last["micro_batches"]
    span = max(n - two["micro_batches"], 1)
    out = {"grad_accum": accum, "kept_per_micro_batch_gib": kept_gib, "s_per_micro_batch": (last["s"] - two["s"]) / span}
    out["s_per_gen_update"] = last["s"] + extra * out["s_per_micro_batch"]
    if last["peak_alloc_gib"] is None:
        return out
    slope = {k: (last[k] - two[k]) / span for k in ("peak_alloc_gib", "peak_reserved_gib")}
    return {**out, "measured_slope_alloc_gib": slope["peak_alloc_gib"],
            "peak_alloc_lower_gib": last["peak_alloc_gib"] + extra * max(slope["peak_alloc_gib"], 0.0),
            "peak_alloc_upper_gib": last["peak_alloc_gib"] + extra * kept_gib,
            # An estimate, not a bound: each kept tensor is its own allocator block (12 MiB images at 1024², so
            # little rounding), but fragmentation over 64 micro-batches is not measured here.
            "peak_reserved_est_gib": last["peak_reserved_gib"] + extra * max(kept_gib, slope["peak_reserved_gib"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per config (default 4; dry run 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (stage 2: one RL cycle)")
    ap.add_argument("--accum", type=int, default=4, help="the longer of the two shortened accumulations")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="the card the plan's verdict is for")
    ap.add_argument("--adamw8bit-backend", choices=["bitsandbytes", "torchao"], default=None,
                    help="optim.adamw8bit_backend for the adamw8bit configs (default: see the module docstring)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, scaled-down models; writes only with --out")
    ap.add_argument("--out", default=None, help="default: bench/results/memory_levers_gpu.json (not in --dry-run)")
    args = ap.parse_args()
    import torch

    if args.iters is None:
        args.iters = 1 if args.dry_run else 4
    if args.accum < 3:
        raise SystemExit("--accum: at least 3 (the step is also measured at 2 micro-batches)")
    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(1)  # scaled-down models: one thread avoids OpenMP stalls on a busy small machine
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train_step.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it with --dry-run to check the code path on CPU")
    else:
        device = "cuda"
    args.adamw8bit_backend = args.adamw8bit_backend or default_backend(device == "cuda")
    if args.dry_run and args.adamw8bit_backend == "bitsandbytes":
        print("dry run: adamw stands in for bitsandbytes' adamw8bit (its kernels need CUDA)", flush=True)
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in wanted if c not in CONFIGS]
    if bad or not wanted:
        raise SystemExit(f"--configs: unknown {bad}; choose from {CONFIGS}")
    started = time.perf_counter()
    out = args.out or (None if args.dry_run else str(REPO / "bench" / "results" / "memory_levers_gpu.json"))
    results: dict[str, Any] = {}
    settings = {"dry_run": args.dry_run, "iters": args.iters, "warmup": args.warmup, "accum": args.accum,
                "batch": args.batch, "adamw8bit_backend": args.adamw8bit_backend,
                "arch": "trainer/arch/sdxl-base" + (" (narrowed)" if args.dry_run else "")}

    def save(partial: dict[str, Any] | None = None, name: str | None = None, table: str | None = None) -> None:
        if out:
            if name is not None:
                results[name] = partial
            write_json(out, {"benchmark": "memory_levers_gpu", "command": command_line(), "machine": machine_info(),
                             "settings": settings, "results": results, "table": table,
                             "wall_s": time.perf_counter() - started})

    with tempfile.TemporaryDirectory(prefix="flashdmd-gpu-bench-") as tmp:
        folder = arch_folder(args.dry_run, Path(tmp))
        for name in wanted:
            print(f"[{name}] {'dry run (CPU, scaled down)' if args.dry_run else 'SDXL architecture, 1024²'}",
                  flush=True)
            results[name] = r = run_config(name, args, device, folder, Path(tmp),
                                           lambda partial, name=name: save(partial, name))
            print(f"  {r.get('error') or 'ok'}; peak {r.get('peak_alloc_gib', float('nan')):.1f} GiB "
                  f"(plan {r.get('plan_alloc_gib', float('nan')):.1f})", flush=True)
    table = format_table(["config", "s/G-update", "peak alloc GiB", "plan alloc GiB", "plan err",
                          "peak reserved GiB", "plan reserved GiB", "plan err", "error"],
                         [[name, gen_update_s(r), r.get("peak_alloc_gib"), r.get("plan_alloc_gib"),
                           r.get("plan_error_alloc"), r.get("peak_reserved_gib"), r.get("plan_reserved_gib"),
                           r.get("plan_error_reserved"), r.get("error")] for name, r in results.items()])
    print(table)
    save(table=table)
    if out:
        print(f"wrote {out}")


def gen_update_s(r: dict[str, Any]) -> float | None:
    """Seconds per generator update: at the spec's accumulation (extrapolated) or the median cycle."""
    if "accumulation_summary" in r:
        return r["accumulation_summary"]["s_per_gen_update"]
    return r.get("timing", {}).get("s_per_gen_update_median")


if __name__ == "__main__":
    main()
