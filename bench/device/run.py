"""The GPU check in one call (bench/device/run installs the wheels, then runs this): every GPU benchmark under
its own time cap inside one budget, each result beside `flashdmd plan --trace`, JSON to $OUT, one table.

Steps, in order, each a subprocess killed at its cap (what it wrote by then is kept):
  plans    `flashdmd plan PRESET --gpus 1 --gpu-mem-gib G --trace --json` for presets/sdxl-4step.yaml and
           presets/sdxl-rl-4step.yaml, on the CPU, in the background from the start (the trace needs no GPU);
           where this tree's `plan` has no --trace (or no --json), the plan is recorded without it and marked
  stage1   bench/gpu_train_step.py --configs s1-all: the sdxl-4step preset with its grad_accum 64 from a
           shortened accumulation (that script's docstring argues the bound); peak allocated and reserved,
           seconds per generator update
  stage2   bench/gpu_train_step.py --configs s2-all: the sdxl-rl-4step preset, one warm-up RL cycle and one
           timed cycle (5 RL updates, the last with a distillation turn)
  serve    bench/gpu_serve.py options section, no compile: batch-1 4-step 1024² latency, eager, fused QKV and
           channels-last
--dry-run runs the same steps on the CPU with the narrow models of each benchmark's own --dry-run (and the
tiny presets for the plans): it proves the code and the bundle, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from _common import format_table, machine_info, write_json  # noqa: E402

BUDGET_S = 540.0  # 9 minutes on one H100, the pip install included (bench/device/run passes its start time)
RESERVE_S = 15.0  # the summary, and slack for a killed step to exit
# (step, cap in seconds on a GPU). Sum with the install (~15 s) and the reserve: 520 s, inside the budget.
CAPS = {"stage1": 230.0, "stage2": 170.0, "serve": 90.0}
PLAN_CAP_S = 420.0
PRESETS = {"stage1": "sdxl-4step.yaml", "stage2": "sdxl-rl-4step.yaml"}
DRY_PRESETS = {"stage1": "tiny-sdxl.yaml", "stage2": "tiny-sdxl-rl.yaml"}
PLAN_KEYS = ("planned_peak_gib", "traced_peak_gib", "planned_reserved_gib", "gpu_mem_gib", "fits")


def plan_cmd(preset: str, gpu_mem_gib: float, flags: list[str]) -> list[str]:
    """`flashdmd plan` without the installed entry point (the bundle installs no console scripts): the same
    click command, run by this interpreter."""
    code = "from trainer.plan_cli import plan_command; plan_command(prog_name='flashdmd plan')"
    return [sys.executable, "-c", code, str(REPO / "presets" / preset), "--gpus", "1",
            "--gpu-mem-gib", f"{gpu_mem_gib:g}", *flags]


def start_plan(preset: str, gpu_mem_gib: float, flags: list[str], logs: Path) -> subprocess.Popen[str]:
    """Start one plan in the background. Its output goes to files under `logs`, not pipes: nobody reads a pipe
    until the GPU steps are done, and a full one would stall the trace."""
    env = {**os.environ, "OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": ""}  # the trace is CPU work
    logs.mkdir(parents=True, exist_ok=True)
    stem = logs / f"{Path(preset).stem}{'-'.join(['', *flags])}"
    with open(f"{stem}.out", "w") as stdout, open(f"{stem}.err", "w") as stderr:
        proc = subprocess.Popen(plan_cmd(preset, gpu_mem_gib, flags), cwd=REPO, env=env, text=True,
                                stdout=stdout, stderr=stderr, start_new_session=True)
    proc.output_stem = stem  # type: ignore[attr-defined]
    return proc


def finish_plan(preset: str, gpu_mem_gib: float, proc: subprocess.Popen[str], flags: list[str],
                deadline: float, log: Path, logs: Path) -> dict[str, Any]:
    """The plan's JSON (or text), falling back to fewer flags when this tree's `plan` lacks one."""
    while True:
        _, _, timed_out = wait(proc, deadline)
        stem = proc.output_stem  # type: ignore[attr-defined]
        stdout, stderr = Path(f"{stem}.out").read_text(), Path(f"{stem}.err").read_text()
        append(log, f"plan {preset} {' '.join(flags)} rc={proc.returncode}", stdout + stderr)
        if timed_out:
            return {"preset": preset, "flags": flags, "error": "timed out", "trace": "timed out"}
        missing = "No such option" in stderr
        if missing and "--trace" in flags:
            flags = [f for f in flags if f != "--trace"]
        elif missing and "--json" in flags:
            flags = [f for f in flags if f != "--json"]
        else:
            break
        proc = start_plan(preset, gpu_mem_gib, flags, logs)
    out: dict[str, Any] = {"preset": preset, "flags": flags, "rc": proc.returncode,
                           "trace": "traced" if "--trace" in flags else "unavailable: this tree's plan has no --trace"}
    if "--json" in flags:
        parsed = json_object(stdout)
        if parsed is None:
            out["error"] = f"no JSON object on stdout: {stderr.strip()[-300:]}"
        else:
            out.update(parsed)
            out["missing_keys"] = [k for k in PLAN_KEYS if k not in parsed]
    else:
        out["text"] = stdout
    return out


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object `plan --json` printed: the whole output, else its last line that is one."""
    for candidate in [text, *reversed(text.splitlines())]:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def wait(proc: subprocess.Popen[str], deadline: float) -> tuple[str, str, bool]:
    """Wait until `deadline` (time.monotonic()); past it, kill the process group. (stdout, stderr, timed out)."""
    try:
        stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        return stdout or "", stderr or "", False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return stdout or "", stderr or "", True


def append(log: Path, title: str, text: str) -> None:
    with log.open("a") as f:
        f.write(f"\n===== {title}\n{text}")


def run_step(name: str, cmd: list[str], cap: float, log: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    stdout, _, timed_out = wait(proc, t0 + cap)
    append(log, f"{name}: {' '.join(cmd)}", stdout)
    tail = [line for line in stdout.splitlines() if line.strip()][-3:]
    status = {"rc": proc.returncode, "wall_s": time.monotonic() - t0, "cap_s": cap, "timed_out": timed_out}
    print(f"[{name}] rc={proc.returncode} {status['wall_s']:.0f}/{cap:.0f} s" + (" TIMED OUT" if timed_out else ""),
          *tail[-1:], flush=True)
    return status


def read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# The check's goals (the GPU-check goals of the design): measured peak within 10% of the trace; full-weight stage 1
# at most 72 GiB allocated and 76 reserved; stage 2 at most 74 traced; batch-1 serving at most 0.25 s on an H100.
GOALS = {("stage1", "alloc"): "<= 72, within 10% of trace", ("stage1", "reserved"): "<= 76",
         ("stage2", "alloc"): "trace <= 74, within 10% of trace", "serve": "<= 0.25 (H100), 0.22 (H200)"}


def _vs(measured: Any, reference: Any) -> float | None:
    ok = isinstance(measured, (int, float)) and isinstance(reference, (int, float)) and reference
    return measured / reference - 1 if ok else None


def summary_rows(stage: dict[str, dict[str, Any]], plans: dict[str, dict[str, Any]],
                 serve: dict[str, Any]) -> list[list[Any]]:
    """One row per measure: measured, the in-process plan, `plan --json`'s plan and trace, measured vs trace."""
    rows = []
    for step, config in (("stage1", "s1-all"), ("stage2", "s2-all")):
        r = stage.get(step, {}).get("results", {}).get(config, {})
        p = plans.get(step, {})
        acc = r.get("accumulation_summary", {})
        gen = acc.get("s_per_gen_update", r.get("timing", {}).get("s_per_gen_update_median"))
        label = f"{step} {PRESETS[step]}" + (f" (grad_accum {acc['grad_accum']}: bound)" if acc else "")
        traced = p.get("traced_peak_gib")
        rows.append([f"{label} peak allocated GiB", r.get("peak_alloc_gib"), r.get("plan_alloc_gib"),
                     p.get("planned_peak_gib"), traced, _vs(r.get("peak_alloc_gib"), traced),
                     GOALS.get((step, "alloc")), r.get("error")])
        rows.append([f"{label} peak reserved GiB", r.get("peak_reserved_gib"), r.get("plan_reserved_gib"),
                     p.get("planned_reserved_gib"), None, None, GOALS.get((step, "reserved")), None])
        rows.append([f"{label} s per generator update", gen, None, None, None, None, None, None])
    best = min((o["batch1_s"] for o in serve.get("results", {}).get("options", [])), default=None)
    rows.append(["serve batch-1 4-step 1024² s (best, no compile)", best, None, None, None, None, GOALS["serve"],
                 None])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, narrow models: the code and the bundle")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: $OUT, else bench/results/device (a temporary folder with --dry-run)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="the card the plans' verdicts are for")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    args = ap.parse_args()
    t0 = float(os.environ.get("FLASHDMD_DEVICE_T0", time.time()))
    deadline = time.monotonic() + args.budget_s - (time.time() - t0)
    default = Path(tempfile.mkdtemp(prefix="flashdmd-device-dry-")) if args.dry_run else REPO / "bench" / "results" / "device"
    out = args.out or Path(os.environ.get("OUT") or default)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text(f"bench/device/run.py {' '.join(sys.argv[1:])}\n")
    dry = ["--dry-run"] if args.dry_run else []
    presets = DRY_PRESETS if args.dry_run else PRESETS
    flags = ["--trace", "--json"]
    logs = Path(tempfile.mkdtemp(prefix="flashdmd-plan-"))
    plan_procs = {step: start_plan(p, args.gpu_mem_gib, flags, logs) for step, p in presets.items()}
    train = [sys.executable, str(REPO / "bench" / "gpu_train_step.py"), *dry, "--gpu-mem-gib",
             f"{args.gpu_mem_gib:g}", "--adamw8bit-backend", "torchao"]
    cmds = {
        "stage1": [*train, "--configs", "s1-all", "--warmup", "0" if args.dry_run else "1", "--accum",
                   "3" if args.dry_run else "4", "--out", str(out / "stage1.json")],
        "stage2": [*train, "--configs", "s2-all", "--warmup", "0" if args.dry_run else "1", "--iters", "5",
                   "--out", str(out / "stage2.json")],
        "serve": [sys.executable, str(REPO / "bench" / "gpu_serve.py"), *dry, "--sections", "options",
                  "--no-compile", "--configs", "+channels-last" if args.dry_run else "eager,+fused QKV,+channels-last",
                  "--rounds", "1" if args.dry_run else "5", "--out", str(out / "serve.json")],
    }
    status: dict[str, Any] = {}
    for name, cmd in cmds.items():
        left = deadline - time.monotonic() - RESERVE_S
        if left < 10:
            status[name] = {"skipped": "out of budget"}
            print(f"[{name}] skipped: out of budget", flush=True)
            continue
        # A dry run on a busy CPU is slow and proves no timing: it runs uncapped but for the whole budget.
        status[name] = run_step(name, cmd, left if args.dry_run else min(CAPS[name], left), log)
    plan_deadline = (time.monotonic() + PLAN_CAP_S) if args.dry_run else max(deadline - RESERVE_S / 2,
                                                                              time.monotonic() + 1)
    plans = {}
    for step, proc in plan_procs.items():
        plans[step] = finish_plan(presets[step], args.gpu_mem_gib, proc, flags, plan_deadline, log, logs)
        write_json(out / f"plan-{step}.json", plans[step])
    stage = {step: read(out / f"{step}.json") for step in ("stage1", "stage2")}
    serve = read(out / "serve.json")
    rows = summary_rows(stage, plans, serve)
    table = format_table(["measure", "measured", "plan (in-process)", "plan --json", "trace --json",
                          "measured/trace - 1", "goal", "error"], rows)
    trace_note = "; ".join(f"{s}: {p.get('trace')}" for s, p in plans.items())
    write_json(out / "device.json", {
        "dry_run": args.dry_run, "machine": machine_info(), "budget_s": args.budget_s, "caps_s": CAPS,
        "wall_s": time.time() - t0, "steps": status, "plans": plans, "table": table, "trace": trace_note,
        "rows": [dict(zip(["measure", "measured", "plan_in_process", "plan_json", "trace_json", "vs_trace", "goal",
                           "error"], r, strict=True)) for r in rows]})
    print(table)
    print(f"trace: {trace_note}")
    print(f"wall {time.time() - t0:.0f} s of {args.budget_s:.0f}; JSON in {out}")
    failed = [n for n, s in status.items() if s.get("rc") not in (0, None) or s.get("timed_out") or "skipped" in s]
    failed += [f"{step}: {c}: {r['error']}" for step, d in stage.items() for c, r in d.get("results", {}).items()
               if "error" in r]
    if failed:
        print(f"failed: {failed}")
    sys.exit(1 if failed and args.dry_run else 0)


if __name__ == "__main__":
    main()
