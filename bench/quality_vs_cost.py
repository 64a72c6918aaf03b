"""Quality vs training cost on the digits teacher: Flash-DMD (TTUR 1, TTUR 2, an EMA sweep) vs dmd2 mode, K = 4, 2.

The paper's headline claim (Tables 1 and 6, Fig. 5-6) at small scale. Every run uses the same teacher
(the shipped digits teacher), batch and optimiser settings (`flashjob.demo.DEMO_SPEC`); runs differ only
in what the row names: the mode (flash: Pixel-GAN + EMA injection, hinge; dmd2: latent-head GAN, softplus, no
EMA), the TTUR, K, and lambda_ema (the EMA sweep: 0, 0.9, 0.98, 0.995). Each configuration is trained once per
training seed (--seeds); each run is a real `python -m trainer` subprocess; every checkpoint is then scored with
the digits evaluator on the same labels and per-image seeds: digits-FD vs all 1797 real digits, vs the teacher's
50-step CFG samples (N = 10 x --per-class of each), prompt accuracy and intra-class diversity. Every figure is a
mean over seeds with a 95% t-interval (tables) or band (plots).

Cost axes: cumulative generator updates, and cumulative training wall time (the sum of the trainer's own
`time/step_s`, so checkpointing and scoring are excluded). The dmd2 baseline runs --dmd2-steps generator updates
(long enough for its FD vs real to plateau: check the plot). "Compute to match converged dmd2": the dmd2 FD is
the mean over seeds of its final checkpoint's FD; for each seed of a Flash-DMD run, the first checkpoint at or
below it, as a percentage of dmd2's mean wall time and generator updates for its whole run.

    python bench/quality_vs_cost.py --seeds 0,1,2                    # the full study (several CPU-hours)
    python bench/quality_vs_cost.py --seeds 0 --scale 0.05 --per-class 5 --runs flash-ttur1-k4   # a smoke run

Writes bench/results/quality_vs_cost.{json,png,md}. Each (configuration, seed) result is cached as JSON under
bench/results/runs/quality_vs_cost/ and not run again (delete it to redo one); the training folders live
under --work. Only each run's last checkpoint is kept after scoring (--keep-checkpoints keeps all);
bench/rl_ablation.py starts from flash-ttur1-k4-s0's.
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
from _seeds import band, cached_run, first_reach, fmt_reach, parse_seeds, plot_band, reach_interval, run_cache
from _stats import Interval, mean_interval

from flashjob.demo import DEMO_SPEC

RESULTS = REPO / "bench" / "results"

# name -> (spec overrides, generator updates, generator updates between scored checkpoints). Every run reads its
# GAN reals from the digits' train split (`builtin: digits-train`): the held-out split is the FD reference only.
# lambda_ema is explicit in every flash run, so a change to the demo's recipe cannot move the EMA sweep.
RUNS: dict[str, tuple[dict[str, Any], int, int]] = {
    "flash-ttur1-k4": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.98}}, 600, 50),
    "flash-ttur2-k4": ({"distill": {"mode": "flash", "ttur": 2, "ema": 0.98}}, 500, 50),
    "flash-ttur1-k4-noema": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0}}, 600, 50),
    "flash-ttur1-k4-ema0.9": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.9}}, 600, 50),
    "flash-ttur1-k4-ema0.995": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.995}}, 600, 50),
    # dmd2 scored densely (every 25 updates) over the range a priced flash run spans (~50-300 dmd2 updates).
    "dmd2-k4": ({"distill": {"mode": "dmd2"}}, 400, 25),
    "flash-ttur1-k2": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.98},
                        "schedule": {"num_steps": 2, "dm_steps": None}}, 500, 50),
    "dmd2-k2": ({"distill": {"mode": "dmd2"}, "schedule": {"num_steps": 2, "dm_steps": None}}, 400, 25),
    # The teacher drift: the no-EMA recipe with one suspect changed each. Compared with flash-ttur1-k4-noema on FD
    # vs the teacher's 50-step samples at the students' CFG.
    "drift-nogan": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0, "gan_weight": 0.0}}, 600, 50),
    "drift-glr5e-6": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0}, "optim": {"generator": {"lr": 5e-6}}},
                      600, 50),
    "drift-dm999": ({"distill": {"mode": "flash", "ttur": 1, "ema": 0.0},
                     "schedule": {"num_steps": 4, "dm_steps": [999, 749, 499]}}, 600, 50),
}
# What each drift run changes, against the no-EMA flash run.
DRIFT = {"flash-ttur1-k4-noema": "the demo's recipe (GAN on, generator lr 1e-5, DM at 749 and 499)",
         "drift-nogan": "no GAN (distill.gan_weight 0): is the GAN pulling toward the real digits?",
         "drift-glr5e-6": "generator lr 5e-6 (half): does the generator overshoot?",
         "drift-dm999": "DM loss at 999 too: does the unsupervised first step wander?"}

# The EMA sweep (Eq. 11's lambda_ema), flash TTUR 1, K = 4; 0.98 is the demo's value.
EMA_SWEEP = {"flash-ttur1-k4-noema": 0.0, "flash-ttur1-k4-ema0.9": 0.9, "flash-ttur1-k4": 0.98,
             "flash-ttur1-k4-ema0.995": 0.995}


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
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    (run_dir / "features").mkdir(exist_ok=True)
    for ck in ckpts:
        step = int(ck.name.split("-")[1])
        feats = ev.features(student_samples(ck, labels))
        torch.save(feats.half(), run_dir / "features" / f"{ck.name}.pt")
        rep = ev.report_features(feats, labels, reference)
        points.append({"step": step, "gen_updates": math.ceil(step / ttur), "wall_s": round(seconds[step], 2), **rep})
        print(f"[{name}] step {step}: FD held-out {rep['fd_heldout']:.2f}, FD teacher {rep['fd_teacher']:.2f}, "
              f"recall {rep['recall']:.3f}", flush=True)
    if not keep:
        for ck in ckpts[:-1]:
            shutil.rmtree(ck, ignore_errors=True)
    return points


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """name -> {seed: run} -> per configuration: bands over seeds (vs updates and vs wall time), final and best FD."""
    out = {}
    for name, by_seed in runs.items():
        any_run = next(iter(by_seed.values()))
        curves = [r["points"] for r in by_seed.values()]
        agg = {k: any_run[k] for k in ("K", "ttur", "ema", "mode", "gen_updates")}
        agg["seeds"] = sorted(by_seed)
        for key in ("fd_real", "fd_teacher", "accuracy", "diversity"):
            agg[f"band_{key}"] = band(curves, "gen_updates", key)
        agg["band_wall_s"] = band(curves, "gen_updates", "wall_s")
        agg["final"] = {key: mean_interval([c[-1][key] for c in curves]).as_dict()
                        for key in ("fd_real", "fd_teacher", "accuracy", "diversity", "wall_s")}
        agg["best_fd_real"] = mean_interval([min(p["fd_real"] for p in c[1:]) for c in curves]).as_dict()
        out[name] = agg
    return out


# Which spec of `train_step.py --digits-study` (bench/results/train_step_digits.json) prices a run's updates.
COST_KEY = {"flash-ttur1-k4-noema": "flash-ttur1", "flash-ttur1-k4": "flash-ttur1-ema0.98",
            "flash-ttur1-k4-ema0.9": "flash-ttur1-ema0.98", "flash-ttur1-k4-ema0.995": "flash-ttur1-ema0.98",
            "dmd2-k4": "dmd2-ttur5"}


def update_costs(path: Path = RESULTS / "train_step_digits.json") -> dict[str, float]:
    """Run name -> clean seconds per generator update (median, interleaved timing); {} without the file."""
    if not path.is_file():
        return {}
    configs = json.loads(path.read_text())["results"]["digits"]["configs"]
    return {run: configs[key]["timing"]["s_per_gen_update_median"] for run, key in COST_KEY.items() if key in configs}


def compare(runs: dict[str, dict[int, dict]], agg: dict[str, dict],
            costs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Per K: each flash configuration's cost, per seed, to first reach the converged dmd2 FD (the mean over
    dmd2's seeds of its final FD), as a % of dmd2's mean whole-run cost; intervals over the flash seeds.
    Costs: measured training wall time (contended: see bench/README.md), generator updates, and, with `costs`
    (run -> clean s per generator update), updates priced at the clean per-update cost ("pct_clean")."""
    costs = costs or {}
    rows = []
    for name, by_seed in runs.items():
        if not name.startswith("flash"):
            continue
        k = agg[name]["K"]
        base = agg.get(f"dmd2-k{k}")
        if base is None:
            continue
        target = base["final"]["fd_real"]["mean"]
        total_s = base["final"]["wall_s"]["mean"]
        total_upd = base["gen_updates"]
        hits = [first_reach(r["points"], "fd_real", target) for r in by_seed.values()]
        pct = [None if h is None else {"wall": 100 * h["wall_s"] / total_s, "upd": 100 * h["gen_updates"] / total_upd}
               for h in hits]
        row = {"run": name, "K": k, "dmd2_converged_fd": base["final"]["fd_real"], "dmd2_wall_s": total_s,
               "dmd2_gen_updates": total_upd, "flash_best_fd": agg[name]["best_fd_real"],
               "wall_s": reach_interval(hits, "wall_s"), "gen_updates": reach_interval(hits, "gen_updates"),
               "pct_wall": reach_interval(pct, "wall"), "pct_gen_updates": reach_interval(pct, "upd")}
        if name in costs and f"dmd2-k{k}" in costs:
            ratio = costs[name] / costs[f"dmd2-k{k}"]  # one flash update in dmd2 updates
            row["update_cost_ratio"] = ratio
            row["pct_clean"] = reach_interval([None if h is None else {"c": 100 * h["gen_updates"] * ratio / total_upd}
                                               for h in hits], "c")
        rows.append(row)
    return rows


def teacher_drift(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per drift run, over seeds: FD vs the teacher at its lowest and at the end, the rise between them, and the
    update where it is lowest; FD vs real at the end (does the fix cost the real-data fit?)."""
    out = {}
    for name in DRIFT:
        if name not in runs:
            continue
        curves = [r["points"][1:] for r in runs[name].values()]  # from the first trained checkpoint
        low = [min(c, key=lambda p: p["fd_teacher"]) for c in curves]
        out[name] = {"change": DRIFT[name], "seeds": sorted(runs[name]),
                     "min_fd_teacher": mean_interval([p["fd_teacher"] for p in low]).as_dict(),
                     "min_at_updates": mean_interval([p["gen_updates"] for p in low]).as_dict(),
                     "final_fd_teacher": mean_interval([c[-1]["fd_teacher"] for c in curves]).as_dict(),
                     "rise": mean_interval([c[-1]["fd_teacher"] - p["fd_teacher"] for c, p in zip(curves, low,
                                                                                                 strict=True)]).as_dict(),
                     "final_fd_real": mean_interval([c[-1]["fd_real"] for c in curves]).as_dict()}
    return out


FD_THRESHOLDS = (12.0, 10.0, 8.0)
CURVE_THRESHOLDS = tuple(x / 2 for x in range(32, 11, -1))  # FD vs real 16, 15.5, ..., 6


def reach_curves(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Time-to-threshold curves: per configuration, per FD threshold on CURVE_THRESHOLDS, the interval over
    seeds of the wall time and of the generator updates to first reach it. A threshold only enters a curve
    while every seed reaches it, so a mean is never over the fast seeds alone."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, by_seed in runs.items():
        curves: dict[str, list[dict[str, Any]]] = {"wall_s": [], "gen_updates": []}
        for th in CURVE_THRESHOLDS:
            hits = [first_reach(r["points"], "fd_real", th) for r in by_seed.values()]
            if any(h is None for h in hits):
                break
            for field, pts in curves.items():
                pts.append({"threshold": th, **mean_interval([h[field] for h in hits]).as_dict()})
        out[name] = curves
    return out


def plot_reach(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_field in curves.items():
        style = "-" if name.startswith("flash") else "--"
        for ax, field in zip(axes, ("gen_updates", "wall_s"), strict=True):
            if by_field[field]:
                plot_band(ax, by_field[field], "threshold", name, style)
    for ax, what in zip(axes, ("generator updates", "training wall time (s)"), strict=True):
        ax.set_xlabel("digits-FD vs real (threshold)")
        ax.set_ylabel(f"{what} to first reach it")
        ax.invert_xaxis()  # lower FD = harder: to the right
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Time to threshold: mean and 95% interval over seeds (a threshold is drawn while every seed reaches it)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_to_reach(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per configuration and FD threshold: wall s and generator updates to the first checkpoint at or below it,
    over seeds (how many reached, and the interval among those)."""
    out: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        out[name] = {}
        for th in FD_THRESHOLDS:
            hits = [first_reach(r["points"], "fd_real", th) for r in by_seed.values()]
            out[name][f"{th:g}"] = {"wall_s": reach_interval(hits, "wall_s"),
                                    "gen_updates": reach_interval(hits, "gen_updates")}
    return out


def plot(agg: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, a in agg.items():
        style = "-" if name.startswith("flash") else "--"
        wall = [p["mean"] for p in a["band_wall_s"]]
        for row, key in enumerate(("fd_real", "fd_teacher")):
            pts = a[f"band_{key}"]
            plot_band(axes[row][0], pts, "gen_updates", name, style)
            plot_band(axes[row][1], [{**p, "wall_s": w} for p, w in zip(pts, wall, strict=False)], "wall_s", name, style)
    for row, what in enumerate(("digits-FD vs real", "digits-FD vs teacher 50-step")):
        for col, x in enumerate(("generator updates", "training wall time (s), mean over seeds")):
            ax = axes[row][col]
            ax.set_yscale("log")
            ax.set_ylim(bottom=1.0)  # digits-FD stays above 1; a 3-seed band's lower edge can dip toward 0
            ax.set_xlabel(x)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean and 95% interval over training seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _iv(d: dict, digits: int = 2) -> str:
    """An interval dict (or a band point, which also carries its x) as 'mean [lo, hi] (n=...)'."""
    return Interval(**{k: d[k] for k in ("mean", "lo", "hi", "sd", "n")}).fmt(digits)


def table(agg: dict[str, dict], cmp: list[dict], reach_at: dict, command: str, per_class: int,
          drift: dict[str, dict] | None = None) -> str:
    rows = [[name, a["K"], a["ttur"], a["ema"], a["gen_updates"], _iv(a["final"]["wall_s"], 0), _iv(a["best_fd_real"]),
             _iv(a["final"]["fd_real"]), _iv(a["final"]["fd_teacher"]), _iv(a["final"]["accuracy"], 3),
             _iv(a["final"]["diversity"], 2)] for name, a in agg.items()]
    out = ["# Quality vs cost on the digits teacher", "", f"Command: `{command}`", "",
           f"N = {10 * per_class} samples per checkpoint; FD vs all 1797 real digits. Every cell: mean "
           "[95% t-interval] (n = training seeds).", "",
           format_table(["run", "K", "TTUR", "ema", "gen updates", "train s", "best FD real", "final FD real",
                         "final FD teacher", "accuracy", "diversity"], rows), "",
           "## Compute for Flash-DMD to reach converged dmd2's FD (vs real), same K", "",
           format_table(["flash run", "K", "dmd2 converged FD", "dmd2 whole run", "flash wall s to reach",
                         "flash gen updates to reach", "% of dmd2 wall (contended)", "% of dmd2 gen updates",
                         "% of dmd2 compute (clean per-update cost)"],
                        [[c["run"], c["K"], _iv(c["dmd2_converged_fd"]),
                          f"{c['dmd2_wall_s']:.0f} s / {c['dmd2_gen_updates']} upd", fmt_reach(c["wall_s"]),
                          fmt_reach(c["gen_updates"]), fmt_reach(c["pct_wall"], 1), fmt_reach(c["pct_gen_updates"], 1),
                          fmt_reach(c["pct_clean"], 1) if "pct_clean" in c else "-"]
                         for c in cmp]), "",
           "## Generator updates to first reach an FD vs real (among the seeds that reach it)", "",
           format_table(["run", *[f"FD <= {k}" for k in next(iter(reach_at.values()))]],
                        [[name, *[fmt_reach(v["gen_updates"]) for v in by.values()]] for name, by in reach_at.items()]),
           "", "## Training wall time to first reach it (contended: runs shared 2 cores, see bench/README.md)", "",
           format_table(["run", *[f"FD <= {k}" for k in next(iter(reach_at.values()))]],
                        [[name, *[fmt_reach(v["wall_s"]) for v in by.values()]] for name, by in reach_at.items()])]
    ema = [[name, EMA_SWEEP[name], _iv(agg[name]["band_fd_real"][len(agg[name]["band_fd_real"]) // 2]),
            _iv(agg[name]["final"]["fd_real"]), _iv(agg[name]["final"]["fd_teacher"])]
           for name in EMA_SWEEP if name in agg]
    if ema:
        out += ["", "## EMA injection sweep (flash, TTUR 1, K = 4): FD vs real early (mid-run) and late", "",
                format_table(["run", "lambda_ema", "FD real, mid-run", "FD real, final", "FD teacher, final"], ema)]
    if drift:
        out += ["", "## The teacher drift: FD vs the teacher's 50-step samples, one suspect changed per run", "",
                format_table(["run", "what it changes", "lowest FD teacher", "at gen update", "final FD teacher",
                              "rise after the lowest", "final FD real"],
                             [[name, d["change"], _iv(d["min_fd_teacher"]), _iv(d["min_at_updates"], 0),
                              _iv(d["final_fd_teacher"]), _iv(d["rise"]), _iv(d["final_fd_real"])]
                              for name, d in drift.items()])]
    return "\n".join(out) + "\n"


def derive(runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Everything the tables and plots show, from the per-(configuration, seed) runs alone."""
    agg = aggregate(runs)
    return {"runs": runs, "aggregate": agg, "compute_to_match_dmd2": compare(runs, agg, update_costs()),
            "time_to_reach_fd": time_to_reach(runs), "teacher_drift": teacher_drift(runs),
            "reach_curves": reach_curves(runs)}


def write_outputs(payload: dict[str, Any], out: Path) -> str:
    write_json(out.with_name(out.name + ".json"), payload)
    agg = payload["aggregate"]
    plot({n: a for n, a in agg.items() if n not in DRIFT or n == "flash-ttur1-k4-noema"}, out.with_name(out.name + ".png"),
         "Flash-DMD vs dmd2 mode on the digits teacher")
    if "reach_curves" in payload:
        plot_reach({n: c for n, c in payload["reach_curves"].items() if not n.startswith("drift")},
                   out.with_name(out.name + "_reach.png"))
    if any(n in agg for n in DRIFT if n.startswith("drift")):
        plot({n: agg[n] for n in DRIFT if n in agg}, out.with_name(out.name + "_drift.png"),
             "The teacher drift: the demo's recipe with one suspect changed")
    md = table(payload["aggregate"], payload["compute_to_match_dmd2"], payload["time_to_reach_fd"], payload["command"],
               payload["per_class"], payload.get("teacher_drift"))
    out.with_name(out.name + ".md").write_text(md)
    return md


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

        payload = {"command": command_line(), "per_class": args.per_class, "seeds": seeds,
                   "real_baselines": default_evaluator().real_baselines(), **derive(runs)}
        print(write_outputs(payload, args.out))
        return

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
