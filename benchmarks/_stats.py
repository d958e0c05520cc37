"""Small-sample statistics for results over seeds: mean +/- sample std and paired Student-t intervals.

NumPy and the standard library only. The t quantile inverts the Student-t CDF, written with the regularized
incomplete beta function (a continued fraction, as in Numerical Recipes' ``betacf``), by bisection.

    >>> round(t_quantile(0.975, 2), 4)
    4.3027
    >>> interval = paired_interval([16.9, 15.6, 17.1], [15.7, 18.9, 16.0])
    >>> interval.includes_zero
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``); the std is NaN for fewer than two values."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence, got shape {array.shape}")
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """CDF of Student's t distribution with ``dof`` degrees of freedom at ``t``."""
    if dof <= 0:
        raise ValueError(f"dof must be positive, got {dof}")
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (e.g. ``t_quantile(0.975, 2)`` = 4.3027).

    Found by bisection on :func:`t_cdf` to about 1e-12 relative precision.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedInterval:
    """Mean of the paired differences ``a - b`` with a Student-t confidence interval.

    Attributes:
        n: Number of pairs.
        mean: Mean difference.
        std: Sample standard deviation of the differences (NaN for one pair).
        half_width: Half the interval's width, ``t_{(1+confidence)/2, n-1} * std / sqrt(n)`` (NaN for one pair).
        low: ``mean - half_width``.
        high: ``mean + half_width``.
        confidence: The interval's confidence level, e.g. 0.95.
    """

    n: int
    mean: float
    std: float
    half_width: float
    low: float
    high: float
    confidence: float

    @property
    def includes_zero(self) -> bool | None:
        """Whether the interval contains 0 (no difference established); ``None`` when it is undefined."""
        if math.isnan(self.half_width):
            return None
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict, with ``includes_zero``; NaN becomes ``None``."""
        out = {key: (None if isinstance(value, float) and math.isnan(value) else value)
               for key, value in asdict(self).items()}
        out["includes_zero"] = self.includes_zero
        return out


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedInterval:
    """Confidence interval of the mean of ``a[i] - b[i]`` (paired t-interval, ``n - 1`` degrees of freedom).

    Args:
        a: Values of one configuration, one per seed.
        b: Values of the other configuration for the same seeds, in the same order.
        confidence: Confidence level; default 0.95.
    """
    if len(a) != len(b):
        raise ValueError(f"need two equally long sequences, got {len(a)} and {len(b)} values")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if differences.ndim != 1 or differences.size == 0:
        raise ValueError(f"need two equally long non-empty sequences, got {len(a)} and {len(b)} values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean, std = mean_std(differences)
    n = differences.size
    half_width = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return PairedInterval(n, mean, std, half_width, mean - half_width, mean + half_width, confidence)
