"""CPU benchmark: seconds per generator update and peak memory, flash (TTUR 1, 2) vs dmd2 (TTUR 5).

    /work/venv/bin/python bench/train_step.py --models tiny,small --iters 30 --batch 2

Two random-weight SDXL-format teachers: `tiny` (the `tiny:sdxl` pipeline, 32 px / 16x16 latents) and `small`
(the tiny pipeline with its UNet swapped for an SDXL-shaped one: block_out_channels (64, 128, 256), 2 layers
per block, SDXL's down/up block pattern, text_time embedding; 64 px / 32x32 latents). Every config uses the
digits builtin data, mixed_precision "no" and, for flash, the tiny SAM Pixel-GAN (as presets/tiny-sdxl.yaml).

Timing (one process): per model, the three Distillers are built once on one shared teacher and warmed up;
then `iters / 10` rounds each run 10 iterations (whole generator cycles for TTUR 1, 2 and 5) of every
config, interleaved cycle by cycle (each config's cycles spread evenly over the round), so that load from
other processes hits all configs alike. Each iteration is timed on its own (data loading outside the clock).
  s/gen update (mean)   = total time / generator updates (the issue's definition)
  s/gen update (median) = median time of one generator cycle (TTUR consecutive iterations); robust to
                          noisy neighbours, and what the headline ratio uses.
Memory: a fresh subprocess per (model, config) loads the teacher and data, resets the kernel's peak-RSS
counter (/proc/self/clear_refs = 5), builds the Distiller and runs TTUR + 1 iterations (the second generator
turn runs with every optimiser state allocated). The figure is VmHWM (peak resident set, /proc/self/status)
minus VmRSS after loading teacher and data: the Distiller's weight copies, optimiser states and step working
set on top of the frozen teacher. (ru_maxrss would not do: it keeps the parent's peak across fork + exec.)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    BASELINE,
    CONFIGS,
    REPO,
    StepTimes,
    add_ratios,
    command_line,
    config_name,
    format_table,
    instrument_phases,
    machine_info,
    make_spec,
    phase_summary,
    run_iterations,
    spec_summary,
    write_json,
)

BLOCK = 10  # iterations per timed block: a multiple of every TTUR in CONFIGS
TINY_DISC: dict[str, Any] = {"backbone": "tiny", "head_channels": 32}  # as presets/tiny-sdxl.yaml
# The `small` teacher's UNet: SDXL's block pattern at a CPU-friendly width (heads of 32 channels).
SMALL_UNET: dict[str, Any] = dict(
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),  # diffusers' name; these are SDXL-style head counts (SDXL: 5, 10, 20)
    norm_num_groups=32,
    use_linear_projection=True,
)
_COPY_FROM_TINY = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                   "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def build_small_teacher(out: Path) -> Path:
    """The tiny SDXL pipeline (text encoders, tokenizer, VAE, scheduler) with a bigger SDXL-shaped UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from trainer.tiny import build_tiny_pipeline

    build_tiny_pipeline("sdxl", out, seed=0)
    tiny_cfg = json.loads((out / "unet" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(**{k: tiny_cfg[k] for k in _COPY_FROM_TINY}, **SMALL_UNET)
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def teacher_dir(model: str, tmp: Path) -> str:
    if model == "tiny":
        from trainer.tiny import tiny_pipeline_dir

        return str(tiny_pipeline_dir("sdxl"))
    if model == "small":
        return str(build_small_teacher(tmp / "small-sdxl"))
    raise SystemExit(f"unknown model {model!r}: expected tiny or small")


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM in KiB from /proc/self/status (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def probe_memory(arg: str) -> None:
    """Subprocess body (--probe): peak RSS of one Distiller over the teacher + data, printed as JSON."""
    import torch

    from trainer.data import build_dataset, infinite_batches
    from trainer.distill import Distiller
    from trainer.loop import _accelerator
    from trainer.models import load_teacher

    p = json.loads(arg)
    torch.set_num_threads(p["threads"])
    rss0 = _proc_status()["VmRSS"]
    cfg = make_spec(p["teacher"], p["mode"], p["ttur"], p["batch"], discriminator=TINY_DISC)
    acc = _accelerator(cfg)
    torch.manual_seed(0)
    teacher = load_teacher(cfg.model, acc.device, cfg.schedule.shift)
    batches = infinite_batches(build_dataset(cfg.data, teacher.resolution), cfg.train.batch_size, 0)
    next(batches)
    gc.collect()
    rss1 = _proc_status()["VmRSS"]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    distiller = Distiller.for_job(cfg, teacher, acc)
    run_iterations(distiller, batches, 0, cfg.distill.ttur + 1, None)  # two generator turns: Adam states exist
    st = _proc_status()
    print("PROBE " + json.dumps({
        "teacher_and_data_rss_mib": (rss1 - rss0) / 1024, "peak_rss_delta_mib": (st["VmHWM"] - rss1) / 1024,
        "rss_after_mib": (st["VmRSS"] - rss1) / 1024, "hwm_reset": reset}), flush=True)


def run_probe(teacher: str, mode: str, ttur: int, batch: int, threads: int) -> dict[str, Any]:
    arg = json.dumps({"teacher": teacher, "mode": mode, "ttur": ttur, "batch": batch, "threads": threads})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", arg], cwd=REPO,
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory probe {mode}/{ttur} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROBE "):])


def digits_study_cfgs() -> dict[str, Any]:
    """The digits study's own specs (bench/quality_vs_cost.py: the demo's recipe per row), as DistillJobs."""
    from quality_vs_cost import run_spec

    from trainer.jobspec import parse_spec

    names = {"flash-ttur1": "flash-ttur1-k4-noema", "flash-ttur1-ema0.98": "flash-ttur1-k4", BASELINE: "dmd2-k4"}
    return {key: parse_spec(run_spec(row, 1.0, 0)[0]) for key, row in names.items()}


def time_model(teacher_ref: str, batch: int, iters: int, cfgs: dict[str, Any] | None = None,
               equal_updates: bool = False) -> dict[str, dict[str, Any]]:
    """Interleaved timing of every config on one shared teacher (see the module docstring); `cfgs` replaces the
    CONFIGS specs (they must share teacher, data and mixed precision)."""
    import torch

    from trainer.data import build_dataset, infinite_batches
    from trainer.distill import Distiller
    from trainer.loop import _accelerator
    from trainer.models import load_teacher

    if cfgs is None:
        cfgs = {config_name(m, t): make_spec(teacher_ref, m, t, batch, discriminator=TINY_DISC) for m, t in CONFIGS}
    first = next(iter(cfgs.values()))
    acc = _accelerator(first)  # every cfg has mixed_precision "no": one accelerator serves all
    teacher = load_teacher(first.model, acc.device, first.schedule.shift)
    ds = build_dataset(first.data, teacher.resolution)
    state: dict[str, dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(cfg.train.seed)
        t0 = time.perf_counter()
        distiller = Distiller.for_job(cfg, teacher, acc)
        build_s = time.perf_counter() - t0
        phases = instrument_phases(distiller)
        batches = infinite_batches(ds, batch, cfg.train.seed)
        ttur = cfg.distill.ttur
        warmup = ttur * math.ceil(2 / ttur)  # whole cycles, at least two iterations
        t0 = time.perf_counter()
        step = run_iterations(distiller, batches, 0, warmup, None)
        phases.clear()  # count the timed iterations only
        state[name] = dict(cfg=cfg, distiller=distiller, batches=batches, step=step, times=StepTimes(ttur),
                           phases=phases, build_s=build_s, warmup_iters=warmup, warmup_s=time.perf_counter() - t0)
    # One round = BLOCK iterations of every config, run cycle by cycle with each config's cycles spread
    # evenly over the round, so a change in outside load hits all configs alike.
    names = list(state)
    # Equal updates: every config makes the same generator updates per round (BLOCK // the largest TTUR), so a
    # dmd2 update (TTUR iterations) and a flash update are timed side by side in equal numbers.
    max_ttur = max(state[n]["times"].ttur for n in names)
    per_round = {n: (BLOCK // max_ttur if equal_updates else BLOCK // state[n]["times"].ttur) for n in names}
    order = sorted(((i + 0.5) / k, n) for n, k in per_round.items() for i in range(k))
    for r in range(math.ceil(iters / BLOCK)):
        for _, name in order:
            s = state[name]
            s["step"] = run_iterations(s["distiller"], s["batches"], s["step"], s["times"].ttur, s["times"])
        print(f"  round {r + 1}: " + ", ".join(
            f"{n} {sum(state[n]['times'].seconds[-BLOCK:]):.2f}s" for n in names), flush=True)
    out = {name: {"spec": spec_summary(s["cfg"]), "build_s": s["build_s"], "warmup_iters": s["warmup_iters"],
                  "warmup_s": s["warmup_s"], "timing": s["times"].summary(),
                  "phase_s_per_gen_update": phase_summary(s["phases"], s["times"]),
                  "iteration_s": [round(x, 5) for x in s["times"].seconds],
                  "round_iterations": per_round[name] * s["times"].ttur} for name, s in state.items()}
    state.clear()
    gc.collect()
    return out


def model_info(teacher_ref: str) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher_ref, subfolder="unet")
    c = unet.config
    return {"unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "down_block_types": list(c.down_block_types), "latent_size": c.sample_size,
            "transformer_layers_per_block": c.transformer_layers_per_block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    ap.add_argument("--iters", type=int, default=30, help=f"timed iterations per config (rounded up to {BLOCK}s)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared small machine)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess probes")
    ap.add_argument("--digits-study", action="store_true",
                    help="time bench/quality_vs_cost.py's own specs on the digits teacher instead (batch 16, no "
                    "memory probes): the clean per-update cost its wall-time axis is checked against")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe_memory(args.probe)
        return
    import torch

    torch.set_num_threads(args.threads)
    # --digits-study times the study's own specs on the shipped digits teacher instead of the --models teachers.
    models = ["digits"] if args.digits_study else [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    if args.digits_study:
        cfgs = digits_study_cfgs()
        first = next(iter(cfgs.values()))
        print(f"[digits] timing {', '.join(cfgs)} (batch {first.train.batch_size})", flush=True)
        res = time_model(first.model.teacher, first.train.batch_size, args.iters, cfgs, equal_updates=True)
        add_ratios(res)
        results["digits"] = {"teacher": "toy:digits", "configs": res}
    else:
        with tempfile.TemporaryDirectory(prefix="flashdmd-bench-") as tmp:
            for model in models:
                ref = teacher_dir(model, Path(tmp))
                print(f"[{model}] timing {', '.join(config_name(m, t) for m, t in CONFIGS)} (batch {args.batch})",
                      flush=True)
                res = time_model(ref, args.batch, args.iters)
                if not args.no_memory:
                    for mode, ttur in CONFIGS:
                        res[config_name(mode, ttur)]["memory"] = run_probe(ref, mode, ttur, args.batch, args.threads)
                add_ratios(res)
                results[model] = {"teacher": model_info(ref), "configs": res}
    rows = []
    for model, mres in results.items():
        for name, r in mres["configs"].items():
            t, ratio = r["timing"], r.get("ratio_vs_dmd2", {})
            rows.append([model, name, t["s_per_iter_median"], t["s_per_gen_update_median"],
                         t["s_per_gen_update_mean"], ratio.get("per_gen_update_median"),
                         ratio.get("per_gen_update_mean"), r.get("memory", {}).get("peak_rss_delta_mib"),
                         t["skipped_updates"]])
    table = format_table(["model", "config", "s/iter (med)", "s/G-update (med)", "s/G-update (mean)",
                          "vs dmd2 (med)", "vs dmd2 (mean)", "peak RSS Δ MiB", "skipped"], rows)
    print(table)
    payload = {
        "benchmark": "train_step", "command": command_line(), "machine": machine_info(),
        "settings": {"models": models, "iters": math.ceil(args.iters / BLOCK) * BLOCK, "block": BLOCK,
                     "batch": 16 if args.digits_study else args.batch, "threads": args.threads, "data": "digits (builtin)",
                     "memory_method": "subprocess per config: /proc/self/status VmHWM - VmRSS after teacher+data "
                                      "(peak reset via /proc/self/clear_refs)"},
        "results": results, "table": table, "wall_s": time.perf_counter() - started,
    }
    print(f"wrote {write_json(args.out, payload)} in {payload['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
