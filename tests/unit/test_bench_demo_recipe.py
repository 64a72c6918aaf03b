"""bench/demo_recipe.py's pre-registered recipe rule, and the demo following it on the committed study."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import demo_recipe as D  # noqa: E402

from flashjob.demo import DEMO_SPEC  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _curve(final: float) -> dict:
    return {"points": [{"gen_updates": 50 * i, "fd_heldout": f} for i, f in enumerate([20, 12, 10, final, final, final])]}


def _payload(noema: list[float], ema: list[float]) -> dict:
    return {"runs": {"flash-ttur1-k4-noema": {str(s): _curve(f) for s, f in enumerate(noema)},
                     "flash-ttur1-k4": {str(s): _curve(f) for s, f in enumerate(ema)}}}


def test_no_ema_wins_only_with_an_interval_clear_of_zero_over_three_pairs() -> None:
    assert D.pick_recipe(_payload([5.0, 5.2, 4.9], [7.0, 7.4, 6.8]))["ema"] == 0.0  # +2 with small spread
    tie = D.pick_recipe(_payload([5.0, 5.2, 4.9], [7.0, 4.4, 6.8]))  # spread swallows the mean
    assert tie["ema"] == D.PAPER_EMA and tie["interval"]["lo"] < 0
    better = D.pick_recipe(_payload([7.0, 7.4, 6.8], [5.0, 5.2, 4.9]))  # 0.98 lower: the paper's setting
    assert better["ema"] == D.PAPER_EMA and better["interval"]["hi"] < 0
    few = D.pick_recipe(_payload([5.0, 5.2], [9.0, 9.4]))  # clear, but 2 pairs < MIN_PAIRS
    assert few["ema"] == D.PAPER_EMA and "2 paired seeds" in few["reason"]
    assert D.pick_recipe({"runs": {}})["ema"] == D.PAPER_EMA


def test_the_demo_follows_the_rule_on_the_committed_study() -> None:
    path = RESULTS / "quality_vs_cost.json"  # the held-out study; before its first run, no runs: the rule's tie
    payload = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    assert DEMO_SPEC["distill"]["ema"] == D.pick_recipe(payload)["ema"]
    assert DEMO_SPEC["train"]["max_steps"] == 400 and DEMO_SPEC["data"]["builtin"] == "digits-train"
