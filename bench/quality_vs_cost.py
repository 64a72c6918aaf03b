"""Quality vs training cost on the digits teacher: Flash-DMD (TTUR 1, TTUR 2) vs dmd2 mode, K = 4 and K = 2.

The paper's headline claim (Tables 1 and 6, Fig. 5-6) at small scale. Every run uses the same teacher
(the shipped digits teacher), seed, batch and optimiser settings (`flashjob.demo.DEMO_SPEC`); runs differ only
in what the row names: the mode (flash: Pixel-GAN + EMA injection, hinge; dmd2: latent-head GAN, softplus, no
EMA), the TTUR, K, and lambda_ema (the EMA ablation). Each run is a real `python -m trainer` subprocess; every
checkpoint is then scored with the digits evaluator on the same labels and per-image seeds:
digits-FD vs real digits, vs the teacher's 50-step CFG samples, prompt accuracy and intra-class diversity.

Cost axes: cumulative generator updates, and cumulative training wall time (the sum of the trainer's own
`time/step_s`, so checkpointing and scoring are excluded). "Compute to reach dmd2's best FD" is read off the
wall-time axis: the first checkpoint of a Flash-DMD run whose FD vs real is at or below the best FD any dmd2
checkpoint reached (same K), as a percentage of the wall time dmd2 spent to reach its best, and of dmd2's whole run.

    python bench/quality_vs_cost.py                       # the committed run (about 1 h on one CPU core)
    python bench/quality_vs_cost.py --scale 0.1 --per-class 10 --runs flash-ttur1-k4   # a smoke run

Writes bench/results/quality_vs_cost.{json,png,md}. Runs are kept under --work (default runs/bench-quality);
a finished run is not trained again (delete its folder to redo it). Only each run's last checkpoint is kept
after scoring (--keep-checkpoints keeps all); bench/rl_ablation.py starts from flash-ttur1-k4's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, machine_info, write_json

from flashjob.demo import DEMO_SPEC

RESULTS = REPO / "bench" / "results"

# name -> (spec overrides, generator updates). dmd2 gets more generator updates and ~2x flash's wall time, so its
# best FD is not cut short by a smaller budget.
RUNS: dict[str, tuple[dict[str, Any], int]] = {
    "flash-ttur1-k4": ({"distill": {"mode": "flash", "ttur": 1}}, 600),
    "flash-ttur2-k4": ({"distill": {"mode": "flash", "ttur": 2}}, 500),
    "flash-ttur1-k4-noema": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0}}, 600),
    "dmd2-k4": ({"distill": {"mode": "dmd2"}}, 400),
    "flash-ttur1-k2": ({"distill": {"mode": "flash", "ttur": 1}, "schedule": {"num_steps": 2, "dm_steps": None}}, 500),
    "dmd2-k2": ({"distill": {"mode": "dmd2"}, "schedule": {"num_steps": 2, "dm_steps": None}}, 300),
}
EVAL_POINTS = 8  # checkpoints scored per run (plus generator update 0: the teacher as a K-step sampler)


def _merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def run_spec(name: str, scale: float, seed: int) -> tuple[dict[str, Any], int, int]:
    """(spec, ttur, generator updates) of one run."""
    over, gen_updates = RUNS[name]
    spec = _merge(DEMO_SPEC, over)
    spec["name"] = f"bench-{name}"
    if spec["schedule"].get("num_steps") == 2:
        spec["schedule"].pop("dm_steps", None)  # K = 2: the default, DM on 999 (the only non-final step)
    ttur = spec["distill"].get("ttur") or (1 if spec["distill"]["mode"] == "flash" else 5)
    gen_updates = max(int(round(gen_updates * scale)), EVAL_POINTS)
    every = max(gen_updates // EVAL_POINTS, 1) * ttur
    spec["train"].update(max_steps=every * EVAL_POINTS, checkpoint_every=every, sample_every=every * EVAL_POINTS,
                         keep_last=1000, seed=seed, log_every=1)
    return spec, ttur, every * EVAL_POINTS // ttur


def train_run(name: str, spec: dict, work: Path, threads: int) -> Path:
    run_dir = work / name
    final = run_dir / "checkpoints" / f"step-{spec['train']['max_steps']:08d}" / "meta.json"
    if final.is_file():
        print(f"[{name}] already trained: {run_dir}", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
    print(f"[{name}] training {spec['train']['max_steps']} steps -> {run_dir}", flush=True)
    with open(run_dir / "trainer.log", "ab") as log:
        proc = subprocess.run([sys.executable, "-m", "trainer", str(spec_path), "--run-dir", str(run_dir), *resume],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] the trainer exited {proc.returncode}; see {run_dir / 'trainer.log'}")
    return run_dir


def cumulative_seconds(run_dir: Path) -> dict[int, float]:
    """step -> training seconds up to and including it (the trainer's own time/step_s; resumes overwrite)."""
    per_step: dict[int, float] = {}
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            if "time/step_s" in row["metrics"]:
                per_step[row["step"]] = row["metrics"]["time/step_s"]
    out, total = {}, 0.0
    for step in sorted(per_step):
        total += per_step[step]
        out[step] = total
    return out


def score_run(name: str, run_dir: Path, spec: dict, ttur: int, ctx: dict, keep: bool) -> list[dict[str, Any]]:
    from flashjob.digits_scoring import student_samples

    ev, labels, reference = ctx["evaluator"], ctx["labels"], ctx["reference"]
    seconds = cumulative_seconds(run_dir)
    k = spec["schedule"]["num_steps"]
    points = [{"step": 0, "gen_updates": 0, "wall_s": 0.0, **ctx["init"][k]}]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    for ck in ckpts:
        step = int(ck.name.split("-")[1])
        rep = ev.report(student_samples(ck, labels), labels, reference)
        points.append({"step": step, "gen_updates": math.ceil(step / ttur), "wall_s": round(seconds[step], 2), **rep})
        print(f"[{name}] step {step}: FD real {rep['fd_real']:.2f}, FD teacher {rep['fd_teacher']:.2f}, "
              f"acc {rep['accuracy']:.3f}", flush=True)
    if not keep:
        for ck in ckpts[:-1]:
            shutil.rmtree(ck, ignore_errors=True)
    return points


def reach(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["fd_real"] <= target), None)


def compare(results: dict[str, dict]) -> list[dict[str, Any]]:
    """Per K: each flash run's cost to first reach the best FD of dmd2 mode, against dmd2's cost."""
    rows = []
    for name, r in results.items():
        if not name.startswith("flash"):
            continue
        base = results.get(f"dmd2-k{r['K']}")
        if base is None:
            continue
        best = min(base["points"][1:], key=lambda p: p["fd_real"])
        hit = reach(r["points"][1:], best["fd_real"])
        row = {"run": name, "K": r["K"], "dmd2_best_fd": best["fd_real"], "dmd2_best_at_gen_updates": best["gen_updates"],
               "dmd2_best_at_wall_s": best["wall_s"], "dmd2_total_wall_s": base["points"][-1]["wall_s"],
               "flash_best_fd": min(p["fd_real"] for p in r["points"][1:]), "reached": hit is not None}
        if hit is not None:
            # Reached at the first scored checkpoint: the true crossing may be earlier, so the % is an upper bound.
            row.update(flash_gen_updates=hit["gen_updates"], flash_wall_s=hit["wall_s"],
                       upper_bound=hit is r["points"][1],
                       pct_of_dmd2_to_best=100 * hit["wall_s"] / best["wall_s"],
                       pct_of_dmd2_total=100 * hit["wall_s"] / row["dmd2_total_wall_s"],
                       pct_gen_updates_to_best=100 * hit["gen_updates"] / best["gen_updates"])
        rows.append(row)
    return rows


FD_THRESHOLDS = (12.0, 10.0, 8.0)


def time_to_reach(results: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per run and FD threshold: the first checkpoint at or below it (wall s, generator updates), or None."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        out[name] = {}
        for th in FD_THRESHOLDS:
            hit = reach(r["points"][1:], th)
            out[name][f"{th:g}"] = None if hit is None else {"wall_s": hit["wall_s"], "gen_updates": hit["gen_updates"]}
    return out


def seed_noise(results: dict[str, dict], work: Path, per_class: int, reps: int = 3) -> dict[str, dict[str, float]]:
    """FD vs real of each run's last checkpoint over `reps` disjoint seed sets: how much of a gap is sampling noise."""
    import numpy as np

    from inference.pipeline import load_pipeline
    from trainer.data import digit_prompt
    from trainer.toy.evaluate import default_evaluator, eval_labels

    ev, labels = default_evaluator(), eval_labels(per_class)
    prompts = [digit_prompt(int(c)) for c in labels]
    out = {}
    for name, r in results.items():
        ck = work / name / "checkpoints" / f"step-{r['spec']['train']['max_steps']:08d}"
        if not (ck / "meta.json").is_file():
            continue
        pipe = load_pipeline(ck)
        fds = []
        for rep in range(reps):
            seeds = [(rep + 1) * 7_000_003 + j for j in range(len(prompts))]
            fds.append(ev.fd_real(pipe.decode(pipe.latents(prompts, seeds)).clamp(-1, 1)))
        out[name] = {"fd_real": [round(f, 3) for f in fds], "mean": float(np.mean(fds)), "std": float(np.std(fds))}
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, r in results.items():
        pts = r["points"]
        style = "-" if name.startswith("flash") else "--"
        for col, x in enumerate(("gen_updates", "wall_s")):
            axes[0][col].plot([p[x] for p in pts], [p["fd_real"] for p in pts], style, marker="o", ms=3, label=name)
            axes[1][col].plot([p[x] for p in pts], [p["fd_teacher"] for p in pts], style, marker="o", ms=3, label=name)
    for row, what in enumerate(("digits-FD vs real", "digits-FD vs teacher 50-step")):
        for col, x in enumerate(("generator updates", "training wall time (s)")):
            ax = axes[row][col]
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Flash-DMD vs dmd2 mode on the digits teacher (same seed, batch, teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, dict], cmp: list[dict], command: str, reach_at: dict | None = None,
          noise: dict | None = None) -> str:
    rows = []
    for name, r in results.items():
        best = min(r["points"][1:], key=lambda p: p["fd_real"])
        last = r["points"][-1]
        rows.append([name, r["K"], r["ttur"], r["ema"], last["gen_updates"], f"{last['wall_s']:.0f}",
                     f"{best['fd_real']:.2f} @ {best['gen_updates']}", f"{last['fd_real']:.2f}",
                     f"{last['fd_teacher']:.2f}", f"{last['accuracy']:.3f}", f"{last['diversity']:.3f}"])
    out = ["# Quality vs cost on the digits teacher", "", f"Command: `{command}`", "",
           format_table(["run", "K", "TTUR", "ema", "gen updates", "train s", "best FD real @ upd", "final FD real",
                         "final FD teacher", "accuracy", "diversity"], rows), "",
           "## Compute for Flash-DMD to reach dmd2 mode's best FD (vs real), same K", ""]
    crow = []
    for c in cmp:
        if c["reached"]:
            le = "<= " if c["upper_bound"] else ""
            crow.append([c["run"], c["K"], f"{c['dmd2_best_fd']:.2f}",
                         f"{le}{c['flash_wall_s']:.0f} s / {c['flash_gen_updates']} upd",
                         f"{c['dmd2_best_at_wall_s']:.0f} s / {c['dmd2_best_at_gen_updates']} upd",
                         f"{le}{c['pct_of_dmd2_to_best']:.1f}%", f"{le}{c['pct_of_dmd2_total']:.1f}%"])
        else:
            crow.append([c["run"], c["K"], f"{c['dmd2_best_fd']:.2f}", f"not reached (best {c['flash_best_fd']:.2f})",
                         f"{c['dmd2_best_at_wall_s']:.0f} s", "-", "-"])
    out.append(format_table(["flash run", "K", "dmd2 best FD", "flash cost to reach it", "dmd2 cost to its best",
                             "% of dmd2 (to best)", "% of dmd2 (whole run)"], crow))
    if reach_at:
        out += ["", "## Training wall time (generator updates) to first reach an FD vs real", ""]
        rows = [[name, *[("-" if v is None else f"{v['wall_s']:.0f} s ({v['gen_updates']})") for v in by.values()]]
                for name, by in reach_at.items()]
        out.append(format_table(["run", *[f"FD <= {k}" for k in next(iter(reach_at.values()))]], rows))
    if noise:
        out += ["", "## Sampling noise: FD vs real of each last checkpoint on 3 other seed sets", ""]
        out.append(format_table(["run", "FD on 3 seed sets", "mean", "std"],
                                [[n, ", ".join(f"{f:.2f}" for f in v["fd_real"]), f"{v['mean']:.2f}", f"{v['std']:.2f}"]
                                 for n, v in noise.items()]))
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's generator updates")
    ap.add_argument("--per-class", type=int, default=50, help="evaluation samples per digit (N = 10x)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trainer (2 cores: leave one free)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_vs_cost")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="redo the comparison, plot and table from a results JSON this script wrote (no training)")
    args = ap.parse_args()
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        payload["compute_to_reach_dmd2_best"] = compare(payload["results"])
        payload["time_to_reach_fd"] = time_to_reach(payload["results"])
        payload["derived_with"] = command_line()
        if "seed_noise" not in payload:
            payload["seed_noise"] = seed_noise(payload["results"], args.work, payload["per_class"])
        write_json(args.out.with_name(args.out.name + ".json"), payload)
        plot(payload["results"], args.out.with_name(args.out.name + ".png"))
        md = table(payload["results"], payload["compute_to_reach_dmd2_best"], payload["command"],
                   payload["time_to_reach_fd"], payload["seed_noise"])
        head = f"Command: `{payload['command']}`\n"
        md = md.replace(head, head + f"\nTables re-derived from its JSON with `{payload['derived_with']}`\n", 1)
        args.out.with_name(args.out.name + ".md").write_text(md)
        print(md)
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")

    import torch

    from trainer.config import ModelSpec, parse_spec
    from trainer.models import load_teacher
    from trainer.toy.evaluate import default_evaluator, eval_labels, generate, teacher_reference

    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one pipeline load per checkpoint: keep the log readable
    t_start = time.time()
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    ev = default_evaluator()
    labels = eval_labels(args.per_class)
    ctx: dict[str, Any] = {"evaluator": ev, "labels": labels, "reference": teacher_reference(teacher, ev), "init": {}}
    results: dict[str, dict] = {}
    for name in names:
        spec, ttur, gen_updates = run_spec(name, args.scale, args.seed)
        cfg = parse_spec(spec)
        k = cfg.schedule.num_steps
        if k not in ctx["init"]:  # generator update 0: G = the teacher, sampled with the student's sampler, CFG 1
            imgs = generate(teacher, labels, method="renoise", timesteps=cfg.schedule.timesteps, guidance=1.0)
            ctx["init"][k] = ev.report(imgs, labels, ctx["reference"])
        run_dir = train_run(name, spec, args.work, args.threads)
        points = score_run(name, run_dir, spec, ttur, ctx, args.keep_checkpoints)
        results[name] = {"K": k, "ttur": cfg.distill.ttur, "ema": cfg.distill.ema, "mode": cfg.distill.mode,
                         "gen_updates": gen_updates, "spec": spec, "points": points}
    cmp, reach_at = compare(results), time_to_reach(results)
    noise = seed_noise(results, args.work, args.per_class)
    command = command_line()
    payload = {"command": command, "machine": machine_info(), "per_class": args.per_class, "seed": args.seed,
               "threads": args.threads, "scale": args.scale, "real_baselines": ev.real_baselines(),
               "results": results, "compute_to_reach_dmd2_best": cmp, "time_to_reach_fd": reach_at,
               "seed_noise": noise, "total_s": round(time.time() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_name(args.out.name + ".json"), payload)
    plot(results, args.out.with_name(args.out.name + ".png"))
    md = table(results, cmp, command, reach_at, noise)
    args.out.with_name(args.out.name + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
