"""bench/_seeds.py and the seed aggregation of bench/quality_vs_cost.py, on hand-made runs (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality_vs_cost as Q  # noqa: E402
from _seeds import band, cached_run, fmt_reach, parse_seeds, reach_interval, run_cache  # noqa: E402


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


def _run(name: str, seed: int, k: int, fds: list[float], per_update_s: float, ttur: int = 1) -> dict:
    upd = [0, 100, 200, 300]
    return {"name": name, "seed": seed, "K": k, "ttur": ttur, "ema": 0.0, "mode": name.split("-")[0],
            "gen_updates": upd[-1], "points": [
                {"step": u * ttur, "gen_updates": u, "wall_s": u * per_update_s, "fd_real": f, "fd_teacher": f + 1,
                 "accuracy": 0.99, "diversity": 13.0} for u, f in zip(upd, fds, strict=True)]}


def test_quality_vs_cost_compares_each_flash_seed_with_converged_dmd2() -> None:
    runs = {
        "flash-ttur1-k4": {0: _run("flash-ttur1-k4", 0, 4, [18, 9, 7, 8], 0.5),
                           1: _run("flash-ttur1-k4", 1, 4, [18, 12, 9, 7.2], 0.5),
                           2: _run("flash-ttur1-k4", 2, 4, [18, 11, 10, 9.5], 0.5)},
        "dmd2-k4": {0: _run("dmd2-k4", 0, 4, [18, 12, 9, 7.0], 2.0, ttur=5),
                    1: _run("dmd2-k4", 1, 4, [18, 11, 9, 7.6], 2.0, ttur=5)},
    }
    agg = Q.aggregate(runs)
    assert agg["dmd2-k4"]["final"]["fd_real"]["mean"] == pytest.approx(7.3)
    assert agg["flash-ttur1-k4"]["best_fd_real"]["mean"] == pytest.approx((7 + 7.2 + 9.5) / 3)
    (row,) = Q.compare(runs, agg)
    # Target 7.3: seed 0 reaches it at 200 updates (100 s), seed 1 at 300 (150 s), seed 2 never.
    assert (row["wall_s"]["reached"], row["wall_s"]["of"]) == (2, 3)
    assert row["gen_updates"]["mean"] == 250.0
    # dmd2's whole run: 300 updates, 600 s; so 100 s and 150 s are 16.7% and 25%.
    assert row["pct_wall"]["mean"] == pytest.approx((100 / 6 + 25) / 2)
    reach = Q.time_to_reach(runs)
    assert reach["flash-ttur1-k4"]["10"]["wall_s"]["reached"] == 3  # seed 2: 11, then 10 at 200 updates
    assert reach["flash-ttur1-k4"]["8"]["gen_updates"]["reached"] == 2
    md = Q.table(agg, [row], reach, "cmd", per_class=150)
    assert "N = 1500" in md and "2/3 seeds" in md
    # Priced at clean per-update costs (a flash update = half a dmd2 update): 200 and 300 updates are 100 and 150
    # dmd2 updates, 33.3% and 50% of dmd2's 300.
    (priced,) = Q.compare(runs, agg, {"flash-ttur1-k4": 1.0, "dmd2-k4": 2.0})
    assert priced["update_cost_ratio"] == 0.5
    assert priced["pct_clean"]["mean"] == pytest.approx((100 / 3 + 50) / 2) and priced["pct_clean"]["reached"] == 2
    assert "pct_clean" not in row


def test_teacher_drift_measures_the_rise_after_each_seeds_lowest_fd_teacher() -> None:
    def drift_run(name: str, seed: int, fd_teacher: list[float]) -> dict:
        r = _run(name, seed, 4, [18, 9, 8, 8], 0.5)
        for p, f in zip(r["points"], fd_teacher, strict=True):
            p["fd_teacher"] = f
        return r

    runs = {"flash-ttur1-k4-noema": {0: drift_run("flash-ttur1-k4-noema", 0, [9, 4, 6, 8]),
                                     1: drift_run("flash-ttur1-k4-noema", 1, [9, 5, 3, 7])},
            "drift-nogan": {0: drift_run("drift-nogan", 0, [9, 6, 5, 5])},
            "flash-ttur1-k4": {0: drift_run("flash-ttur1-k4", 0, [1, 1, 1, 1])}}  # not a drift run: left out
    d = Q.teacher_drift(runs)
    assert list(d) == ["flash-ttur1-k4-noema", "drift-nogan"]
    base = d["flash-ttur1-k4-noema"]
    # Seed 0: lowest 4 at 100 updates, ends at 8 (rise 4); seed 1: lowest 3 at 200, ends at 7 (rise 4). The
    # update-0 point (the teacher as a 4-step sampler) is not a trained checkpoint and is skipped.
    assert base["min_fd_teacher"]["mean"] == 3.5 and base["min_at_updates"]["mean"] == 150
    assert base["rise"]["mean"] == 4.0 and base["rise"]["sd"] == 0.0
    assert d["drift-nogan"]["rise"]["mean"] == 0.0 and d["drift-nogan"]["final_fd_teacher"]["mean"] == 5.0
    md = Q.table(Q.aggregate(runs), [], Q.time_to_reach(runs), "cmd", per_class=150, drift=d)
    assert "The teacher drift" in md and "no GAN" in md


def test_reach_curves_stop_where_a_seed_never_gets() -> None:
    runs = {"flash-ttur1-k4": {0: _run("flash-ttur1-k4", 0, 4, [18, 9, 7, 8], 0.5),
                               1: _run("flash-ttur1-k4", 1, 4, [18, 12, 9, 7.2], 0.5)}}
    curves = Q.reach_curves(runs)["flash-ttur1-k4"]
    ths = [p["threshold"] for p in curves["gen_updates"]]
    # Both seeds reach every threshold down to 7.5 (seed 0 at 7.0, seed 1 at 7.2); at 7.0 seed 1 never does.
    assert ths[0] == 16.0 and ths[-1] == 7.5 and 7.0 not in ths
    at = {p["threshold"]: p for p in curves["gen_updates"]}
    assert at[12.0]["mean"] == 100.0 and at[12.0]["n"] == 2  # 9 and 12 are both <= 12 at update 100
    assert at[8.5]["mean"] == 250.0  # seed 0 at 200 (7), seed 1 at 300 (7.2)
    assert curves["wall_s"][-1]["mean"] == 0.5 * 250.0
