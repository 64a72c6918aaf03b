"""bench/claims.py: the paired-seed rules that decide the digits claims, on hand-made study results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import claims as C  # noqa: E402


def curve(fds: list[float], per_point_s: float) -> dict:
    return {"points": [{"gen_updates": 100 * i, "wall_s": per_point_s * i, "fd_real": f, "fd_teacher": f}
                       for i, f in enumerate(fds)]}


def test_paired_difference_and_sign() -> None:
    iv = C.paired({0: 5.0, 1: 6.0, 2: 7.0, 9: 1.0}, {0: 4.0, 1: 4.5, 2: 5.0})  # seed 9 has no partner
    # differences 1, 1.5, 2: sd 0.5, half-width t(0.975, 2) 0.5 / sqrt(3) = 1.242 -> [0.258, 2.742]
    assert (iv.mean, iv.n) == (1.5, 3) and iv.lo == pytest.approx(0.2579, abs=1e-3) and C.sign(iv) == "above"
    assert C.sign(C.paired({0: 5.0, 1: 6.0, 2: 7.0}, {0: 4.0, 1: 4.0, 2: 4.0})) == "includes 0"  # 1, 2, 3
    assert C.paired({0: 1.0}, {0: 2.0}) is None and C.sign(None) == "n < 2"
    assert C.sign(C.paired({0: 1.0, 1: -1.0}, {0: 0.0, 1: 0.0})) == "includes 0"


def test_equal_compute_reads_dmd2_at_flash_wall_time() -> None:
    # flash ends at 300 s; dmd2's checkpoints are every 100 s: at 300 s dmd2 had FD 12 (seed 0) and 11 (seed 1).
    runs = {"flash": {0: curve([20, 10, 8, 7], 100.0), 1: curve([20, 11, 9, 8], 100.0)},
            "dmd2": {0: curve([20, 15, 13, 12, 6], 100.0), 1: curve([20, 14, 12, 11, 6.5], 100.0)}}
    iv = C.equal_compute(runs, "flash", "dmd2")
    assert iv.mean == pytest.approx(((7 - 12) + (8 - 11)) / 2)
    assert C.at(runs["dmd2"][0]["points"], "wall_s", 50.0, "fd_real") == 20  # before its first checkpoint: the start


def test_decide_gives_each_claim_its_verdict() -> None:
    q = {"runs": {
        "flash-ttur1-k4-noema": {s: curve([20, 9 + s, 9 + s, 9 + s, 8 + s, 8 + s, 8 + s], 100.0) for s in range(3)},
        # Worse mid-run (+3 over the 3 middle checkpoints), a little worse at the end (+0.1 over the last 3).
        "flash-ttur1-k4": {s: curve([20, 12 + s, 12 + s, 12 + s, 8.1 + s, 8.1 + s, 8.1 + s], 100.0) for s in range(3)},
        "dmd2-k4": {s: curve([20, 16 + s, 15 + s, 15 + s, 14 + s, 14 + s, 14 + s, 10, 7], 100.0) for s in range(3)}}}
    start = {"reward": 8.0, "fd_real": 7.0}

    def rl_run(rewards: list[float], fds: list[float]) -> dict:
        return {"points": [{"reward": r, "fd_real": f} for r, f in zip(rewards, fds, strict=True)]}

    rl = {"start": start, "runs": {
        "distill-only": {s: rl_run([8.0, 8.0, 8.0 + 0.01 * s], [7, 7, 7 + 0.1 * s]) for s in range(3)},
        "joint-5to1": {s: rl_run([8.5, 8.6, 8.7 + 0.01 * s], [7, 7.1, 7.2 - 0.2 * s]) for s in range(3)},
        "post-train": {s: rl_run([9, 9.5, 10 + 0.1 * s], [10, 12, 14 + s]) for s in range(3)},
        "all-timesteps": {s: rl_run([8.1, 8.1, 8.1 + 0.02 * s], [7, 7, 7]) for s in range(3)}}}
    rows = C.decide(q, rl)
    by = {(r["claim"], r["comparison"]): r["verdict"] for r in rows}
    a = next(v for (c, what), v in by.items() if c == "a" and what.startswith("flash-ttur1-k4-noema"))
    assert a == "reproduced"  # 8, 9, 10 vs dmd2's 14, 15, 16 at 600 s
    b = {what: v for (c, what), v in by.items() if c == "b"}
    assert b["flash-ttur1-k4 - no EMA, FD real mid-run (3 checkpoints)"] == "hurts"  # +3 on every seed
    assert b["flash-ttur1-k4 - no EMA, FD real at the end (3 checkpoints)"] == "hurts"  # +0.1, no spread
    assert by[("c", "joint-5to1 - no-RL control: reward change")] == "raises"
    assert by[("c", "post-train - no-RL control: reward and FD real change")] == "hacks (reward up, FD up)"
    assert by[("d", "joint-5to1 (999, 749) - all-timesteps (999, 749, 499): reward change")] == "reproduced"
    md = C.table(rows)
    assert "reproduced" in md and "[" in md


def test_window_averages_three_trained_checkpoints() -> None:
    pts = curve([99, 1, 2, 3, 4, 5, 6], 1.0)["points"]  # 99: the update-0 start, never in a window
    assert C.window(pts, "mid", "fd_real") == 4.0  # trained 1..6: middle index 3, so indices 2-4: 3, 4, 5
    assert C.window(pts, "final", "fd_real") == 5.0


def test_equal_compute_at_priced_updates() -> None:
    # A flash update costs 0.5 dmd2 updates: flash's final 300 updates = 150 dmd2 updates, so dmd2 is read at
    # its checkpoint of 100 updates (FD 15 and 14), not at 300.
    runs = {"flash": {0: curve([20, 10, 8, 7], 1.0), 1: curve([20, 11, 9, 8], 1.0)},
            "dmd2": {0: curve([20, 15, 13, 12, 6], 100.0), 1: curve([20, 14, 12, 11, 6.5], 100.0)}}
    iv = C.equal_compute(runs, "flash", "dmd2", ratio=0.5)
    assert iv.mean == pytest.approx(((7 - 15) + (8 - 14)) / 2)
    rows = C.decide({"runs": {"flash-ttur1-k4-noema": runs["flash"], "dmd2-k4": runs["dmd2"]}}, None,
                    {"flash-ttur1-k4-noema": 1.0, "dmd2-k4": 2.0})
    assert [r["claim"] for r in rows] == ["a", "a"] and "1 flash update = 0.50 dmd2 updates" in rows[0]["comparison"]


def test_drift_rows_compare_the_last_three_checkpoints_with_the_demo_recipe() -> None:
    base = {s: curve([20, 9, 9, 9, 8 + s, 8 + s, 8 + s], 100.0) for s in range(2)}
    nogan = {s: curve([20, 9, 9, 9, 6 + s, 6 + s, 6.5 + s], 100.0) for s in range(2)}  # last 3: 2 - 0.5/3 lower
    rows = C.decide({"runs": {"flash-ttur1-k4-noema": base, "drift-nogan": nogan}}, None)
    drift = {r["comparison"]: r for r in rows if r["claim"] == "drift"}
    row = drift["drift-nogan - demo recipe (no EMA): fd_real, last 3 checkpoints"]
    assert row["interval"]["mean"] == pytest.approx(-2 + 0.5 / 3) and row["verdict"] == "better FD"
