"""bench/claims.py: the paired-seed rules that decide the digits claims, on hand-made study results with spread."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import claims as C  # noqa: E402
from _stats import holm  # noqa: E402


def curve(fds: list[float], every: int = 25, key: str = "fd_heldout") -> dict:
    return {"points": [{"gen_updates": every * i, "wall_s": 1.0 * i, key: f, "fd_teacher": f + 1}
                       for i, f in enumerate(fds)]}


def timing_file(tmp_path: Path, flash_s: list[float], dmd2_s: list[float]) -> Path:
    """A train_step_digits.json with equal-updates rounds: 2 flash iterations and 10 dmd2 iterations per round."""
    def cfg(ttur: int, per_iter: list[float], size: int) -> dict:
        its = sorted(per_iter)
        return {"spec": {"ttur": ttur}, "round_iterations": size, "iteration_s": per_iter,
                "timing": {"s_per_gen_update_median": its[len(its) // 2] * ttur}}

    data = {"results": {"digits": {"configs": {"flash-ttur1": cfg(1, flash_s, 2), "flash-ttur1-ema0.98": cfg(1, flash_s, 2),
                                               "dmd2-ttur5": cfg(5, dmd2_s, 10)}}}}
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(data))
    return path


def test_paired_difference_and_sign() -> None:
    iv = C.paired({0: 5.0, 1: 6.0, 2: 7.0, 9: 1.0, 3: None}, {0: 4.0, 1: 4.5, 2: 5.0, 3: 1.0})  # 9, 3: no pair
    # differences 1, 1.5, 2: sd 0.5, half-width t(0.975, 2) 0.5 / sqrt(3) = 1.242 -> [0.258, 2.742]
    assert (iv.mean, iv.n) == (1.5, 3) and iv.lo == pytest.approx(0.2579, abs=1e-3) and C.sign(iv) == "above"
    assert C.sign(C.paired({0: 5.0, 1: 6.0, 2: 7.0}, {0: 4.0, 1: 4.0, 2: 4.0})) == "includes 0"  # 1, 2, 3
    assert C.paired({0: 1.0}, {0: 2.0}) is None and C.sign(None) == "n < 2"


def test_price_ratio_pairs_interleaved_rounds_and_update_costs_reads_the_medians(tmp_path: Path) -> None:
    # Round r: flash 2 iterations of (0.4 + 0.1 r) s -> that s/update; dmd2 10 iterations of (0.2 + 0.05 r) s
    # -> 5 x that s/update. Ratio per round: (0.4 + 0.1 r) / (1 + 0.25 r) = 0.4 in every round: no spread, so the
    # load growing over the rounds cancels exactly.
    flash = [x for r in range(4) for x in [0.4 + 0.1 * r] * 2]
    dmd2 = [x for r in range(4) for x in [0.2 + 0.05 * r] * 10]
    path = timing_file(tmp_path, flash, dmd2)
    r = C.price_ratio("flash-ttur1-k4-noema", path)
    assert r.mean == pytest.approx(0.4) and r.n == 4 and r.hi == pytest.approx(0.4)
    # A noisy round: the interval widens around the geometric mean and stays asymmetric.
    flash[0] = flash[1] = 0.6
    r = C.price_ratio("flash-ttur1-k4-noema", timing_file(tmp_path, flash, dmd2))
    assert r.n == 4 and r.lo < 0.4 < r.hi and r.mean == pytest.approx(math.exp((math.log(0.6) + 3 * math.log(0.4)) / 4))
    costs = C.update_costs(path)
    assert costs["dmd2-k4"] == pytest.approx(5 * 0.3) and costs["flash-ttur1-k4-noema"] == pytest.approx(0.6)
    md = C.cost_table(path)
    assert "dmd2-ttur5" in md and "0.2" in md and "(n=4)" in md
    assert C.price_ratio("flash-ttur1-k4", tmp_path / "missing.json") is None and C.update_costs(tmp_path / "x") == {}


def test_at_budget_reads_each_run_at_its_priced_point_with_a_window() -> None:
    # Price 0.5: budget 50 dmd2 updates = flash at 100 updates (checkpoints every 25: window 50, 75, 100).
    flash = {0: curve([20, 15, 12, 10, 9, 8]), 1: curve([20, 16, 13, 11, 10, 9])}
    dmd2 = {0: curve([20, 18, 17, 16, 14]), 1: curve([20, 19, 18, 16, 15])}
    runs = {"flash": flash, "dmd2": dmd2}
    iv = C.at_budget(runs, "flash", "dmd2", 50, 0.5)
    # seed 0: mean(12, 10, 9) - dmd2 window ending at 50 (only 2 trained checkpoints) -> undefined
    assert iv is None
    iv = C.at_budget(runs, "flash", "dmd2", 75, 0.6)  # flash at 125: window 75, 100, 125; dmd2 25, 50, 75
    exp0 = (10 + 9 + 8) / 3 - (18 + 17 + 16) / 3
    exp1 = (11 + 10 + 9) / 3 - (19 + 18 + 16) / 3
    assert iv.mean == pytest.approx((exp0 + exp1) / 2) and iv.n == 2
    assert C.at_budget(runs, "flash", "dmd2", 200, 0.6) is None  # past both runs' ends


def _study(noise: float) -> dict:
    """Three seeds with spread: flash (no EMA) 6 FD below dmd2 at every budget, EMA 0.98 5 FD above no EMA."""
    q: dict = {"runs": {"flash-ttur1-k4-noema": {}, "flash-ttur1-k4": {}, "dmd2-k4": {}}}
    for s in range(3):
        e = noise * (s - 1)
        q["runs"]["flash-ttur1-k4-noema"][s] = curve([20] + [10 - 0.2 * i + e for i in range(16)], 25)
        q["runs"]["flash-ttur1-k4"][s] = curve([20] + [15 - 0.2 * i + e + (0.2, 0, -0.25)[s] for i in range(16)], 25)
        q["runs"]["dmd2-k4"][s] = curve([20] + [16 - 0.2 * i + 0.5 * e for i in range(9)], 25)
    return q


def test_decide_holm_verdicts_with_spread(tmp_path: Path) -> None:
    path = timing_file(tmp_path, [0.4] * 2 + [0.42] * 2 + [0.38] * 2, [0.2] * 30)
    rows = C.decide(_study(0.3), None, path)
    a = [r for r in rows if r["claim"] == "a"]
    noema = [r for r in a if r["comparison"].startswith("flash-ttur1-k4-noema")]
    assert noema and all(r["interval"]["sd"] > 0 for r in noema)
    assert all(r["verdict"] == "reproduced" for r in noema)  # -6 FD at every budget, small spread
    ema = [r for r in a if r["comparison"].startswith("flash-ttur1-k4 ")]
    assert ema and {r["verdict"] for r in ema} == {"reproduced"}  # about -1 FD, spread ~0.1
    assert all(r["p_holm"] >= r["p"] for r in rows)
    assert any("paper price" in r["comparison"] for r in a) and any("measured price" in r["comparison"] for r in a)
    assert all("raw reading at the ratio's bounds" in r["note"] for r in a if "measured" in r["comparison"])
    b = {r["comparison"]: r for r in rows if r["claim"] == "b"}
    assert b["lambda_ema 0.98 - 0, FD vs held-out real, at the end"]["verdict"] == "hurts"  # +5 on every seed
    md = C.table(rows)
    assert "p Holm" in md and "verdict (Holm)" in md


def test_dmd2_ahead_is_not_reproduced_and_large_spread_is_inconclusive(tmp_path: Path) -> None:
    path = timing_file(tmp_path, [0.4] * 6, [0.2] * 30)
    q = _study(0.3)
    q["runs"]["dmd2-k4"] = {s: curve([20] + [4 + 0.1 * s - 0.01 * i for i in range(9)], 25) for s in range(3)}
    a = [r for r in C.decide(q, None, path) if r["claim"] == "a" and "noema" in r["comparison"]]
    assert {r["verdict"] for r in a} == {"not reproduced"}
    wide = _study(8.0)
    a = [r for r in C.decide(wide, None, path) if r["claim"] == "a" and "noema" in r["comparison"]]
    assert {r["verdict"] for r in a} == {"inconclusive"} and all(r["raw"] in ("includes 0", "below") for r in a)


def rl_run(rewards: list[float], fds: list[float], wall: float = 10.0) -> dict:
    return {"points": [{"step": 25 * (i + 1), "wall_s": wall * (i + 1), "reward": r, "fd_real": f}
                       for i, (r, f) in enumerate(zip(rewards, fds, strict=True))]}


def _rl() -> dict:
    start = {"reward": 8.0, "fd_real": 7.0}
    return {"start": start, "runs": {
        "distill-only": {s: rl_run([8.0, 8.0, 8.0 + 0.01 * s, 8.0], [7, 7, 7 + 0.1 * s, 7]) for s in range(3)},
        # Reward up (+0.7, spread 0.01) and FD up (+0.2 with spread 0.1): the hacking rule says hacks.
        "joint-5to1": {s: rl_run([8.5, 8.6, 8.7 + 0.01 * s, 8.7], [7, 7.1, 7.2 + 0.05 * s, 7.2]) for s in range(3)},
        "post-train": {s: rl_run([8.4, 8.8, 9.5 + 0.1 * s, 10], [8, 9, 12 + s, 14]) for s in range(3)},
        # Reward up, FD unchanged: holds.
        "all-timesteps": {s: rl_run([8.1, 8.3, 8.4 + 0.01 * s, 8.5], [7, 7, 7 + 0.02 * (s - 1), 7], 20.0)
                          for s in range(3)}}}


def test_rl_rows_apply_the_hacking_rule_to_every_run() -> None:
    rows = C.decide(None, _rl())
    by = {r["comparison"]: r for r in rows}
    assert by["joint-5to1 - no-RL control: reward change"]["verdict"] == "hacks (reward up, FD up)"
    assert by["post-train - no-RL control: reward change"]["verdict"] == "hacks (reward up, FD up)"
    assert by["all-timesteps - no-RL control: reward change"]["verdict"] == "holds (reward up, FD not detectably up)"
    # Matched reward: post-train reaches joint's final reward (+0.7 over the last window of joint ...) early.
    mr = by["post-train stopped at joint-5to1's reward (interpolated) - joint-5to1: FD vs all real digits change"]
    assert mr["interval"] is not None and mr["interval"]["n"] == 3
    d = [r for r in rows if r["claim"] == "d"]
    assert {"matched updates", "matched preference pairs (2 vs 3 per update)", "matched training wall time"} <= {
        r["comparison"].split(", ")[-1].split(":")[0] for r in d}


def test_hacking_verdict_branches() -> None:
    up, flat, down = ({"verdict": v, "words": ["lowers", "raises"]} for v in ("raises", "inconclusive", "lowers"))
    fd_up, fd_flat = ({"verdict": v, "words": ["better FD", "worse FD"]} for v in ("worse FD", "inconclusive"))
    assert C.hacking_verdict(up, fd_up) == "hacks (reward up, FD up)"
    assert C.hacking_verdict(up, fd_flat) == "holds (reward up, FD not detectably up)"
    assert C.hacking_verdict(flat, fd_up) == "no reward gain" == C.hacking_verdict(down, fd_flat)


def test_matched_reward_interpolates_post_train_to_joints_reward() -> None:
    start = {"reward": 8.0, "fd_real": 7.0}
    joint = {0: rl_run([8.4, 8.4, 8.4], [8, 8, 8]), 1: rl_run([8.6, 8.6, 8.6], [8.5, 8.5, 8.5])}
    # post-train: reward 8.2 -> 8.6 between its first two checkpoints, FD 9 -> 11.
    post = {s: rl_run([8.2, 8.6, 9.0], [9, 11, 13]) for s in range(2)}
    iv = C.matched_reward({"j": joint, "p": post}, start, "j", "p", "fd_real")
    # seed 0: target 8.4 is half way: FD 10 -> change 3, minus joint's 1 -> 2; seed 1: target 8.6 -> FD 11: 4 - 1.5
    assert iv.mean == pytest.approx((2 + 2.5) / 2) and iv.n == 2


def test_holm_in_the_table_matches_a_hand_calculation() -> None:
    rows = [{"p": p, "interval": {"mean": -1.0, "lo": -2.0, "hi": -0.5, "sd": 1.0, "n": 3}, "words": ["lo", "hi"]}
            for p in (0.01, 0.04, 0.03, 0.005)]
    out = C.adjust(rows)
    # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1: 0.02, 0.03, 0.06, 0.06 (monotone).
    assert [r["p_holm"] for r in out] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [r["verdict"] for r in out] == ["lo", "inconclusive", "inconclusive", "lo"]
    assert holm([0.5, math.nan]) == [0.5, pytest.approx(math.nan, nan_ok=True)]


def test_rl_rows_use_the_independent_judge_where_every_point_has_it() -> None:
    rl = _rl()
    assert C.reward_key(rl) == "reward"
    # The independent judge sees the opposite of the trained reward's rise: the verdict must follow the judge.
    rl["start"]["judge_independent"] = 5.0
    for by in rl["runs"].values():
        for r in by.values():
            for i, p in enumerate(r["points"]):
                p["judge_independent"] = 5.0 - 0.1 * (i + 1) * (p["reward"] - 8.0) + 0.001 * i * i
    assert C.reward_key(rl) == "judge_independent"
    by = {r["comparison"]: r for r in C.decide(None, rl)}
    joint = by["joint-5to1 - no-RL control: independent judge's score change"]
    assert joint["interval"]["mean"] < 0 and joint["verdict"] == "no reward gain"
    assert "independent judge" in C.rl_note(rl) and "not an independent judge" in C.rl_note(_rl())
    del rl["runs"]["post-train"][1]["points"][-1]["judge_independent"]  # one point without it: the old key
    assert C.reward_key(rl) == "reward"
