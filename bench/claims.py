"""The four digits claims of issue #15, decided mechanically from the studies' JSON (no training).

    python bench/claims.py      # reads bench/results/{quality_vs_cost,rl_ablation}.json

Every comparison is paired by training seed (the two configurations of a pair share the seed, hence the init and
the data order) and reported as the mean difference with its 95% t-interval over seeds. A difference decides a
claim only when its interval excludes 0; otherwise the claim is inconclusive at this many seeds. The rules:
- (a) Flash-DMD beats DMD2 at equal compute: flash's final FD vs real minus dmd2's FD at the last checkpoint dmd2
  had reached with no more training wall time (per seed). Reproduced when the interval is below 0, not reproduced
  when above. Also listed: the % of converged dmd2's cost each flash run needed to match its final FD.
- (b) EMA injection helps: FD vs real of each lambda_ema > 0 minus lambda_ema = 0, mean of 3 checkpoints mid-run
  (early) and of the last 3 (late). Helps when below 0, hurts when above.
- (c) Joint RL raises the reward without hurting FD, post-train RL hacks it: changes from the stage-1 start (mean
  of the last 3 checkpoints) of joint-5to1 and of post-train minus those of the no-RL control. Joint holds when its
  reward difference is above 0 and its FD difference is not (interval includes or is below 0); post-train hacks
  when both its reward and its FD differences are above 0.
- (d) High-noise RL >= all-timestep RL: joint-5to1 minus all-timesteps, reward and FD changes. Reproduced when
  the reward difference is above 0 (or includes 0 while the FD difference is below 0), not reproduced when the
  reward difference is below 0; inconclusive otherwise.
Also listed, not a claim: the teacher-drift runs minus the demo's recipe (no EMA), FD vs the teacher and vs real
over the last 3 checkpoints, paired by seed. Writes bench/results/claims.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, write_json
from _stats import Interval, mean_interval

RESULTS = REPO / "bench" / "results"
TAIL = 3
FD_WORDS = {"above": "worse FD", "below": "better FD", "includes 0": "no detectable FD change"}


def paired(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """Interval of a[seed] - b[seed] over the seeds both have (None with fewer than 2)."""
    seeds = sorted(set(a) & set(b))
    return mean_interval([a[s] - b[s] for s in seeds]) if len(seeds) >= 2 else None


def sign(iv: Interval | None) -> str:
    """'below' / 'above' when the interval excludes 0, else 'includes 0' (or 'n < 2')."""
    if iv is None:
        return "n < 2"
    return "below" if iv.hi < 0 else "above" if iv.lo > 0 else "includes 0"


def _runs(payload: dict) -> dict[str, dict[int, dict]]:
    return {name: {int(s): r for s, r in by.items()} for name, by in payload["runs"].items()}


def at(points: list[dict], field: str, limit: float, key: str) -> float:
    """`key` at the last checkpoint whose `field` (wall_s, gen_updates) is at most `limit` (the start if none)."""
    done = [p for p in points if p[field] <= limit]
    return (done[-1] if done else points[0])[key]


def equal_compute(runs: dict[str, dict[int, dict]], flash: str, dmd2: str,
                  ratio: float | None = None) -> Interval | None:
    """Per seed: flash's final FD vs real minus dmd2's FD vs real at the same compute: the same measured training
    wall time, or with `ratio` (one flash update in dmd2 updates, from clean timings) the same priced updates."""
    f = {s: r["points"][-1] for s, r in runs[flash].items()}
    field = "wall_s" if ratio is None else "gen_updates"
    d = {s: at(runs[dmd2][s]["points"], field, f[s][field] * (ratio or 1.0), "fd_real") for s in runs[dmd2] if s in f}
    return paired({s: p["fd_real"] for s, p in f.items()}, d)


def window(points: list[dict], where: str, key: str) -> float:
    """Mean `key` over 3 neighbouring trained checkpoints (the update-0 start excluded): around the middle of the
    run ("mid") or its last 3 ("final"). Neighbouring checkpoints of one digits run differ by up to ~3 FD, so a
    single checkpoint would decide on that swing."""
    trained = points[1:]
    m = len(trained) // 2
    pts = trained[max(m - 1, 0):m + 2] if where == "mid" else trained[-TAIL:]
    return sum(p[key] for p in pts) / len(pts)


def ema_effect(runs: dict[str, dict[int, dict]], name: str, base: str, where: str) -> Interval | None:
    """FD vs real of `name` minus `base`, per seed, over 3 checkpoints mid-run or at the end (`window`)."""
    def pick(r: dict) -> float:
        return window(r["points"], where, "fd_real")

    return paired({s: pick(r) for s, r in runs[name].items()}, {s: pick(r) for s, r in runs[base].items()})


def tail_delta(run: dict, start: dict, key: str) -> float:
    pts = run["points"][-TAIL:]
    return sum(p[key] for p in pts) / len(pts) - start[key]


def rl_effect(runs: dict[str, dict[int, dict]], start: dict, name: str, base: str, key: str) -> Interval | None:
    return paired({s: tail_delta(r, start, key) for s, r in runs[name].items()},
                  {s: tail_delta(r, start, key) for s, r in runs[base].items()})


def decide(q: dict | None, rl: dict | None, costs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """costs: run name -> clean s per generator update (quality_vs_cost.update_costs)."""
    rows: list[dict[str, Any]] = []
    costs = costs or {}

    def add(claim: str, what: str, iv: Interval | None, verdict: str) -> None:
        rows.append({"claim": claim, "comparison": what, "interval": iv.as_dict() if iv else None, "verdict": verdict})

    if q is not None:
        runs = _runs(q)
        for flash in ("flash-ttur1-k4-noema", "flash-ttur1-k4", "flash-ttur2-k4"):
            if flash in runs and "dmd2-k4" in runs:
                if flash in costs and "dmd2-k4" in costs:
                    ratio = costs[flash] / costs["dmd2-k4"]
                    iv = equal_compute(runs, flash, "dmd2-k4", ratio)
                    add("a", f"{flash} final FD real - dmd2-k4 FD real at the same compute (updates priced at clean "
                        f"per-update costs: 1 flash update = {ratio:.2f} dmd2 updates)", iv,
                        {"below": "reproduced", "above": "not reproduced"}.get(sign(iv), "inconclusive"))
                iv = equal_compute(runs, flash, "dmd2-k4")
                add("a", f"{flash} final FD real - dmd2-k4 FD real at the same measured (contended) wall time", iv,
                    {"below": "reproduced", "above": "not reproduced"}.get(sign(iv), "inconclusive"))
        for name in ("flash-ttur1-k4-ema0.9", "flash-ttur1-k4", "flash-ttur1-k4-ema0.995"):
            if name in runs and "flash-ttur1-k4-noema" in runs:
                for where in ("mid", "final"):
                    iv = ema_effect(runs, name, "flash-ttur1-k4-noema", where)
                    add("b", f"{name} - no EMA, FD real {'mid-run' if where == 'mid' else 'at the end'} (3 checkpoints)", iv,
                        {"below": "helps", "above": "hurts"}.get(sign(iv), "inconclusive"))
        for name in ("drift-nogan", "drift-glr5e-6", "drift-dm999"):
            if name in runs and "flash-ttur1-k4-noema" in runs:
                for key in ("fd_teacher", "fd_real"):
                    iv = paired({s: window(r["points"], "final", key) for s, r in runs[name].items()},
                                {s: window(r["points"], "final", key) for s, r in runs["flash-ttur1-k4-noema"].items()})
                    add("drift", f"{name} - demo recipe (no EMA): {key}, last 3 checkpoints", iv,
                        FD_WORDS.get(sign(iv), sign(iv)))
    if rl is not None:
        runs, start, control = _runs(rl), rl["start"], "distill-only"
        if "joint-5to1" in runs and control in runs:
            r, f = (rl_effect(runs, start, "joint-5to1", control, k) for k in ("reward", "fd_real"))
            add("c", "joint-5to1 - no-RL control: reward change", r, {"above": "raises", "below": "lowers"}.get(
                sign(r), "inconclusive"))
            add("c", "joint-5to1 - no-RL control: FD real change", f, FD_WORDS.get(sign(f), sign(f)))
        if "post-train" in runs and control in runs:
            r, f = (rl_effect(runs, start, "post-train", control, k) for k in ("reward", "fd_real"))
            add("c", "post-train - no-RL control: reward and FD real change", r,
                "hacks (reward up, FD up)" if sign(r) == "above" and sign(f) == "above" else "inconclusive")
            add("c", "post-train - no-RL control: FD real change", f, FD_WORDS.get(sign(f), sign(f)))
        if "joint-5to1" in runs and "post-train" in runs:  # does the distillation turn limit the damage?
            for k in ("reward", "fd_real"):
                iv = rl_effect(runs, start, "joint-5to1", "post-train", k)
                add("c", f"joint-5to1 - post-train: {k} change", iv,
                    FD_WORDS.get(sign(iv), sign(iv)) if k == "fd_real" else sign(iv))
        if "joint-5to1" in runs and "all-timesteps" in runs:
            r, f = (rl_effect(runs, start, "joint-5to1", "all-timesteps", k) for k in ("reward", "fd_real"))
            verdict = ("reproduced" if sign(r) == "above" or (sign(r) == "includes 0" and sign(f) == "below")
                       else "not reproduced" if sign(r) == "below" else "inconclusive")
            add("d", "joint-5to1 (999, 749) - all-timesteps (999, 749, 499): reward change", r, verdict)
            add("d", "joint-5to1 - all-timesteps: FD real change", f, FD_WORDS.get(sign(f), sign(f)))
        if "joint-5to1" in runs and "joint-critics-distill-only" in runs:
            for k in ("reward", "fd_real"):
                iv = rl_effect(runs, start, "joint-critics-distill-only", "joint-5to1", k)
                add("critic_updates", f"distill_only - every: {k} change", iv, sign(iv))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(d: dict | None) -> str:
        return Interval(**d).fmt(3) if d else "-"

    return format_table(["claim", "paired difference over training seeds", "mean [95% interval]", "verdict"],
                        [[r["claim"], r["comparison"], fmt(r["interval"]), r["verdict"]] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, default=RESULTS / "quality_vs_cost.json")
    ap.add_argument("--rl", type=Path, default=RESULTS / "rl_ablation.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "claims")
    args = ap.parse_args()
    q = json.loads(args.quality.read_text()) if args.quality.is_file() else None
    rl = json.loads(args.rl.read_text()) if args.rl.is_file() else None
    from quality_vs_cost import update_costs

    rows = decide(q, rl, update_costs())
    md = "\n".join(["# The digits claims, decided by paired seed differences", "", f"Command: `{command_line()}`", "",
                    "Each row: configuration A minus B, per training seed, mean and 95% t-interval; a verdict "
                    "needs the interval to exclude 0 (rules in bench/claims.py).", "", table(rows)]) + "\n"
    write_json(args.out.with_name(args.out.name + ".json"), {"command": command_line(), "rows": rows})
    args.out.with_name(args.out.name + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
