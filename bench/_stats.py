"""Seed statistics for the digits benchmarks: mean and a two-sided t-interval over independent runs.

Runs with different training seeds are independent draws of "the FD this recipe reaches", so the 95% interval
of their mean is mean +- t_{0.975, n-1} * s / sqrt(n) (s: the sample standard deviation, ddof 1). With 2-3 seeds
the t quantile is large (12.7 for n=2, 4.3 for n=3): that width is the honest price of few seeds, not a bug.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    sd: float  # sample standard deviation (ddof 1); nan for n = 1
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def fmt(self, digits: int = 2) -> str:
        """'7.12 [6.01, 8.23] (n=3)'; a single run has no interval."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (scipy ships with scikit-learn, a dependency)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and the two-sided `level` t-interval of the mean over independent runs."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        raise ValueError("no finite values")
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n)


def t_pvalue(iv: Interval) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 behind `iv` (nan for n < 2; 0 or 1 for zero spread)."""
    from scipy.stats import t

    if iv.n < 2 or not math.isfinite(iv.sd):
        return math.nan
    if iv.sd == 0:
        return 1.0 if iv.mean == 0 else 0.0
    stat = iv.mean / (iv.sd / math.sqrt(iv.n))
    return float(2 * t.sf(abs(stat), iv.n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; nan stays nan and is not counted.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)).
    Rejecting where adjusted p < alpha keeps the family-wise error rate at alpha across all m tests."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def ratio_interval(num: Sequence[float], den: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of the ratio num/den from paired measurements (e.g. interleaved timing rounds): a t-interval of
    the mean log ratio, exponentiated, so the centre is the geometric mean of the per-pair ratios and the
    interval is asymmetric as a ratio's should be. sd is that of the log ratios."""
    if len(num) != len(den):
        raise ValueError(f"ratio_interval: {len(num)} numerators but {len(den)} denominators")
    if any(x <= 0 for x in [*num, *den]):
        raise ValueError("ratio_interval: every value must be > 0")
    logs = mean_interval([math.log(a / b) for a, b in zip(num, den, strict=True)], level)
    if logs.n < 2:
        return Interval(math.exp(logs.mean), math.nan, math.nan, math.nan, logs.n)
    return Interval(math.exp(logs.mean), math.exp(logs.lo), math.exp(logs.hi), logs.sd, logs.n)
