"""Student's t quantile against printed tables, and the paired comparison the report shows."""
from __future__ import annotations

import math

import pytest

from prism_ray.stats import betainc, paired_difference, t_cdf, t_quantile

# two-sided 95 % critical values t_{0.975, df} (any statistics table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 9: 2.262, 10: 2.228, 19: 2.093,
         29: 2.045, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_other_levels_and_symmetry():
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    assert t_quantile(0.995, 4) == pytest.approx(4.604, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal limit


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution: 1/2 + atan(t) / pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_betainc_closed_forms():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 6x^2 - 8x^3 + 3x^4
    assert betainc(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), abs=1e-12)
    assert (betainc(2, 3, 0.0), betainc(2, 3, 1.0)) == (0.0, 1.0)


def test_paired_difference_by_seed():
    a = {0: 0.70, 1: 0.72, 2: 0.69, 3: 0.71, 4: 0.74}
    b = {0: 0.68, 1: 0.71, 2: 0.66, 3: 0.71, 4: 0.70, 9: 0.10}  # seed 9 has no partner: left out
    d = paired_difference(a, b)
    diffs = [0.02, 0.01, 0.03, 0.0, 0.04]
    assert d["seeds"] == [0, 1, 2, 3, 4] and d["diffs"] == pytest.approx(diffs)
    mean = sum(diffs) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    half = 2.776445 * std / math.sqrt(5)
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(std)
    assert (d["low"], d["high"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert d["low"] > 0  # this difference is consistent over seeds


def test_paired_difference_without_enough_seeds():
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 0.5}, {0: 0.25})
    assert one["mean"] == 0.25 and one["low"] is None and one["high"] is None
