"""A mini Table 4 on the digits teacher: joint RL vs post-train RL, RL timesteps, and the GAN (Sec. 3.4).

Every run starts from the same stage-1 checkpoint (bench/quality_vs_cost.py's flash-ttur1-k4-s0: λ_ema 0.98, 600 steps)
and trains against the rollout-trained reward (`trainer/toy/digits_reward_rollout`, `--reward`: the judge
fine-tuned on the generator's own candidates, flashjob/rollout_reward.py); every checkpoint is scored with the
judge (`trainer/toy/digits_reward`). Same batch and RL settings; runs differ only in what the row names:
- joint-5to1: 5 RL updates per distillation update (Table 4's choice), Pixel-GAN on;
- joint-1to1: 1:1;
- post-train: RL only (rl.joint: false), no distillation updates;
- all-timesteps: RL candidates at every step but the deterministic last (999, 749, 499), joint 5:1;
- joint-nogan: joint 5:1 with distill.gan_weight 0;
- distill-only (the control): no RL, stage 1 resumed for the 120 distillation updates joint-5to1 makes (plotted
  against the RL updates joint-5to1 has made by then).
Each is a real `python -m trainer` subprocess (kind: rl), once per training seed (--seeds). Every checkpoint (and
the stage-1 start) is scored on the same labels and per-image seeds: the LRM reward of the final images (t = 0),
digits-FD vs all real digits and vs the teacher's 50-step samples, prompt accuracy and intra-class diversity.
Figures are means over seeds with a 95% t-interval (tables) or band (plots).

    python bench/rl_ablation.py --seeds 0,1,2      # the full study (about 25 min per seed and run on one core)
    python bench/rl_ablation.py --seeds 0,1,2 --scale 0.25 --runs joint-5to1,post-train,distill-only,all-timesteps,joint-critics-distill-only
                                                   # the committed results (150 RL updates per run)
    python bench/rl_ablation.py --seeds 0 --scale 0.05 --per-class 5 --runs joint-5to1   # a smoke run

Writes bench/results/rl_ablation.{json,png,md}; each (run, seed) result is cached as JSON under
bench/results/runs/rl_ablation/ and not run again. The paper's claim under test: joint RL raises the reward while FD
stays put, and post-train RL reward-hacks (reward up, FD worse).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, machine_info, write_json
from _seeds import band, cached_run, parse_seeds, plot_band, run_cache
from _stats import Interval, mean_interval
from quality_vs_cost import RESULTS, _merge, cumulative_seconds, train_run

from flashjob.demo import DEMO_SPEC
from trainer.toy import HERE

JUDGE_DIR = HERE / "digits_reward"  # the reward every checkpoint is scored with (t = 0)
# The reward stage 2 trains against: the judge fine-tuned on the generator's own candidates at the RL steps
# (flashjob/rollout_reward.py), which ranks them at 749 and 499 where the judge is near chance.
ROLLOUT_REWARD_DIR = HERE / "digits_reward_rollout"
# The held-out study's lambda_ema 0.98 run, seed 0 (its last checkpoint is kept). The committed rl_ablation results
# started from the earlier study's run of the same name (runs/bench-quality/), scored against all digits.
DEFAULT_INIT = REPO / "runs" / "bench-heldout" / "flash-ttur1-k4-s0"
RL_BASE: dict[str, Any] = {
    "kind": "rl",
    # The stage-1 recipe of the joint runs' distillation turns, as before the demo dropped EMA injection.
    "distill": {"ema": 0.98},
    "rl": {"reward": {"kind": "lrm", "path": str(ROLLOUT_REWARD_DIR)}, "num_candidates": 4, "beta": 500.0,
           "ratio": 5, "joint": True, "batch_size": 8, "optimizer": {"lr": 1e-5}},  # lr: --rl-lr
}
CONTROL = "distill-only"  # no RL: stage 1 continued for the distillation updates joint-5to1 makes alongside RL
RUNS: dict[str, dict[str, Any]] = {
    "joint-5to1": {},
    "joint-1to1": {"rl": {"ratio": 1}},
    "post-train": {"rl": {"joint": False}},
    "all-timesteps": {"rl": {"timesteps": "all"}},
    "joint-nogan": {"distill": {"gan_weight": 0.0}},
    # Alg. 1 runs the fake-score and D updates every iteration (rl.critic_updates: every, the default);
    # this run updates them on distillation turns only, as the trainer once did.
    "joint-critics-distill-only": {"rl": {"critic_updates": "distill_only"}},
    CONTROL: {},  # built by control_spec
}
RL_UPDATES = 600
EVAL_POINTS = 6


def run_spec(name: str, init: Path, scale: float, seed: int, thresholds: tuple[float, float],
             rl_lr: float, critic_updates: str | None = None, reward: Path = ROLLOUT_REWARD_DIR) -> dict[str, Any]:
    base = RL_BASE if critic_updates is None else _merge(RL_BASE, {"rl": {"critic_updates": critic_updates}})
    spec = _merge(_merge(DEMO_SPEC, base), RUNS[name])
    spec["rl"]["reward"]["path"] = str(reward)
    spec["name"] = f"bench-rl-{name}-s{seed}"
    spec["rl"].update(init_from=str(init), threshold_min=thresholds[0], threshold_max=thresholds[1])
    spec["rl"]["optimizer"]["lr"] = rl_lr
    updates = max(int(round(RL_UPDATES * scale)), EVAL_POINTS)
    every = max(updates // EVAL_POINTS, 1)
    spec["train"].update(max_steps=every * EVAL_POINTS, checkpoint_every=every, sample_every=every * EVAL_POINTS,
                         keep_last=1000, seed=seed, log_every=1, num_samples=10)
    return spec


def control_spec(init: Path, scale: float, seed: int) -> tuple[dict[str, Any], int, int]:
    """The stage-1 spec continued from `init` (a resume of a copy): (spec, start step, RL:distill ratio)."""
    ratio = RL_BASE["rl"]["ratio"]
    start = int(json.loads((init / "meta.json").read_text())["step"])
    rl_every = max(max(int(round(RL_UPDATES * scale)), EVAL_POINTS) // EVAL_POINTS, 1)
    every = max(rl_every // ratio, 1)  # distillation updates joint-5to1 makes per RL checkpoint interval
    spec = _merge(DEMO_SPEC, {"distill": RL_BASE["distill"]})  # the joint runs' distillation turns, without RL
    spec["name"] = f"bench-rl-{CONTROL}-s{seed}"
    spec["train"].update(max_steps=start + every * EVAL_POINTS, checkpoint_every=every,
                         sample_every=every * EVAL_POINTS, keep_last=1000, seed=seed, log_every=1)
    return spec, start, ratio


def score_checkpoint(ck: Path, ctx: dict) -> dict[str, float]:
    """Reward of the final latents (t = 0) and the digits metrics of their images."""
    import torch

    from flashjob.digits_scoring import SEED
    from inference.pipeline import load_pipeline
    from trainer.toy.prompts import digit_prompt

    pipe = load_pipeline(ck)
    labels, rewards, images = ctx["labels"], [], []
    for lo in range(0, len(labels), 250):
        lab = labels[lo:lo + 250].tolist()
        prompts = [digit_prompt(c) for c in lab]
        with torch.no_grad():
            lat = pipe.latents(prompts, [SEED * 1_000_003 + lo + j for j in range(len(lab))])
            rewards.append(ctx["lrm"].score(lat, torch.zeros(len(lab), dtype=torch.long), prompts).float())
            images.append(pipe.decode(lat).clamp(-1, 1))
    images = torch.cat(images)
    rep = ctx["evaluator"].report(images, labels, ctx["reference"])
    out = {"reward": float(torch.cat(rewards).mean()), **rep}
    if ctx.get("judge2") is not None:  # the independent judge (trainer/toy/judge.py): no reward descends from it
        out["judge_independent"] = float(ctx["judge2"].score(images, labels).mean())
    return out


def real_digits_reward(teacher, lrm, labels) -> float:  # noqa: ANN001
    """The LRM's reward (t = 0) of real digits with the same labels: the top of the scale for this reward."""
    import torch

    from trainer.data import DigitsDataset
    from trainer.toy.prompts import digit_prompt

    ds = DigitsDataset(teacher.resolution)
    real = torch.tensor(ds.labels)
    by_class = {c: (real == c).nonzero().flatten() for c in range(10)}
    seen = dict.fromkeys(range(10), 0)
    idx = []
    for c in labels.tolist():  # the k-th "c" in labels gets the k-th real c
        pool = by_class[c]
        idx.append(int(pool[seen[c] % len(pool)]))
        seen[c] += 1
    lat = teacher.encode_images(ds.images[torch.tensor(idx)], torch.Generator().manual_seed(0))
    prompts = [digit_prompt(c) for c in labels.tolist()]
    with torch.no_grad():
        return float(lrm.score(lat, torch.zeros(len(idx), dtype=torch.long), prompts).float().mean())


def run_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Training metrics per step (the last row per step wins, as after a resume)."""
    out: dict[int, dict[str, float]] = {}
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row["metrics"])
    return out


def summarise_training(metrics: dict[int, dict[str, float]], upto: int, window: int) -> dict[str, float]:
    """Means over the `window` RL updates before `upto` of the RL diagnostics."""
    rows = [metrics[s] for s in range(max(upto - window + 1, 1), upto + 1) if s in metrics]
    out = {}
    for key in ("loss/rl", "rl/kept_frac", "rl/reward_gap", "rl/reward_mean"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


METRICS = ("reward", "fd_real", "fd_teacher", "accuracy", "diversity")
TAIL = 3  # checkpoints averaged in the table's steadier columns


def aggregate(runs: dict[str, dict[int, dict]], start: dict) -> dict[str, dict[str, Any]]:
    """Per run over seeds: bands of every metric vs RL updates (the start prepended), the final values, and the
    change of the mean of the last TAIL checkpoints from the start (one interval over seeds)."""
    out = {}
    for name, by_seed in runs.items():
        curves = [[{"step": 0, **start}, *r["points"]] for r in by_seed.values()]
        one = next(iter(by_seed.values()))
        agg = {k: one[k] for k in ("ratio", "joint", "rl_timesteps", "gan_weight") if k in one}
        agg["label"] = one.get("label")
        agg["seeds"] = sorted(by_seed)
        for key in METRICS:
            agg[f"band_{key}"] = band(curves, "step", key)
            agg[f"final_{key}"] = mean_interval([c[-1][key] for c in curves]).as_dict()
            agg[f"tail_delta_{key}"] = mean_interval(
                [sum(p[key] for p in c[-TAIL:]) / len(c[-TAIL:]) - start[key] for c in curves]).as_dict()
        agg["final_step"] = curves[0][-1]["step"]
        kept = [c[-1]["rl/kept_frac"] for c in curves if "rl/kept_frac" in c[-1]]
        agg["kept_frac"] = mean_interval(kept).as_dict() if kept else None
        agg["wall_s"] = mean_interval([c[-1]["wall_s"] for c in curves]).as_dict()
        out[name] = agg
    return out


def plot(agg: dict[str, dict], path: Path, real_reward: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"reward": "LRM reward (t = 0)", "fd_real": "digits-FD vs real", "fd_teacher": "digits-FD vs teacher",
              "accuracy": "accuracy", "diversity": "intra-class diversity"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for name, a in agg.items():
        for ax, key in zip(axes, METRICS, strict=True):
            plot_band(ax, a[f"band_{key}"], "step", name)
            ax.set_title(titles[key])
            ax.set_xlabel("RL updates")
            ax.grid(alpha=0.3)
    if real_reward is not None:
        axes[0].axhline(real_reward, color="k", ls=":", lw=1, label="real digits")
    axes[0].legend(fontsize=7)
    fig.suptitle("Stage-2 RL ablation on the digits teacher: mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _iv(d: dict | None, digits: int = 2, sign: bool = False) -> str:
    if d is None:
        return "-"
    text = Interval(**d).fmt(digits)
    return ("+" + text) if sign and d["mean"] >= 0 else text


def table(agg: dict[str, dict], start: dict, command: str, per_class: int) -> str:
    rows = [["stage-1 start", "-", "-", "-", f"{start['reward']:.3f}", f"{start['fd_real']:.2f}",
             f"{start['fd_teacher']:.2f}", f"{start['accuracy']:.3f}", "-", "-", "-", "-"]]
    for name, a in agg.items():
        mix = a.get("label") or (a["ratio"] if a["joint"] else "RL only")
        rows.append([name, mix, ",".join(map(str, a.get("rl_timesteps") or [])) or "-", a["final_step"],
                     _iv(a["final_reward"], 3), _iv(a["final_fd_real"]), _iv(a["final_fd_teacher"]),
                     _iv(a["final_accuracy"], 3), _iv(a["kept_frac"]), _iv(a["wall_s"], 0),
                     # One checkpoint's scores move by ~0.3 reward and ~2 FD between neighbours (the no-RL
                     # control too): the mean of the last three is the steadier comparison.
                     _iv(a["tail_delta_reward"], 3, sign=True), _iv(a["tail_delta_fd_real"], 2, sign=True)])
    return "\n".join([
        "# Stage-2 RL ablation on the digits teacher", "", f"Command: `{command}`", "",
        f"N = {10 * per_class} samples per checkpoint. Cells: mean [95% t-interval] (n = training seeds).", "",
        format_table(["run", "RL:distill", "RL timesteps", "RL updates", "reward", "FD real", "FD teacher",
                      "accuracy", "kept frac", "train s", f"reward delta, last {TAIL}", f"FD delta, last {TAIL}"],
                     rows)]) + "\n"


def write_outputs(payload: dict[str, Any], out: Path) -> str:
    real = payload.get("real_digits_reward")
    write_json(out.with_name(out.name + ".json"), payload)
    plot(payload["aggregate"], out.with_name(out.name + ".png"), real)
    md = table(payload["aggregate"], payload["start"], payload["command"], payload["per_class"])
    if real is not None:
        md += f"\nReward of real digits (same labels, t = 0): {real:.3f}\n"
    out.with_name(out.name + ".md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--init", type=Path, default=DEFAULT_INIT, help="stage-1 checkpoint or run directory")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's RL updates")
    ap.add_argument("--per-class", type=int, default=150, help="evaluation samples per digit (N = 10x)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds: 0,1,2 or 0-2")
    ap.add_argument("--threshold", type=float, nargs=2, default=(0.2, 0.3), metavar=("MIN", "MAX"),
                    help="rl.threshold_min/max on the softmax gap of a pair")
    ap.add_argument("--rl-lr", type=float, default=1e-5, help="rl.optimizer.lr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reward", type=Path, default=ROLLOUT_REWARD_DIR,
                    help="the LRM stage 2 trains against (rl.reward.path); checkpoints are always scored with "
                    f"the shipped judge, {JUDGE_DIR.name}")
    ap.add_argument("--critic-updates", choices=("every", "distill_only"), default=None,
                    help="rl.critic_updates for every RL run (default: the spec default, every; "
                    "the joint-critics-distill-only run sets distill_only itself)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-rl")
    ap.add_argument("--runs-dir", type=Path, default=RESULTS / "runs" / "rl_ablation_heldout",
                    help="per-(run, seed) result cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "rl_ablation")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="redo the plot and table from a results JSON this script wrote (no training)")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: the tables and plot from the (run, seed) results already under --runs-dir")
    args = ap.parse_args()
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        runs = {name: {int(s): r for s, r in by.items()} for name, by in payload["runs"].items()}
        payload["aggregate"] = aggregate(runs, payload["start"])
        print(write_outputs(payload, args.out))
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in RUNS]:
        ap.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        ap.error(str(err))

    start_cache = args.runs_dir / f"start-n{10 * args.per_class}.json"
    if args.cached_only:  # the tables from the committed per-run results, for whatever (run, seed) has one
        if not start_cache.is_file():
            raise SystemExit(f"--cached-only: no scored stage-1 start at {start_cache}")
        first = json.loads(start_cache.read_text())
        runs = {name: by for name in names if (by := {
            seed: json.loads(path.read_text()) for seed in seeds
            if (path := run_cache(args.runs_dir, name, seed, args.per_class)).is_file()})}
        if not runs:
            raise SystemExit(f"--cached-only: no cached runs under {args.runs_dir} for these --runs and --seeds")
        payload = {"command": command_line(), "init": first["init"], "judge": str(JUDGE_DIR),
                   "reward": str(args.reward), "per_class": args.per_class, "seeds": seeds, "start": first["start"],
                   "real_digits_reward": first["real_digits_reward"], "runs": runs,
                   "aggregate": aggregate(runs, first["start"])}
        print(write_outputs(payload, args.out))
        return

    import torch
    from diffusers.utils import logging as diffusers_logging

    from trainer.jobspec import ModelSpec, parse_spec
    from trainer.models import load_teacher
    from trainer.reward import load_lrm
    from trainer.rl_loop import resolve_init
    from trainer.toy.evaluate import default_evaluator
    from trainer.toy.reference import teacher_reference
    from trainer.toy.teacher_sampling import eval_labels

    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    t_start = time.time()
    try:
        init = resolve_init(str(args.init))
    except Exception as err:  # noqa: BLE001 - say how to make the stage-1 checkpoint
        raise SystemExit(f"--init: {err}\nmake it with: python bench/quality_vs_cost.py --runs flash-ttur1-k4 "
                         "--seeds 0") from None
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    ev = default_evaluator()
    lrm = load_lrm(JUDGE_DIR, base=teacher.pipe).eval()
    from trainer.toy.judge import JUDGE_DIR as JUDGE2_DIR
    from trainer.toy.judge import IndependentJudge

    # The reference at the students' CFG (distill.real_guidance of DEMO_SPEC, which every run inherits).
    ctx = {"evaluator": ev, "labels": eval_labels(args.per_class), "lrm": lrm,
           "judge2": IndependentJudge.load(JUDGE2_DIR) if (JUDGE2_DIR / "config.json").is_file() else None,
           "reference": teacher_reference(teacher, ev, per_class=args.per_class,
                                          guidance=DEMO_SPEC["distill"]["real_guidance"])}
    first = cached_run(start_cache, lambda: {"init": str(init), "start": score_checkpoint(init, ctx),
                                             "real_digits_reward": real_digits_reward(teacher, lrm, ctx["labels"])})
    if first["init"] != str(init):
        raise SystemExit(f"{start_cache} scored {first['init']}, not --init {init}: delete it (and the run results "
                         "that started there) to change the stage-1 checkpoint")
    start, real_reward = first["start"], first["real_digits_reward"]
    print(f"stage-1 start {init}: reward {start['reward']:.3f}, FD real {start['fd_real']:.2f}; "
          f"real digits' reward {real_reward:.3f}", flush=True)

    def make(name: str, seed: int) -> dict[str, Any]:
        s0, ratio, run = 0, 1, f"{name}-s{seed}"
        if name == CONTROL:
            spec, s0, ratio = control_spec(init, args.scale, seed)
            copy = args.work / run / "checkpoints" / f"step-{s0:08d}"
            if not copy.parent.is_dir():
                shutil.copytree(init, copy)  # the trainer resumes from this copy: weights, optimisers, step
        else:
            spec = run_spec(name, init, args.scale, seed, tuple(args.threshold), args.rl_lr, args.critic_updates,
                            args.reward)
        cfg = parse_spec(spec)
        run_dir = train_run(run, spec, args.work, args.threads)
        seconds, metrics = cumulative_seconds(run_dir), run_metrics(run_dir)
        every = spec["train"]["checkpoint_every"]
        points = []
        for ck in sorted((run_dir / "checkpoints").glob("step-*")):
            step = int(ck.name.split("-")[1])
            if step <= s0:
                continue
            p = {"step": (step - s0) * ratio, "wall_s": round(seconds[step], 2), **score_checkpoint(ck, ctx),
                 **summarise_training(metrics, step, every)}
            points.append(p)
            print(f"[{run}] RL update {step}: reward {p['reward']:.3f}, FD real {p['fd_real']:.2f}, "
                  f"acc {p['accuracy']:.3f}, kept {p.get('rl/kept_frac', float('nan')):.2f}", flush=True)
        base = {"name": name, "seed": seed, "per_class": args.per_class, "init": str(init), "spec": spec,
                "points": points, "gan_weight": cfg.distill.gan_weight}
        if name == CONTROL:  # x axis: the RL updates joint-5to1 has made by the same number of distillation updates
            return {**base, "label": "no RL", "ratio": ratio, "joint": True, "rl_timesteps": []}
        return {**base, "ratio": cfg.rl.ratio, "joint": cfg.rl.joint, "rl_timesteps": cfg.rl.timesteps}

    runs: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            runs.setdefault(name, {})[seed] = cached_run(run_cache(args.runs_dir, name, seed, args.per_class),
                                                         lambda name=name, seed=seed: make(name, seed))
    payload = {"command": command_line(), "machine": machine_info(), "init": str(init), "judge": str(JUDGE_DIR), "reward": str(args.reward),
               "per_class": args.per_class, "seeds": seeds, "threads": args.threads, "scale": args.scale,
               "rl_lr": args.rl_lr, "start": start, "real_digits_reward": real_reward, "runs": runs,
               "aggregate": aggregate(runs, start), "total_s": round(time.time() - t_start, 1)}
    print(write_outputs(payload, args.out))


if __name__ == "__main__":
    main()
