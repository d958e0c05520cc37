"""Small-sample statistics for results over seeds: mean +/- sample std and paired Student-t intervals.

The t quantile is ``scipy.stats.t.ppf`` (the ``benchmarks`` extra installs scipy; imported when first needed, so
that the rest of ``benchmarks`` imports without it).

    >>> interval = paired_interval([16.9, 15.6, 17.1], [15.7, 18.9, 16.0])
    >>> round(interval.half_width / (interval.std / 3 ** 0.5), 3)  # t(0.975, 2 dof)
    4.303
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


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (``t_quantile(0.975, 2)`` = 4.3027)."""
    if not 0.0 < p < 1.0 or dof <= 0:
        raise ValueError(f"Invalid quantile or degrees of freedom: p={p}, dof={dof}")
    from scipy import stats

    return float(stats.t.ppf(p, dof))


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
