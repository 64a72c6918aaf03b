"""The four digits claims, decided mechanically from the studies' JSON (no training), Holm-adjusted as one family.

    python bench/claims.py      # reads bench/results/{quality_vs_cost,rl_ablation}.json and train_step_digits.json

Every comparison is paired by training seed (the two configurations share the seed, hence init and data order):
the mean difference with its 95% t-interval over seeds and the paired t-test's p-value. **Every row of the table
is one test of one family**: the p-values are Holm-adjusted across all rows (`_stats.holm`), and a verdict needs
the adjusted p < 0.05; the raw interval and its unadjusted reading stay beside it.

One window rule for every claim (`_seeds.window_at`): a run's value "at" a point is the mean over the 3 trained
checkpoints ending at the last checkpoint at or before it, never one checkpoint.
- (a) Flash-DMD beats DMD2 at equal compute: at a budget of B DMD2-equivalent updates, flash's window at
  B / ratio flash updates minus dmd2's window at B updates, FD vs held-out real. Two prices of one flash update
  in dmd2 updates: `measured` (clean interleaved timing, `price_ratio`) and `paper` (batch x iterations, the
  paper's Table 1 measure: one flash iteration per update vs TTUR = 5 for dmd2, so 0.2). Reproduced when below 0.
- (b) EMA injection helps: lambda_ema 0.98 minus 0 on FD vs held-out real, mid-run and at the end; and the
  trade it was credited with: FD vs the teacher's 50-step samples at the students' CFG, at the end.
- (c), (d) and every RL row: the change from the stage-1 start over the last window, minus the no-RL control's.
  The hacking rule applies to every RL run: reward up and FD up (both adjusted) = "hacks"; reward up and FD not
  detectably up = "holds"; reward not detectably up = "no reward gain". (c) also compares post-train stopped
  early (at joint's reward, interpolated) with joint; (d) compares at matched preference pairs and matched wall
  time as well as at matched updates.
Writes bench/results/claims.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, write_json
from _seeds import interp_reach, window_at
from _stats import Interval, holm, mean_interval, ratio_interval, t_pvalue

RESULTS = REPO / "bench" / "results"
ALPHA = 0.05
# DMD2-equivalent generator updates at which (a) is decided (plus flash's whole run): dmd2 is scored every 25
# updates, so 75 is the first budget with a full 3-checkpoint window.
BUDGETS = (75, 100, 150)
PAPER_RATIO = 0.2  # batch x iterations: 1 flash iteration per update against dmd2's TTUR 5
FLASH_A = ("flash-ttur1-k4-noema", "flash-ttur1-k4")
# Which spec of `train_step.py --digits-study` prices a run's updates.
COST_KEY = {"flash-ttur1-k4-noema": "flash-ttur1", "flash-ttur1-k4": "flash-ttur1-ema0.98", "dmd2-k4": "dmd2-ttur5"}
RL_RUNS = ("joint-5to1", "post-train", "all-timesteps", "joint-critics-distill-only", "joint-1to1", "joint-nogan")
CONTROL = "distill-only"
EMA_SWEEP = {"flash-ttur1-k4-ema0.9": 0.9, "flash-ttur1-k4": 0.98, "flash-ttur1-k4-ema0.995": 0.995}
FD_LABEL = {"fd_heldout": "FD vs held-out real", "fd_real": "FD vs all real digits"}
JUDGE2 = "judge_independent"
REWARD_LABEL = {JUDGE2: "independent judge's score", "reward": "reward"}


# ------------------------------------------------------------------------------------------- prices of updates


def _config_timings(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["results"]["digits"]["configs"] if path.is_file() else {}


def update_costs(path: Path = RESULTS / "train_step_digits.json") -> dict[str, float]:
    """Run name -> clean seconds per generator update (median, interleaved timing); {} without the file."""
    configs = _config_timings(path)
    return {run: configs[key]["timing"]["s_per_gen_update_median"] for run, key in COST_KEY.items() if key in configs}


def price_ratio(flash: str, path: Path = RESULTS / "train_step_digits.json", block: int = 10) -> Interval | None:
    """One `flash` update in dmd2 updates, with an interval: per interleaved timing round (`block` iterations of
    each config, so outside load hits both alike), flash's s/update over dmd2's; `_stats.ratio_interval` over the
    rounds. None without the timing file or its per-iteration times."""
    configs = _config_timings(path)
    f, d = configs.get(COST_KEY[flash]), configs.get(COST_KEY["dmd2-k4"])
    if not f or not d or "iteration_s" not in f or "iteration_s" not in d:
        return None
    def per_round(c: dict) -> list[float]:
        """Seconds per generator update in each interleaved round of config c."""
        size = c.get("round_iterations", block)
        it = c["iteration_s"]
        return [sum(it[r * size:(r + 1) * size]) / (size / c["spec"]["ttur"]) for r in range(len(it) // size)]

    num, den = per_round(f), per_round(d)
    n = min(len(num), len(den))
    num, den = num[:n], den[:n]
    return ratio_interval(num, den)


def cost_table(path: Path = RESULTS / "train_step_digits.json") -> str:
    """The price of each study run's update, and each flash run's ratio to dmd2 with its interval."""
    costs = update_costs(path)
    rows = []
    for run in COST_KEY:
        if run not in costs:
            continue
        r = price_ratio(run, path) if run != "dmd2-k4" else None
        rows.append([run, COST_KEY[run], f"{costs[run]:.3f}", r.fmt(3) if r else "-",
                     f"{PAPER_RATIO:g}" if run != "dmd2-k4" else "-"])
    return format_table(["run", "timed spec", "s per generator update (median)",
                         "1 update in dmd2 updates, measured: geometric mean [95%] (n = rounds)",
                         "paper's measure (batch x iterations)"], rows)


# ------------------------------------------------------------------------------------------------ comparisons


def _runs(payload: dict) -> dict[str, dict[int, dict]]:
    return {name: {int(s): r for s, r in by.items()} for name, by in payload["runs"].items()}


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> Interval | None:
    """Interval of a[seed] - b[seed] over the seeds where both are defined (None with fewer than 2)."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    return mean_interval([a[s] - b[s] for s in seeds]) if len(seeds) >= 2 else None


def sign(iv: Interval | None) -> str:
    """'below' / 'above' when the interval excludes 0, else 'includes 0' (or 'n < 2')."""
    if iv is None:
        return "n < 2"
    return "below" if iv.hi < 0 else "above" if iv.lo > 0 else "includes 0"


def fd_key(points: list[dict]) -> str:
    """FD vs held-out real where the study scored it, else (older studies) FD vs all real digits."""
    return "fd_heldout" if "fd_heldout" in points[-1] else "fd_real"


def at_budget(runs: dict[str, dict[int, dict]], flash: str, dmd2: str, budget: float, ratio: float) -> Interval | None:
    """(a) at `budget` dmd2-equivalent updates: flash's window at budget / ratio updates minus dmd2's at budget.
    None where a run has not reached the point (its last checkpoint is before it) or has < 2 shared seeds."""
    def val(by: dict[int, dict], limit: float) -> dict[int, float | None]:
        out: dict[int, float | None] = {}
        for s, r in by.items():
            pts = r["points"]
            out[s] = window_at(pts, "gen_updates", limit, fd_key(pts)) if pts[-1]["gen_updates"] >= limit - 1e-9 else None
        return out

    return paired(val(runs[flash], budget / ratio), val(runs[dmd2], budget))


def window_diff(runs: dict[str, dict[int, dict]], a: str, b: str, where: str, key: str | None = None) -> Interval | None:
    """a minus b, per seed, of the window at the run's end ("final") or at its middle checkpoint ("mid")."""
    def val(r: dict) -> float | None:
        pts = r["points"]
        limit = pts[-1]["gen_updates"] if where == "final" else pts[1:][len(pts[1:]) // 2]["gen_updates"]
        return window_at(pts, "gen_updates", limit, key or fd_key(pts))

    return paired({s: val(r) for s, r in runs[a].items()}, {s: val(r) for s, r in runs[b].items()})


def rl_change(run: dict, start: dict, key: str, field: str = "step", limit: float | None = None) -> float | None:
    """The window (at `limit` of `field`, default the end) minus the stage-1 start."""
    pts = [{"step": 0, "wall_s": 0.0, **start}, *run["points"]]
    v = window_at(pts, field, pts[-1][field] if limit is None else limit, key)
    return None if v is None else v - start[key]


def rl_diff(runs: dict[str, dict[int, dict]], start: dict, a: str, b: str, key: str,
            limit_b: Callable[[dict], tuple[str, float]] | None = None) -> Interval | None:
    """a's change minus b's, per seed; `limit_b(run a)` -> (field, value) moves b's window (matched pairs/time)."""
    def b_val(s: int) -> float | None:
        if s not in runs[b]:
            return None
        if limit_b is None:
            return rl_change(runs[b][s], start, key)
        field, lim = limit_b(runs[a][s])
        return rl_change(runs[b][s], start, key, field, lim)

    return paired({s: rl_change(r, start, key) for s, r in runs[a].items()}, {s: b_val(s) for s in runs[a]})


def matched_reward(runs: dict[str, dict[int, dict]], start: dict, joint: str, post: str, fd: str,
                   reward: str = "reward") -> Interval | None:
    """Post-train stopped early: per seed, post-train's FD change where its reward first reaches joint's final
    reward (interpolated between checkpoints), minus joint's final FD change. Below 0: stopped-early post-train
    pays less FD for the same reward."""
    diffs: dict[int, float | None] = {}
    for s, r in runs[post].items():
        if s not in runs[joint]:
            continue
        target = rl_change(runs[joint][s], start, reward)
        pts = [{"step": 0, **start}, *r["points"]]
        neg = [{**p, "neg": -p[reward]} for p in pts]
        hit = None if target is None else interp_reach(neg, "neg", -(start[reward] + target), (fd,))
        jf = rl_change(runs[joint][s], start, fd)
        diffs[s] = None if hit is None or jf is None else (hit[fd] - start[fd]) - jf
    return paired(diffs, dict.fromkeys(diffs, 0.0))


def reward_key(rl: dict) -> str:
    """The RL rows' reward: the independent judge's score (trainer/toy/judge.py: trained on the held-out split, no
    reward descends from it) where the study recorded it at the start and at every checkpoint; otherwise the
    score of the judge the trained reward was fine-tuned from (an older study), whose rise is near in-sample."""
    points = [p for by in rl["runs"].values() for r in by.values() for p in r["points"]]
    return JUDGE2 if JUDGE2 in rl["start"] and all(JUDGE2 in p for p in points) else "reward"


# ------------------------------------------------------------------------------------------------- the table


def decide(q: dict | None, rl: dict | None, timing: Path = RESULTS / "train_step_digits.json",
           earlier: dict | None = None) -> list[dict[str, Any]]:
    """Every row of the table. q: the held-out study (quality_vs_cost.json); earlier: the study before it (FD vs all
    digits, teacher reference at CFG 2), whose rows are tagged and belong to the same Holm family."""
    rows: list[dict[str, Any]] = []
    studies = [(x, tag) for x, tag in ((q, ""), (earlier, "[earlier study] ")) if x is not None]

    def add(claim: str, what: str, iv: Interval | None, words: tuple[str, str], **extra: Any) -> dict[str, Any]:
        row = {"claim": claim, "comparison": what, "interval": iv.as_dict() if iv else None,
               "p": t_pvalue(iv) if iv else math.nan, "words": list(words), **extra}
        rows.append(row)
        return row

    for q, study in studies:
        runs = _runs(q)
        for flash in FLASH_A:
            if flash not in runs or "dmd2-k4" not in runs:
                continue
            measured = price_ratio(flash, timing)
            whole = max(p["gen_updates"] for r in runs[flash].values() for p in r["points"])
            for label, ratio in (("measured", measured), ("paper", None)):
                r = PAPER_RATIO if ratio is None else ratio.mean
                for b in [x for x in BUDGETS if x / r < whole] + [whole * r]:
                    iv = at_budget(runs, flash, "dmd2-k4", b, r)
                    if iv is None:  # a run stops before the point, or no full window there
                        continue
                    bounds = ""
                    if ratio is not None and not math.isnan(ratio.lo):  # is the reading the same at the ratio's bounds?
                        alt = [sign(iv_) if (iv_ := at_budget(runs, flash, "dmd2-k4", b, x)) else "past a run's end"
                               for x in (ratio.lo, ratio.hi)]
                        bounds = f"raw reading at the ratio's bounds: {alt[0]} / {alt[1]}"
                    tag = "flash's whole run" if b == whole * r else f"{b:g} dmd2 updates"
                    add("a", study + f"{flash} - dmd2-k4, {FD_LABEL[fd_key(runs[flash][min(runs[flash])]['points'])]}, at {tag} ({label} price: 1 flash update = {r:.3f} "
                        f"dmd2 updates, flash at {b / r:.0f} updates)", iv, ("reproduced", "not reproduced"),
                        note=bounds)
        for name, lam in EMA_SWEEP.items():
            if name not in runs or "flash-ttur1-k4-noema" not in runs:
                continue
            any_run = next(iter(runs[name].values()))
            label = FD_LABEL[fd_key(any_run["points"])]
            cfg = any_run.get("reference_guidance")
            for where in ("mid", "final"):
                add("b", study + f"lambda_ema {lam} - 0, {label}, {'mid-run' if where == 'mid' else 'at the end'}",
                    window_diff(runs, name, "flash-ttur1-k4-noema", where), ("helps", "hurts"))
            add("b", study + f"lambda_ema {lam} - 0, FD vs the teacher's 50-step samples "
                f"({'at the students CFG ' + format(cfg, 'g') if cfg else 'at CFG 2, not the students CFG'}), at the end",
                window_diff(runs, name, "flash-ttur1-k4-noema", "final", "fd_teacher"),
                ("nearer the teacher", "further from the teacher"))
    if rl is not None:
        runs, start = _runs(rl), rl["start"]
        fd = fd_key(next(iter(next(iter(runs.values())).values()))["points"])
        rk = reward_key(rl)
        rl_label = REWARD_LABEL[rk]
        if CONTROL in runs:
            for name in [n for n in RL_RUNS if n in runs]:
                claim = "c" if name in ("joint-5to1", "post-train") else "d" if name == "all-timesteps" else "rl"
                rw = add(claim, f"{name} - no-RL control: {rl_label} change", rl_diff(runs, start, name, CONTROL, rk),
                         ("lowers the reward", "raises the reward"), hacking_of=name)
                add(claim, f"{name} - no-RL control: {FD_LABEL[fd]} change", rl_diff(runs, start, name, CONTROL, fd),
                    ("better FD", "worse FD"), hacking_pair=id(rw))
        if "joint-5to1" in runs and "post-train" in runs:
            for k in (rk, fd):
                add("c", f"joint-5to1 - post-train: {rl_label if k == rk else FD_LABEL[k]} change",
                    rl_diff(runs, start, "joint-5to1", "post-train", k),
                    ("lower", "higher"))
            add("c", f"post-train stopped at joint-5to1's {rl_label} (interpolated) - joint-5to1: {FD_LABEL[fd]} change",
                matched_reward(runs, start, "joint-5to1", "post-train", fd, rk), ("post-train early pays less FD",
                                                                              "post-train early pays more FD"))
        if "joint-5to1" in runs and "all-timesteps" in runs:
            pairs = (lambda r: ("step", r["points"][-1]["step"] * 2 / 3), "matched preference pairs (2 vs 3 per update)")
            wall = (lambda r: ("wall_s", r["points"][-1]["wall_s"]), "matched training wall time")
            for limit, how in ((None, "matched updates"), pairs, wall):
                add("d", f"joint-5to1 (999, 749) - all-timesteps (999, 749, 499), {how}: {rl_label} change",
                    rl_diff(runs, start, "joint-5to1", "all-timesteps", rk, limit),
                    ("not reproduced", "reproduced"))
    return adjust(rows)


def adjust(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Holm across every row; each row's verdict from its adjusted p, then the hacking rule on RL reward rows."""
    for row, p_adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        iv = row["interval"]
        row["p_holm"] = p_adj
        row["raw"] = sign(Interval(**iv)) if iv else "n < 2"
        if iv is None or math.isnan(p_adj):
            row["verdict"] = "n < 2"
        elif p_adj < ALPHA:
            row["verdict"] = row["words"][0] if iv["mean"] < 0 else row["words"][1]
        else:
            row["verdict"] = "inconclusive"
    by_id = {id(r): r for r in rows}
    for row in rows:
        if "hacking_pair" in row:
            reward = by_id[row.pop("hacking_pair")]
            reward["verdict"] = hacking_verdict(reward, row)
    return rows


def hacking_verdict(reward: dict[str, Any], fd: dict[str, Any]) -> str:
    """The rule for every RL run vs the control, on Holm-adjusted decisions."""
    up = reward["verdict"] == reward["words"][1]
    fd_up = fd["verdict"] == fd["words"][1]
    if not up:
        return "no reward gain" if reward["verdict"] != "n < 2" else "n < 2"
    return "hacks (reward up, FD up)" if fd_up else "holds (reward up, FD not detectably up)"


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(d: dict | None) -> str:
        return Interval(**d).fmt(3) if d else "-"

    def p(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.3g}"

    return format_table(["claim", "paired difference over training seeds", "mean [raw 95% interval] (n)", "p",
                         "p Holm", "raw reading", "verdict (Holm)"],
                        [[r["claim"], r["comparison"] + (f"; {r['note']}" if r.get("note") else ""),
                          fmt(r["interval"]), p(r["p"]), p(r["p_holm"]), r["raw"], r["verdict"]] for r in rows])


def rl_note(rl: dict | None) -> str:
    if rl is None:
        return "No RL study."
    fd = FD_LABEL[fd_key(next(iter(next(iter(_runs(rl).values())).values()))["points"])]
    if reward_key(rl) == JUDGE2:
        return (f"RL rows: {fd}; reward = the independent judge's score (trained on the held-out split with its own "
                "seed and width; no reward was trained from it).")
    return (f"RL rows: the earlier RL study, {fd}, reward scored by the judge the trained reward was fine-tuned "
            "from (not an independent judge).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, default=RESULTS / "quality_vs_cost.json")
    ap.add_argument("--earlier", type=Path, default=RESULTS / "quality_vs_cost_alldigits.json",
                    help="the study before the held-out split (FD vs all digits); its rows join the family, tagged")
    heldout_rl = RESULTS / "rl_ablation_heldout.json"  # the RL study scored by the independent judge, if it ran
    ap.add_argument("--rl", type=Path, default=heldout_rl if heldout_rl.is_file() else RESULTS / "rl_ablation.json")
    ap.add_argument("--timing", type=Path, default=RESULTS / "train_step_digits.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "claims")
    args = ap.parse_args()
    q = json.loads(args.quality.read_text()) if args.quality.is_file() else None
    rl = json.loads(args.rl.read_text()) if args.rl.is_file() else None
    earlier = json.loads(args.earlier.read_text()) if args.earlier.is_file() else None
    rows = decide(q, rl, args.timing, earlier)
    seeds = {f"{tag}{n}": sorted(int(s) for s in by) for x, tag in ((q, ""), (earlier, "[earlier study] "),
                                                                     (rl, "[RL] ")) if x for n, by in x["runs"].items()}
    md = "\n".join([
        "# The digits claims, decided by paired seed differences, Holm-adjusted across the table", "",
        f"Command: `{command_line()}`", "",
        f"Each row: A minus B per training seed, mean, raw 95% t-interval and p; {len(rows)} rows form one family "
        f"and a verdict needs the Holm-adjusted p < {ALPHA}. Every value is a window of 3 checkpoints (rules in "
        "bench/claims.py).", "",
        "Seeds per run (a row pairs the seeds both of its runs have): "
        + "; ".join(f"{n}: {len(s)} ({','.join(map(str, s))})" for n, s in seeds.items()), "",
        "Held-out study: FD vs the 360 held-out real digits, teacher reference at the students' CFG 1. "
        "[earlier study]: FD vs all 1,797 digits (the evaluator trained on 1,437 of them), teacher reference at "
        "CFG 2. " + rl_note(rl), "", "## Price of an update", "", cost_table(args.timing), "", table(rows)]) + "\n"
    write_json(args.out.with_name(args.out.name + ".json"),
               {"command": command_line(), "alpha": ALPHA, "seeds": seeds,
                "rows": [{k: v for k, v in r.items() if k != "hacking_of"} for r in rows]})
    args.out.with_name(args.out.name + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
