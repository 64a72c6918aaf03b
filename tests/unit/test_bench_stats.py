"""bench/_stats.py: the seed interval of the digits benchmarks, checked by hand on small numbers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _stats import Interval, holm, mean_interval, ratio_interval, t_pvalue, t_quantile  # noqa: E402


def test_t_quantiles_are_the_table_values() -> None:
    # Student's t, two-sided 95%: the textbook table.
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)


def test_three_seeds_by_hand() -> None:
    # 6, 8, 10: mean 8, s^2 = (4 + 0 + 4) / 2 = 4, s = 2, half width 4.3027 * 2 / sqrt(3) = 4.9683.
    iv = mean_interval([6.0, 8.0, 10.0])
    assert (iv.mean, iv.sd, iv.n) == (8.0, 2.0, 3)
    assert iv.lo == pytest.approx(8 - 4.96836, abs=1e-4) and iv.hi == pytest.approx(8 + 4.96836, abs=1e-4)
    assert iv.fmt() == "8.00 [3.03, 12.97] (n=3)"


def test_two_seeds_by_hand_and_a_wider_level() -> None:
    # 7, 9: mean 8, s = sqrt(2), half width 12.7062 * sqrt(2) / sqrt(2) = 12.7062.
    iv = mean_interval([7.0, 9.0])
    assert iv.sd == pytest.approx(math.sqrt(2)) and iv.hi - iv.mean == pytest.approx(12.7062, abs=1e-4)
    # 90%: t_{0.95, 1} = 6.3138.
    assert mean_interval([7.0, 9.0], level=0.90).hi == pytest.approx(8 + 6.3138, abs=1e-4)


def test_one_run_has_no_interval_and_nothing_is_an_error() -> None:
    iv = mean_interval([5.0, float("nan")])  # a non-finite value is dropped, not averaged
    assert iv.n == 1 and iv.mean == 5.0 and math.isnan(iv.lo)
    assert iv.fmt() == "5.00 (n=1)"
    assert Interval(**iv.as_dict()).n == 1
    with pytest.raises(ValueError):
        mean_interval([])


def test_wilson_interval_by_hand() -> None:
    from rollout_reward_eval import wilson

    # 360/400: centre (0.9 + 1.96^2/800) / (1 + 1.96^2/400) = 0.896198, half-width
    # 1.96 sqrt(0.9 * 0.1 / 400 + 1.96^2 / 640000) / (1 + 1.96^2/400) = 0.029506.
    lo, hi = wilson(360, 400)
    assert lo == pytest.approx(0.866692, abs=1e-5) and hi == pytest.approx(0.925704, abs=1e-5)
    lo, hi = wilson(0, 10)  # no successes: the interval still has width, unlike the Wald one
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


def test_holm_against_a_hand_calculation() -> None:
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 =
    # 0.04, raised to 0.06 to stay monotone. Back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, math.nan, 0.02])  # nan is not a test: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_t_pvalue_matches_the_interval() -> None:
    iv = mean_interval([6.0, 8.0, 10.0])  # t = 8 / (2 / sqrt 3) = 6.928, df 2: p = 0.0202
    assert t_pvalue(iv) == pytest.approx(0.0202, abs=1e-4)
    edge = mean_interval([1.0, 2.0, 3.0, 4.0])  # the 95% interval's edge sits at 0 exactly when p = 0.05
    shifted = mean_interval([x - edge.lo for x in [1.0, 2.0, 3.0, 4.0]])
    assert shifted.lo == pytest.approx(0.0, abs=1e-12) and t_pvalue(shifted) == pytest.approx(0.05)
    assert math.isnan(t_pvalue(mean_interval([1.0])))
    assert t_pvalue(mean_interval([2.0, 2.0])) == 0.0 and t_pvalue(mean_interval([0.0, 0.0])) == 1.0


def test_ratio_interval_is_the_geometric_mean_of_paired_ratios() -> None:
    iv = ratio_interval([1.0, 4.0], [2.0, 2.0])  # ratios 0.5 and 2: geometric mean 1, log sd ln(4)/sqrt(2)
    assert iv.mean == pytest.approx(1.0) and iv.sd == pytest.approx(math.log(4) / math.sqrt(2))
    assert iv.lo * iv.hi == pytest.approx(1.0)  # symmetric in log space
    with pytest.raises(ValueError):
        ratio_interval([1.0], [0.0])
    with pytest.raises(ValueError):
        ratio_interval([1.0, 2.0], [1.0])
