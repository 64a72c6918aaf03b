"""Quality vs training cost on the digits teacher: Flash-DMD (TTUR 1 at lambda_ema 0 and 0.98, and other rows) vs
dmd2 mode, K = 4, FD against held-out real digits.

The paper's headline claim (Tables 1 and 6, Fig. 5-6) at small scale. Every run uses the shipped digits teacher
and the demo's batch and optimiser settings (`flashjob.demo.DEMO_SPEC`), reads its GAN reals from the digits'
train split (`data.builtin: digits-train`), and differs only in what the row names (`RUNS`). Each configuration
is trained once per training seed (--seeds) as a real `python -m trainer` subprocess; every checkpoint is scored
on the same labels and per-image seeds (N = 10 x --per-class): digits-FD vs the 360 held-out digits
(`fd_heldout`) and vs all digits (`fd_real`), FD vs the teacher's 50-step samples at the student's CFG
(`distill.real_guidance`), precision/recall and density/coverage vs the held-out digits, prompt accuracy and
intra-class diversity. Each checkpoint's evaluator features are kept in the run folder (features/, not committed).

    python bench/quality_vs_cost.py --runs dmd2-k4 --seeds 0 --per-class 50         # one run (about an hour, loaded)
    python bench/quality_vs_cost.py --seeds 0 --scale 0.05 --per-class 5 --runs flash-ttur1-k4-noema   # a smoke run
    python bench/quality_vs_cost.py --cached-only --seeds 0-4 --per-class 50 --runs dmd2-k4,flash-ttur1-k4-noema,flash-ttur1-k4

Writes bench/results/quality_vs_cost.{json,png,md} (the report: bench/_qvc_report.py). Each (configuration, seed)
result is cached as JSON under bench/results/runs/quality_vs_cost_heldout/ and not run again (delete it to redo
one); a killed run resumes from its last checkpoint under --work. Only each run's last checkpoint is kept after
scoring (--keep-checkpoints keeps all); bench/rl_ablation.py starts from flash-ttur1-k4-s0's.
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

from _common import REPO, command_line, machine_info
from _seeds import cached_run, parse_seeds, run_cache

from flashjob.demo import DEMO_SPEC

RESULTS = REPO / "bench" / "results"

# name -> (spec overrides, generator updates, generator updates between scored checkpoints). Every run reads its
# GAN reals from the digits' train split (`builtin: digits-train`): the held-out split is the FD reference only.
# lambda_ema is explicit in every flash run, so a change to the demo's recipe cannot move the EMA sweep.
RUNS: dict[str, tuple[dict[str, Any], int, int]] = {
    "flash-ttur1-k4": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.98}}, 400, 50),
    "flash-ttur2-k4": ({"distill": {"mode": "flash", "ttur": 2, "ema": 0.98}}, 500, 50),
    "flash-ttur1-k4-noema": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0}}, 400, 50),
    "flash-ttur1-k4-ema0.9": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.9}}, 600, 50),
    "flash-ttur1-k4-ema0.995": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.995}}, 600, 50),
    # dmd2 scored densely (every 25 updates) over the range a priced 400-update flash run spans: 0.35 x 400 = 140
    # dmd2 updates at the measured price (148 at its interval's upper end), 80 at the paper's. (Cut from 400 to
    # 150 updates for the CPU this study had; the earlier 1,600-update runs are in runs/quality_vs_cost/.)
    "dmd2-k4": ({"distill": {"mode": "dmd2", "ema": 0.0}}, 150, 25),
    "flash-ttur1-k2": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.98},
                        "schedule": {"num_steps": 2, "dm_steps": None}}, 500, 50),
    "dmd2-k2": ({"distill": {"mode": "dmd2", "ema": 0.0}, "schedule": {"num_steps": 2, "dm_steps": None}}, 150, 25),
    # The teacher drift: the no-EMA recipe with one suspect changed each. Compared with flash-ttur1-k4-noema on FD
    # vs the teacher's 50-step samples at the students' CFG.
    "drift-nogan": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0, "gan_weight": 0.0}}, 600, 50),
    "drift-glr5e-6": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0}, "optim": {"generator": {"lr": 5e-6}}},
                      600, 50),
    "drift-dm999": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0},
                     "schedule": {"num_steps": 4, "dm_steps": [999, 749, 499]}}, 600, 50),
}
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


def run_spec(name: str, scale: float, seed: int, dmd2_steps: dict[int, int] | None = None) -> tuple[dict[str, Any], int, int]:
    """(spec, ttur, generator updates) of one run; dmd2_steps: K -> the dmd2 runs' generator updates."""
    over, gen_updates, every_upd = RUNS[name]
    spec = _merge(DEMO_SPEC, {**over, "data": {"builtin": "digits-train"}})
    spec["name"] = f"bench-{name}-s{seed}"
    if spec["distill"]["mode"] == "dmd2" and dmd2_steps:
        gen_updates = dmd2_steps.get(spec["schedule"].get("num_steps", 4), gen_updates)
    if spec["schedule"].get("num_steps") == 2:
        spec["schedule"].pop("dm_steps", None)  # K = 2: the default, DM on 999 (the only non-final step)
    ttur = spec["distill"].get("ttur") or (1 if spec["distill"]["mode"] == "flash" else 5)
    every_upd = max(int(round(every_upd * scale)), 1)
    points = max(int(round(gen_updates * scale)) // every_upd, 1)
    every = every_upd * ttur
    spec["train"].update(max_steps=every * points, checkpoint_every=every, sample_every=every * points,
                         keep_last=1000, seed=seed, log_every=1)
    return spec, ttur, every * points // ttur


def train_run(name: str, spec: dict, work: Path, threads: int) -> Path:
    """Train `spec` in work/name (resuming a partial run); a finished run is not trained again."""
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


def score_run(name: str, run_dir: Path, spec: dict, ttur: int, ctx: dict, keep: bool,
              timesteps: tuple[int, ...]) -> list[dict[str, Any]]:
    """Score every checkpoint; each one's features are kept in run_dir/features/ (small, not committed) so that a
    new metric can be added without sampling again."""
    import torch

    from flashjob.digits_scoring import student_samples

    ev, labels = ctx["evaluator"], ctx["labels"]
    reference = ctx["reference"](spec["distill"]["real_guidance"])
    seconds = cumulative_seconds(run_dir)
    points = [{"step": 0, "gen_updates": 0, "wall_s": 0.0, **ctx["init"](timesteps, reference)}]
    # Only the checkpoint grid: a run stopped by a signal saves an off-grid checkpoint to resume from, which is
    # not a scored point of every seed.
    every, last = spec["train"]["checkpoint_every"], spec["train"]["max_steps"]
    ckpts = [ck for ck in sorted((run_dir / "checkpoints").glob("step-*"))
             if int(ck.name.split("-")[1]) % every == 0 or int(ck.name.split("-")[1]) == last]
    (run_dir / "features").mkdir(exist_ok=True)
    for ck in ckpts:
        step = int(ck.name.split("-")[1])
        feats = ev.features(student_samples(ck, labels))
        torch.save(feats.half(), run_dir / "features" / f"{ck.name}.pt")
        rep = ev.report_features(feats, labels, reference)
        points.append({"step": step, "gen_updates": math.ceil(step / ttur), "wall_s": round(seconds.get(step, math.nan), 2), **rep})
        print(f"[{name}] step {step}: FD held-out {rep['fd_heldout']:.2f}, FD teacher {rep['fd_teacher']:.2f}, "
              f"recall {rep['recall']:.3f}", flush=True)
    if not keep:
        for ck in ckpts[:-1]:
            shutil.rmtree(ck, ignore_errors=True)
    return points


def teacher_rows(ev: Any, per_class: int, guidance: float = DEMO_SPEC["distill"]["real_guidance"]) -> dict:
    """The teacher scored like the students, at the students' CFG: 50-step Euler (cached features) and as the
    students' 4-step sampler (update 0 of every run)."""
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.toy.reference import teacher_features
    from trainer.toy.teacher_sampling import eval_labels

    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    feats = teacher_features(teacher, ev, per_class=per_class, guidance=guidance, progress=False)
    return {f"teacher 50-step, CFG {guidance:g}": ev.report_features(feats, eval_labels(per_class))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--seeds", default="0,1,2", help="training seeds: 0,1,2 or 0-2")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's generator updates")
    ap.add_argument("--dmd2-steps", type=int, default=None,
                    help="generator updates of dmd2-k4 (dmd2-k2 gets 3/4 of it); default RUNS' 1600 and 1200, "
                    "4x the 400 that stopped before dmd2's FD had plateaued")
    ap.add_argument("--per-class", type=int, default=150, help="evaluation samples per digit (N = 10x)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trainer (2 cores: leave one free)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-heldout")
    ap.add_argument("--runs-dir", type=Path, default=RESULTS / "runs" / "quality_vs_cost_heldout",
                    help="per-(configuration, seed) result cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_vs_cost")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: the tables and plots from the (run, seed) results already under --runs-dir")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="redo the comparison, plot and table from a results JSON this script wrote (no training)")
    args = ap.parse_args()
    from _qvc_report import derive, write_outputs

    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        runs = {name: {int(s): r for s, r in by.items()} for name, by in payload["runs"].items()}
        payload.update(derive(runs), derived_with=command_line())
        print(write_outputs(payload, args.out))
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in RUNS]:
        ap.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        ap.error(str(err))
    dmd2_steps = None if args.dmd2_steps is None else {4: args.dmd2_steps, 2: args.dmd2_steps * 3 // 4}
    if args.cached_only:  # the tables from the committed per-run results, for whatever (run, seed) has one
        cached = {name: {seed: json.loads(path.read_text()) for seed in seeds
                         if (path := run_cache(args.runs_dir, name, seed, args.per_class)).is_file()} for name in names}
        runs = {name: by for name, by in cached.items() if by}
        if not runs:
            raise SystemExit(f"--cached-only: no cached runs under {args.runs_dir} for these --runs and --seeds")
        from trainer.toy.evaluate import default_evaluator

        ev = default_evaluator()
        payload = {"command": command_line(), "per_class": args.per_class, "seeds": seeds,
                   "real_baselines": ev.real_baselines(), "teacher_rows": teacher_rows(ev, args.per_class),
                   **derive(runs)}
        print(write_outputs(payload, args.out))
        return

    import torch

    from trainer.jobspec import ModelSpec, parse_spec
    from trainer.models import load_teacher
    from trainer.toy.evaluate import default_evaluator
    from trainer.toy.reference import teacher_reference
    from trainer.toy.teacher_sampling import eval_labels, generate

    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one pipeline load per checkpoint: keep the log readable
    t_start = time.time()
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    ev = default_evaluator()
    labels = eval_labels(args.per_class)
    refs: dict[float, Any] = {}
    inits: dict[tuple[tuple[int, ...], int], dict] = {}

    def reference(guidance: float) -> Any:
        """The teacher's 50-step samples at the CFG the student is distilled with (its `real_guidance`)."""
        if guidance not in refs:
            refs[guidance] = teacher_reference(teacher, ev, per_class=args.per_class, guidance=guidance)
        return refs[guidance]

    def init(timesteps: tuple[int, ...], ref: Any) -> dict:
        """Generator update 0: G = the teacher as the student's K-step sampler (renoise, CFG 1)."""
        key = (timesteps, id(ref))
        if key not in inits:
            imgs = generate(teacher, labels, method="renoise", timesteps=list(timesteps), guidance=1.0)
            inits[key] = ev.report(imgs, labels, ref)
        return inits[key]

    ctx: dict[str, Any] = {"evaluator": ev, "labels": labels, "init": init, "reference": reference}
    runs: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            spec, ttur, gen_updates = run_spec(name, args.scale, seed, dmd2_steps)
            cfg = parse_spec(spec)
            k = cfg.schedule.num_steps

            def make(name=name, seed=seed, spec=spec, ttur=ttur, gen_updates=gen_updates, cfg=cfg, k=k) -> dict:
                run_dir = train_run(f"{name}-s{seed}", spec, args.work, args.threads)
                points = score_run(f"{name}-s{seed}", run_dir, spec, ttur, ctx, args.keep_checkpoints,
                                   tuple(cfg.schedule.timesteps))
                return {"name": name, "seed": seed, "K": k, "ttur": cfg.distill.ttur, "ema": cfg.distill.ema,
                        "mode": cfg.distill.mode, "gen_updates": gen_updates, "per_class": args.per_class,
                        "reference_guidance": spec["distill"]["real_guidance"], "spec": spec, "points": points}

            runs.setdefault(name, {})[seed] = cached_run(run_cache(args.runs_dir, name, seed, args.per_class), make)
    payload = {"command": command_line(), "machine": machine_info(), "per_class": args.per_class, "seeds": seeds,
               "threads": args.threads, "scale": args.scale, "real_baselines": ev.real_baselines(), **derive(runs),
               "total_s": round(time.time() - t_start, 1)}
    print(write_outputs(payload, args.out))


if __name__ == "__main__":
    main()
