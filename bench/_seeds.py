"""Several training seeds per benchmark configuration: per-run caching, curves with bands, reach times.

A digits study is many (configuration, seed) runs of minutes each, more than one sitting of a shared CPU allows.
Each run's scored result is written to its own JSON under bench/results/runs/<bench>/ as soon as it is done and
read back instead of re-run, so a study can be stopped and continued, and the cached runs are committed with the
tables they produced. Aggregates use `_stats.mean_interval` (a 95% t-interval over seeds).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import write_json
from _stats import Interval, mean_interval


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]."""
    text = text.strip()
    if "-" in text and "," not in text:
        lo, hi = (int(x) for x in text.split("-", 1))
        return list(range(lo, hi + 1))
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct integers like 0,1,2 or 0-2, got {text!r}")
    return seeds


def run_cache(runs_dir: Path, name: str, seed: int, per_class: int) -> Path:
    """Where one (configuration, seed) run's scored result lives; N is in the name so a new N re-scores."""
    return runs_dir / f"{name}-s{seed}-n{10 * per_class}.json"


def cached_run(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The result at `path` if a run already wrote it, else make() and write it there."""
    if path.is_file():
        print(f"cached: {path}", flush=True)
        return json.loads(path.read_text())
    result = make()
    write_json(path, result)
    return result


def band(curves: Sequence[Sequence[dict[str, Any]]], x: str, key: str) -> list[dict[str, Any]]:
    """Per checkpoint index over seeds: the mean x and the interval of `key`. Curves of one configuration share
    their checkpoint steps, so index i is the same step in every seed (a shorter curve ends the band there)."""
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        iv = mean_interval([c[i][key] for c in curves])
        out.append({x: sum(c[i][x] for c in curves) / len(curves), **iv.as_dict()})
    return out


def plot_band(ax: Any, points: Sequence[dict[str, Any]], x: str, label: str, style: str = "-") -> None:
    """The mean as a line and the 95% interval as a shaded band (no band where n = 1)."""
    xs = [p[x] for p in points]
    (line,) = ax.plot(xs, [p["mean"] for p in points], style, marker="o", ms=3, label=label)
    if all(p["n"] > 1 for p in points):
        ax.fill_between(xs, [p["lo"] for p in points], [p["hi"] for p in points], color=line.get_color(), alpha=0.2)


def first_reach(points: Sequence[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The first point (after the start, index 0) whose `key` is at or below target."""
    return next((p for p in points[1:] if p[key] <= target), None)


def reach_interval(hits: Sequence[dict[str, Any] | None], field: str) -> dict[str, Any]:
    """Over seeds: how many reached, and the interval of `field` among those that did (a conditional figure:
    the table shows k/n beside it, so a fast minority is not read as the whole)."""
    got = [h[field] for h in hits if h is not None]
    return {"reached": len(got), "of": len(hits), **(mean_interval(got).as_dict() if got else {})}


def fmt_reach(r: dict[str, Any], digits: int = 0) -> str:
    """'212 [150, 274] (n=3), 3/3 seeds' or '- (0/3 seeds)'."""
    if not r["reached"]:
        return f"- (0/{r['of']} seeds)"
    iv = Interval(r["mean"], r["lo"], r["hi"], r["sd"], r["n"])
    return f"{iv.fmt(digits)}, {r['reached']}/{r['of']} seeds"


def interp_reach(points: Sequence[dict[str, Any]], key: str, target: float, fields: Sequence[str]) -> dict[str, Any] | None:
    """Where `key` first falls to `target`, with `fields` (gen_updates, wall_s) linearly interpolated between the
    last checkpoint above it and the first at or below it (a first checkpoint already below: its own values).
    Rounding up to the next checkpoint would overstate the cost by up to one checkpoint spacing."""
    for i in range(1, len(points)):
        cur = points[i]
        if cur[key] <= target:
            prev = points[i - 1]
            if i == 1 or prev[key] <= target:
                return {f: cur[f] for f in fields}
            w = (prev[key] - target) / (prev[key] - cur[key])
            return {f: prev[f] + w * (cur[f] - prev[f]) for f in fields}
    return None


WINDOW = 3  # trained checkpoints averaged by every windowed figure (the one rule all claims use)


def window_at(points: Sequence[dict[str, Any]], field: str, limit: float, key: str, size: int = WINDOW) -> float | None:
    """The mean of `key` over the `size` trained checkpoints ending at the last one whose `field` is at most
    `limit` (the update-0 start is never in a window); None when fewer than `size` trained checkpoints qualify.
    Neighbouring checkpoints of one digits run swing by several FD, so no figure rests on one checkpoint."""
    done = [p for p in points[1:] if p[field] <= limit + 1e-9]
    if len(done) < size:
        return None
    return sum(p[key] for p in done[-size:]) / size
