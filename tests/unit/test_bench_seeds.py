"""bench/_seeds.py and quality_vs_cost's report (bench/_qvc_report.py), on hand-made runs (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _qvc_report as R  # noqa: E402
from _seeds import (  # noqa: E402
    band,
    cached_run,
    fmt_reach,
    interp_reach,
    parse_seeds,
    reach_interval,
    run_cache,
    window_at,
)


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == parse_seeds("0-2") == [0, 1, 2]
    assert parse_seeds(" 5 ") == [5]
    for bad in ("", "1,1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_cached_run_runs_once_and_names_n(tmp_path) -> None:
    calls = []
    path = run_cache(tmp_path / "runs", "flash", 3, per_class=150)
    assert path.name == "flash-s3-n1500.json"
    make = lambda: calls.append(1) or {"fd": 7.5}  # noqa: E731
    assert cached_run(path, make) == {"fd": 7.5}
    assert cached_run(path, make) == {"fd": 7.5} and calls == [1]
    assert json.loads(path.read_text()) == {"fd": 7.5}


def test_band_is_per_checkpoint_over_seeds() -> None:
    a = [{"x": 0, "fd": 6.0}, {"x": 10, "fd": 4.0}]
    b = [{"x": 0, "fd": 8.0}, {"x": 12, "fd": 4.0}, {"x": 24, "fd": 1.0}]  # longer: the band stops at 2 points
    c = [{"x": 0, "fd": 10.0}, {"x": 14, "fd": 4.0}]
    pts = band([a, b, c], "x", "fd")
    assert len(pts) == 2
    assert pts[0]["x"] == 0 and pts[0]["mean"] == 8.0 and pts[0]["sd"] == 2.0  # the 6, 8, 10 of test_bench_stats
    assert pts[0]["hi"] == pytest.approx(8 + 4.96836, abs=1e-4)
    assert pts[1]["x"] == 12 and pts[1]["lo"] == pts[1]["hi"] == 4.0  # no spread, no width


def test_reach_interval_counts_the_seeds_that_never_reach() -> None:
    r = reach_interval([{"s": 100.0}, None, {"s": 140.0}], "s")
    assert (r["reached"], r["of"], r["n"], r["mean"]) == (2, 3, 2, 120.0)
    assert fmt_reach(r) == "120 [-134, 374] (n=2), 2/3 seeds"
    assert fmt_reach(reach_interval([None, None], "s")) == "- (0/2 seeds)"


def _run(name: str, seed: int, fds: list[float], per_update_s: float, ttur: int = 1, key: str = "fd_heldout") -> dict:
    upd = [100 * i for i in range(len(fds))]
    return {"name": name, "seed": seed, "K": 4, "ttur": ttur, "ema": 0.0, "mode": name.split("-")[0],
            "gen_updates": upd[-1], "points": [
                {"step": u * ttur, "gen_updates": u, "wall_s": u * per_update_s, key: f, "fd_teacher": f + 1,
                 "recall": 0.5, "accuracy": 0.99, "diversity": 13.0} for u, f in zip(upd, fds, strict=True)]}


def test_interp_reach_interpolates_between_the_checkpoints_around_the_crossing() -> None:
    pts = [{"u": 0, "fd": 20.0}, {"u": 100, "fd": 12.0}, {"u": 200, "fd": 8.0}, {"u": 300, "fd": 9.0}]
    # 10 lies half way between 12 (u 100) and 8 (u 200): 150, not the 200 the next checkpoint would give.
    assert interp_reach(pts, "fd", 10.0, ("u",)) == {"u": 150.0}
    assert interp_reach(pts, "fd", 15.0, ("u",)) == {"u": 100}  # the first trained checkpoint: its own value
    assert interp_reach(pts, "fd", 7.0, ("u",)) is None
    # Crossing after a rebound: 9 -> reached first at 200 (from 12), interpolated 3/4 of the way.
    assert interp_reach(pts, "fd", 9.0, ("u",))["u"] == pytest.approx(175.0)


def test_window_at_needs_three_trained_checkpoints() -> None:
    pts = [{"u": 25 * i, "fd": f} for i, f in enumerate([99, 1, 2, 3, 4, 5])]  # 99: the start, never in a window
    assert window_at(pts, "u", 75, "fd") == 2.0  # 25, 50, 75 -> 1, 2, 3
    assert window_at(pts, "u", 110, "fd") == 3.0  # last <= 110 is 100: 2, 3, 4
    assert window_at(pts, "u", 60, "fd") is None  # only 25 and 50 qualify


def test_report_aggregates_windows_and_reach_with_interpolation() -> None:
    runs = {"flash-ttur1-k4-noema": {0: _run("flash-ttur1-k4-noema", 0, [18, 12, 8, 7, 6], 0.5),
                                     1: _run("flash-ttur1-k4-noema", 1, [18, 14, 10, 9, 8], 0.5)},
            "dmd2-k4": {0: _run("dmd2-k4", 0, [18, 16, 15, 14], 2.0, ttur=5)}}
    agg = R.aggregate(runs)
    # Final window: the last 3 trained checkpoints: seed 0 (8+7+6)/3 = 7, seed 1 9.
    assert agg["flash-ttur1-k4-noema"]["final"]["fd_heldout"]["mean"] == pytest.approx(8.0)
    assert agg["flash-ttur1-k4-noema"]["final"]["recall"]["mean"] == 0.5
    reach = R.reach(runs, thresholds=(10.0,))
    # seed 0: 12 -> 8 between 100 and 200: 10 at 150; seed 1: 10 at 200 exactly.
    assert reach["flash-ttur1-k4-noema"]["10"]["gen_updates"]["mean"] == pytest.approx(175.0)
    assert reach["dmd2-k4"]["10"]["gen_updates"]["reached"] == 0
    drift = R.teacher_drift(runs)
    assert drift["flash-ttur1-k4-noema"]["rise"]["mean"] == 0.0  # FD teacher falls monotonically here
    payload = {"command": "cmd", "per_class": 50, **R.derive(runs),
               "real_baselines": {"floor": {"500": {"fd_heldout": 5.5, "recall": 0.95}, "1437": {"fd_heldout": 4.0}}}}
    md = R.table(payload)
    assert "N = 500" in md and "the floor" in md and "5.500" in md and "Generator updates to first reach" in md


def test_report_falls_back_to_fd_vs_all_digits_for_older_runs() -> None:
    runs = {"flash-ttur1-k4": {0: _run("flash-ttur1-k4", 0, [18, 12, 8, 7], 0.5, key="fd_real")}}
    assert R.reach(runs, thresholds=(10.0,))["flash-ttur1-k4"]["10"]["gen_updates"]["mean"] == pytest.approx(150.0)


def test_every_study_run_is_a_valid_spec_on_the_train_split() -> None:
    """The study's specs derive from the demo's: a demo change must not make a row invalid (dmd2 has no EMA)."""
    import quality_vs_cost as Q

    from trainer.jobspec import parse_spec

    for name in Q.RUNS:
        spec, ttur, updates = Q.run_spec(name, 1.0, 0)
        cfg = parse_spec(spec)
        assert cfg.data.builtin == "digits-train" and updates == Q.RUNS[name][1]
        assert spec["train"]["checkpoint_every"] == Q.RUNS[name][2] * ttur
    assert Q.run_spec("dmd2-k4", 1.0, 0)[0]["distill"]["ema"] == 0.0


def test_match_dmd2_prices_the_interpolated_crossing() -> None:
    runs = {"dmd2-k4": {0: _run("dmd2-k4", 0, [20, 18, 16, 14, 12], 2.0, ttur=5)},
            "flash-ttur1-k4": {0: _run("flash-ttur1-k4", 0, [20, 16, 12, 11], 0.5),
                               1: _run("flash-ttur1-k4", 1, [20, 15, 13, 13], 0.5)}}
    price = {"flash-ttur1-k4": {"measured": {"mean": 0.5}, "paper": 0.2}}
    (row,) = R.match_dmd2(runs, price)
    # dmd2's final window: (16 + 14 + 12) / 3 = 14 over 400 updates. Seed 0 crosses 14 half way between 100 (16)
    # and 200 (12): 150 updates; seed 1 between 100 (15) and 200 (13): 150. Priced 75 dmd2 updates = 18.75%.
    assert row["target"] == pytest.approx(14.0) and row["dmd2_updates"] == 400
    assert row["measured"]["mean"] == pytest.approx(18.75) and row["paper"]["mean"] == pytest.approx(7.5)
    assert R.match_dmd2({"flash-ttur1-k4": runs["flash-ttur1-k4"]}, price) == []
