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
