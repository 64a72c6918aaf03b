"""quality_vs_cost's report: aggregates over seeds, time to threshold, the teacher drift, tables and plots.

Everything here is derived from the per-(configuration, seed) run JSON alone (`derive`), so `--cached-only`
rebuilds it without training. The FD is against the held-out real digits (`fd_heldout`; older runs without it
fall back to `fd_real`, FD vs all digits); the floor line is the train-split real digits scored the same way
at the same N (`DigitsEvaluator.real_baselines`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import format_table, write_json
from _seeds import WINDOW, band, fmt_reach, interp_reach, plot_band, reach_interval, window_at
from _stats import Interval, mean_interval
from claims import PAPER_RATIO, price_ratio

METRICS = ("fd_heldout", "fd_teacher", "precision", "recall", "density", "coverage", "accuracy", "diversity")
THRESHOLDS = (20.0, 18.0, 16.0, 14.0, 12.0)
CURVE_THRESHOLDS = tuple(x / 2 for x in range(40, 11, -1))  # FD 20, 19.5, ..., 6
STAGE1 = ("flash-ttur1-k4-noema", "flash-ttur1-k4", "dmd2-k4")


def _fd(points: list[dict]) -> str:
    return "fd_heldout" if "fd_heldout" in points[-1] else "fd_real"


def _final(curve: list[dict], key: str) -> float:
    return window_at(curve, "gen_updates", curve[-1]["gen_updates"], key, min(WINDOW, len(curve) - 1))


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per configuration: bands over seeds per checkpoint, and end-of-run windows (3 checkpoints) over seeds."""
    out = {}
    for name, by_seed in runs.items():
        any_run = next(iter(by_seed.values()))
        curves = [r["points"] for r in by_seed.values()]
        keys = [k for k in METRICS if k in curves[0][-1]] or ["fd_real"]
        agg = {k: any_run[k] for k in ("K", "ttur", "ema", "mode", "gen_updates")}
        agg["seeds"] = sorted(by_seed)
        for key in [*keys, "wall_s"]:
            agg[f"band_{key}"] = band(curves, "gen_updates", key)
        agg["final"] = {key: mean_interval([_final(c, key) for c in curves]).as_dict() for key in keys}
        agg["final"]["wall_s"] = mean_interval([c[-1]["wall_s"] for c in curves]).as_dict()
        out[name] = agg
    return out


def reach(runs: dict[str, dict[int, dict]], thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, dict[str, Any]]:
    """Per configuration and FD threshold: generator updates to first reach it, interpolated between checkpoints
    (`_seeds.interp_reach`), over the seeds that reach it."""
    out: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        out[name] = {}
        for th in thresholds:
            hits = [interp_reach(r["points"], _fd(r["points"]), th, ("gen_updates", "wall_s")) for r in by_seed.values()]
            out[name][f"{th:g}"] = {"gen_updates": reach_interval(hits, "gen_updates"),
                                    "wall_s": reach_interval(hits, "wall_s")}
    return out


def reach_curves(runs: dict[str, dict[int, dict]]) -> dict[str, list[dict[str, Any]]]:
    """Per configuration, per threshold on CURVE_THRESHOLDS while every seed reaches it: interpolated updates."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, by_seed in runs.items():
        pts = []
        for th in CURVE_THRESHOLDS:
            hits = [interp_reach(r["points"], _fd(r["points"]), th, ("gen_updates",)) for r in by_seed.values()]
            if any(h is None for h in hits):
                break
            pts.append({"threshold": th, **mean_interval([h["gen_updates"] for h in hits]).as_dict()})
        out[name] = pts
    return out


def prices(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per flash configuration: one update in dmd2 updates, measured (interval) and by the paper's measure."""
    out = {}
    for name in runs:
        if name.startswith("flash") and (r := price_ratio(name)) is not None:
            out[name] = {"measured": r.as_dict(), "paper": PAPER_RATIO}
    return out


def match_dmd2(runs: dict[str, dict[int, dict]], price: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per flash configuration: priced updates (measured and paper price) to first reach dmd2's end-of-run FD (the
    mean over dmd2 seeds of its final 3-checkpoint window), interpolated, as a % of dmd2's whole run."""
    base = runs.get("dmd2-k4")
    if not base:
        return []
    curves = [r["points"] for r in base.values()]
    target = sum(_final(c, _fd(c)) for c in curves) / len(curves)
    total = max(c[-1]["gen_updates"] for c in curves)
    out = []
    for name, by_seed in runs.items():
        if not name.startswith("flash") or name not in price:
            continue
        hits = [interp_reach(r["points"], _fd(r["points"]), target, ("gen_updates",)) for r in by_seed.values()]
        row: dict[str, Any] = {"run": name, "target": target, "dmd2_updates": total, "dmd2_seeds": len(curves)}
        for label, r in (("measured", price[name]["measured"]["mean"]), ("paper", price[name]["paper"])):
            row[label] = reach_interval([None if h is None else {"p": 100 * h["gen_updates"] * r / total}
                                         for h in hits], "p")
        out.append(row)
    return out


def teacher_drift(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """FD vs the teacher's 50-step samples at the students' CFG: its lowest window, the final one and the rise."""
    out = {}
    for name, by_seed in runs.items():
        curves = [r["points"] for r in by_seed.values()]
        if "fd_teacher" not in curves[0][-1] or len(curves[0]) <= WINDOW:
            continue
        lows, finals = [], []
        for c in curves:
            wins = [(window_at(c, "gen_updates", p["gen_updates"], "fd_teacher"), p["gen_updates"]) for p in c[1:]]
            wins = [w for w in wins if w[0] is not None]
            lows.append(min(wins))
            finals.append(wins[-1][0])
        out[name] = {"seeds": sorted(by_seed), "min_fd_teacher": mean_interval([w for w, _ in lows]).as_dict(),
                     "min_at_updates": mean_interval([u for _, u in lows]).as_dict(),
                     "final_fd_teacher": mean_interval(finals).as_dict(),
                     "rise": mean_interval([f - w for f, (w, _) in zip(finals, lows, strict=True)]).as_dict()}
    return out


def derive(runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    price = prices(runs)
    return {"runs": runs, "aggregate": aggregate(runs), "time_to_reach_fd": reach(runs), "prices": price,
            "match_dmd2": match_dmd2(runs, price),
            "reach_curves": reach_curves(runs), "teacher_drift": teacher_drift(runs)}


def _iv(d: dict, digits: int = 2) -> str:
    return Interval(**{k: d[k] for k in ("mean", "lo", "hi", "sd", "n")}).fmt(digits)


def _floor(payload: dict) -> dict[str, Any] | None:
    """The real-vs-real floor at the study's N (or the nearest N the train split allows)."""
    floor = payload.get("real_baselines", {}).get("floor")
    if not floor:
        return None
    n = 10 * payload["per_class"]
    key = min(floor, key=lambda k: abs(int(k) - n))
    return {"n": int(key), **floor[key]}


def table(payload: dict) -> str:
    agg, fl = payload["aggregate"], _floor(payload)
    cols = [k for k in METRICS if f"band_{k}" in next(iter(agg.values()))]
    rows = [[name, a["mode"], a["ema"], a["gen_updates"], ",".join(map(str, a["seeds"])),
             *[_iv(a["final"][k], 3 if k in ("precision", "recall", "density", "coverage", "accuracy") else 2)
               for k in cols]] for name, a in agg.items()]
    for name, t in payload.get("teacher_rows", {}).items():
        rows.append([name, "-", "-", "-", "-", *[f"{t[k]:.3f}" if k in t else "-" for k in cols]])
    start = next(iter(next(iter(payload["runs"].values())).values()))["points"][0]
    rows.append(["teacher as the students' 4-step sampler (update 0)", "-", "-", 0, "-",
                 *[f"{start[k]:.3f}" if k in start else "-" for k in cols]])
    if fl:
        rows.append([f"real digits (train split, N = {fl['n']}): the floor", "-", "-", "-", "-",
                     *[f"{fl[k]:.3f}" if k in fl else "-" for k in cols]])
    out = ["# Quality vs cost on the digits teacher", "", f"Command: `{payload['command']}`", "",
           f"N = {10 * payload['per_class']} samples per checkpoint. FD held-out: vs the {360} real digits no "
           "evaluator, GAN or reference ever trained on; FD teacher: vs the teacher's 50-step samples at the "
           "students' CFG (1.0); precision/recall and density/coverage (k = 5) vs the held-out digits. Every cell "
           "is the mean over seeds of the last-3-checkpoint window, [95% t-interval] (n = seeds).", "",
           format_table(["run", "mode", "ema", "gen updates", "seeds", *[f"final {c}" for c in cols]], rows), ""]
    if payload.get("prices"):
        out += ["## Price of one flash update in dmd2 updates", "",
                format_table(["run", "measured (interleaved timing): geometric mean [95%] (n = rounds)",
                              "paper's measure (batch x iterations)"],
                             [[n, _iv(p["measured"], 3), f"{p['paper']:g}"] for n, p in payload["prices"].items()]), ""]
    if payload.get("match_dmd2"):
        out += ["## Flash's cost to first reach dmd2's end-of-run FD, as % of dmd2's whole run (interpolated)", "",
                format_table(["flash run", "dmd2 end-of-run FD (window)", "% at the measured price",
                              "% at the paper's price (batch x iterations)"],
                             [[m["run"], f"{m['target']:.2f} ({m['dmd2_seeds']} seeds, {m['dmd2_updates']} updates)",
                               fmt_reach(m["measured"], 1), fmt_reach(m["paper"], 1)] for m in payload["match_dmd2"]]),
                ""]
    reach_at = payload["time_to_reach_fd"]
    ths = list(next(iter(reach_at.values())))
    out += ["## Generator updates to first reach an FD held-out, interpolated between checkpoints", "",
            "(among the seeds that reach it; k/n beside it)", "",
            format_table(["run", *[f"FD <= {t}" for t in ths]],
                         [[n, *[fmt_reach(v["gen_updates"]) for v in by.values()]] for n, by in reach_at.items()]), ""]
    if payload.get("teacher_drift"):
        out += ["## The teacher drift: FD vs the teacher's 50-step samples at the students' CFG (3-checkpoint "
                "windows)", "",
                format_table(["run", "lowest window", "at gen update", "final window", "rise after the lowest"],
                             [[n, _iv(d["min_fd_teacher"]), _iv(d["min_at_updates"], 0), _iv(d["final_fd_teacher"]),
                               _iv(d["rise"])] for n, d in payload["teacher_drift"].items()]), ""]
    return "\n".join(out)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, fl = payload["aggregate"], _floor(payload)
    panels = [k for k in ("fd_heldout", "fd_teacher", "recall", "coverage") if f"band_{k}" in next(iter(agg.values()))]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5))
    for name, a in agg.items():
        style = "-" if name.startswith("flash") else "--"
        for ax, key in zip(axes, panels, strict=False):
            plot_band(ax, a[f"band_{key}"], "gen_updates", name, style)
        price = payload.get("prices", {}).get(name, {}).get("measured", {}).get("mean", 1.0)
        plot_band(axes[-1], [{**p, "x": p["gen_updates"] * price} for p in a[f"band_{panels[0]}"]], "x", name, style)
    for ax, key in zip(axes, [*panels, panels[0]], strict=True):
        if fl and key in fl:
            ax.axhline(fl[key], color="k", lw=1, ls=":", label=f"real vs real, N = {fl['n']}")
        ax.set_ylabel(key)
        ax.set_xlabel("generator updates")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("dmd2-equivalent updates (measured price)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Flash-DMD vs dmd2 on the digits teacher: mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(payload: dict[str, Any], out: Path) -> str:
    write_json(out.with_name(out.name + ".json"), payload)
    plot(payload, out.with_name(out.name + ".png"))
    md = table(payload)
    out.with_name(out.name + ".md").write_text(md)
    return md
