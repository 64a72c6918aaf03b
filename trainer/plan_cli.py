"""`flashdmd plan SPEC [--gpus N] [--gpu-mem-gib G] [--set k=v] [--trace] [--json] [--gpu-type T]
[--price-per-gpu-hour P]`: the per-GPU memory budget of a spec, optionally checked by a trace of the real
iteration on fake tensors (trainer/trace.py), and the cost quote of its max_steps (trainer/plan_cost.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from trainer.jobspec import JobSpec, SpecError, load_spec

EXIT_BAD_INPUT = 2
TRACED_MICRO_BATCHES = 2  # longer accumulation: 2 traced, the rest's kept tensors added (see trace_result)


def plan_text(cfg: JobSpec, gpus: int | None = None, gpu_mem_gib: float = 80.0) -> str:
    """The plan table of a validated spec (also printed by `flashdmd train --dry-run`)."""
    from trainer.plan import format_plan, make_plan

    return format_plan(make_plan(cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib))


def run_trace(spec_path: Path, gpus: int | None, overrides: tuple[str, ...], micro: int | None) -> dict[str, Any]:
    """`python -m trainer.trace` in its own process (it creates a process group); its JSON line."""
    cmd = [sys.executable, "-m", "trainer.trace", str(spec_path)]
    cmd += ["--gpus", str(gpus)] if gpus else []
    cmd += ["--micro-batches", str(micro)] if micro else []
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if out.returncode != 0:
        raise click.ClickException(f"the trace failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trace_result(plan: Any, traced: dict[str, Any], accum: int) -> dict[str, Any]:
    """The traced peak for the spec's accumulation. With A > 2 micro-batches, 2 are traced: a further
    micro-batch adds only its kept tensors (its inputs, latents, fakes: the plan's "kept" row / A), because
    each phase's gradients reach full size at the first micro-batch and its graph is freed before the next."""
    from trainer.plan import GIB

    peak = float(traced["peak_bytes"])
    notes = list(traced["notes"])
    n = int(traced["micro_batches"])
    if accum > n:
        kept = plan.figures().get("kept across micro-batches", 0.0) / accum
        peak += (accum - n) * kept
        notes.append(f"train.grad_accum {accum}: {n} micro-batches traced, + {accum - n} x {kept / 2**20:.1f} MiB "
                     "kept per further micro-batch (the plan's per-micro-batch kept tensors)")
    return {"traced_peak_gib": peak / GIB, "traced_by_category_gib": {k: v / GIB for k, v in
                                                                      traced["by_category"].items()},
            "traced_peak_phase": traced["peak_phase"], "traced_phase_peaks_gib":
                {k: v / GIB for k, v in traced["phase_peaks"].items()},
            "trace_notes": notes, "trace_seconds": traced["seconds"], "trace_rss_mib": traced["rss_mib"]}


@click.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", type=click.IntRange(1, 1024), default=None,
              help="GPUs to plan for (default: the spec's train.num_processes)")
@click.option("--gpu-mem-gib", type=click.FloatRange(1, 4096), default=80.0, show_default=True,
              help="memory of one GPU")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field")
@click.option("--trace", "do_trace", is_flag=True, help="also trace one real iteration on fake tensors")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--gpu-type", default="h200", show_default=True, help="GPU type of the cost quote (h200, h100, a100)")
@click.option("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the cost")
def plan_command(spec: Path, gpus: int | None, gpu_mem_gib: float, overrides: tuple[str, ...], do_trace: bool,
                 as_json: bool, gpu_type: str, price_per_gpu_hour: float | None) -> None:
    """Print the per-GPU memory budget of SPEC by component, counted on the meta device (no weights loaded),
    and the expected wall time, GPU-hours and cost of its max_steps.

    Exit code 0 when it fits, 1 when it does not, 2 for a bad spec. With --trace, "fits" is decided from the
    traced peak with the measured allocator ratio.
    """
    from trainer.errors import InputError

    try:
        cfg = load_spec(spec, list(overrides))
        from trainer.plan import CUDA_CONTEXT_GIB, RESERVED_RATIO, format_plan, make_plan
        from trainer.plan_cost import quote

        plan = make_plan(cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib)
        cost = quote(cfg, plan.gpus, gpu_type, price_per_gpu_hour)
    except (SpecError, InputError) as err:
        click.echo(f"error: {spec}:\n{err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    out: dict[str, Any] = {"planned_peak_gib": plan.peak_allocated_gib, "planned_reserved_gib": plan.reserved_gib,
                           "planned_peak_phase": plan.peak_phase, "gpu_mem_gib": gpu_mem_gib, "gpus": plan.gpus,
                           "reserved_ratio": RESERVED_RATIO, "fits": plan.fits, "cost": cost.as_dict()}
    if do_trace:
        accum = cfg.train.grad_accum
        micro = min(accum, TRACED_MICRO_BATCHES)
        out.update(trace_result(plan, run_trace(spec, plan.gpus, overrides, micro), accum))
        out["traced_reserved_gib"] = out["traced_peak_gib"] * RESERVED_RATIO
        out["plan_vs_trace"] = out["planned_peak_gib"] / out["traced_peak_gib"] - 1
        out["fits"] = out["traced_reserved_gib"] + CUDA_CONTEXT_GIB <= gpu_mem_gib
    if as_json:
        click.echo(json.dumps(out, indent=None))
    else:
        click.echo(format_plan(plan))
        if do_trace:
            click.echo(format_trace(out))
        click.echo(cost.text())
    sys.exit(0 if out["fits"] else 1)


def format_trace(out: dict[str, Any]) -> str:
    lines = ["", "## Trace of one iteration (fake tensors, trainer/trace.py)", "",
             "| category at the traced peak | GiB |", "|---|---:|"]
    for k, v in out["traced_by_category_gib"].items():
        if k != "Total" and v:
            lines.append(f"| {k} | {v:.2f} |")
    lines += ["", f"- traced peak: **{out['traced_peak_gib']:.1f} GiB** in the {out['traced_peak_phase']} "
              f"(plan {out['planned_peak_gib']:.1f} GiB, {out['plan_vs_trace']:+.1%}); reserved "
              f"{out['traced_reserved_gib']:.1f} GiB; verdict from the trace: "
              f"{'FITS' if out['fits'] else 'DOES NOT FIT'}"]
    lines += [f"- {n}" for n in out["trace_notes"]]
    return "\n".join(lines)
