"""The statistics of a sweep's seeds: mean, std and a Student t interval of a group of runs, and
Welch's t-test between two groups, from scipy.stats.

Seeds are few (3 to 5 is usual), so the interval uses Student's t, not the normal distribution,
and two groups are compared with Welch's test, which does not assume they have the same spread.
A group of one run has a mean but no spread: its std, interval and p-value are None ("n/a" in the
report), never an error.

scipy is imported inside the functions: the report's module is also read by the sweep launcher,
on the path of `nanogpt-train --cfg job`, which must not load numpy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # p at or above it: the difference may be noise


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample std (n - 1 in the denominator) and the 95% Student t interval
    of the mean. std and the interval are None for fewer than two values; everything is None for none."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else (self.ci_high - self.ci_low) / 2


def summarise(values: list[float]) -> Summary:
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    from scipy import stats

    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if std == 0.0:  # identical runs (a deterministic setting): the interval is the point, not scipy's nan
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=std / math.sqrt(n))
    return Summary(n, mean, std, float(low), float(high))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that a and b have the same mean; None where the test
    has nothing to go on: a group of fewer than two values, or two groups without any spread."""
    a, b = [float(v) for v in a if v is not None], [float(v) for v in b if v is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical values: scipy warns, then answers nan
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def significant(p: float | None) -> bool | None:
    return None if p is None else p < SIGNIFICANCE
