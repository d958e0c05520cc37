"""benchmarks/_stats.py: mean +/- sample std, the Student-t quantile (scipy's) and paired t-intervals, against
printed tables and closed forms."""

import math

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the benchmarks extra (pip install -e '.[benchmarks]') installs scipy")
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._stats import mean_std, paired_interval, t_quantile

# Two-sided 95% (and a few other) quantiles from standard tables (e.g. NIST/SEMATECH e-Handbook, Table 1.3.5.6).
TABLE = [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
    (0.975, 9, 2.262), (0.975, 10, 2.228), (0.975, 20, 2.086), (0.975, 30, 2.042), (0.975, 100, 1.984),
    (0.95, 5, 2.015), (0.95, 10, 1.812), (0.995, 3, 5.841), (0.995, 10, 3.169), (0.90, 2, 1.886),
]


@pytest.mark.parametrize("p, dof, expected", TABLE)
def test_t_quantile_matches_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=5e-4)


@given(st.floats(0.001, 0.999))
def test_t_quantile_closed_forms_for_one_and_two_dof(p):
    # dof 1 is the Cauchy distribution; dof 2 has F^-1(p) = (2p - 1) / sqrt(2 p (1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-9)


@settings(max_examples=60)
@given(st.floats(0.51, 0.999), st.integers(1, 200))
def test_t_quantile_is_odd_and_exceeds_the_normal(p, dof):
    t = t_quantile(p, dof)
    assert t_quantile(1 - p, dof) == pytest.approx(-t)
    normal = math.sqrt(2) * _inverse_erf(2 * p - 1)  # the normal limit, from math.erf by bisection
    assert t >= normal - 1e-9
    assert t_quantile(p, dof + 1) <= t + 1e-12  # heavier tails with fewer dof


def _inverse_erf(y: float) -> float:
    low, high = -10.0, 10.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if math.erf(middle) < y else (low, middle)
    return (low + high) / 2


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Invalid"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="Invalid"):
        t_quantile(0.9, 0)


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([15.72, 18.86, 17.0])
    assert mean == pytest.approx((15.72 + 18.86 + 17.0) / 3)
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in (15.72, 18.86, 17.0)) / 2)
    assert std == pytest.approx(by_hand)
    assert math.isnan(mean_std([3.0])[1])
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_interval_by_hand():
    # Hybrid and FO over three seeds: differences 1.14, -3.28, -2.30.
    hybrid, fo = [16.86, 15.58, 16.56], [15.72, 18.86, 18.86]
    differences = [1.14, -3.28, -2.30]
    mean = sum(differences) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)
    interval = paired_interval(hybrid, fo)
    assert (interval.n, interval.confidence) == (3, 0.95)
    assert interval.mean == pytest.approx(mean)
    assert interval.std == pytest.approx(std)
    assert interval.half_width == pytest.approx(half, rel=1e-9)
    assert (interval.low, interval.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert interval.includes_zero is True
    record = interval.to_dict()
    assert record["includes_zero"] is True and record["n"] == 3


def test_paired_interval_excludes_zero_for_a_consistent_gain_and_is_undefined_for_one_pair():
    interval = paired_interval([20.0, 21.0, 22.5], [15.0, 15.5, 16.5])
    assert interval.low > 0 and interval.includes_zero is False
    single = paired_interval([20.0], [15.0])
    assert single.mean == 5.0 and math.isnan(single.half_width) and single.includes_zero is None
    assert single.to_dict()["half_width"] is None
    with pytest.raises(ValueError):
        paired_interval([1.0, 2.0], [1.0])


@settings(max_examples=40)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=8), st.floats(-10, 10))
def test_paired_interval_shifts_with_a_constant_difference(values, shift):
    base = np.asarray(values)
    interval = paired_interval(base + shift + np.linspace(0, 1, len(values)), base)
    assert interval.low <= interval.mean <= interval.high
    assert interval.mean == pytest.approx(shift + 0.5, abs=1e-6)
