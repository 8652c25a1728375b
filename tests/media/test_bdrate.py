from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.media.bdrate import bd_rate

ANCHOR = [(200_000.0, 40.0), (400_000.0, 60.0), (800_000.0, 75.0), (1_600_000.0, 88.0)]


@settings(deadline=None)  # the first call imports scipy
@given(st.floats(0.3, 3.0))
def test_a_curve_needing_k_times_the_bits_scores_k_minus_one(k: float) -> None:
    test = [(r * k, q) for r, q in ANCHOR]
    result = bd_rate(ANCHOR, test)
    assert result is not None
    assert result.percent == pytest.approx(100 * (k - 1), abs=1e-6)
    assert result.overlap == pytest.approx(1.0)


def test_the_same_curve_scores_zero_whatever_its_point_order() -> None:
    result = bd_rate(ANCHOR, list(reversed(ANCHOR)))
    assert result is not None and math.isclose(result.percent, 0.0, abs_tol=1e-9)


def test_dominated_points_do_not_bend_the_curve() -> None:
    noisy = [*ANCHOR, (900_000.0, 70.0)]  # more bits, less quality than a neighbour
    a, b = bd_rate(ANCHOR, noisy), bd_rate(ANCHOR, ANCHOR)
    assert a is not None and b is not None and a.percent == pytest.approx(b.percent)


def test_curves_without_common_quality_cannot_be_compared() -> None:
    high = [(r, q + 100) for r, q in ANCHOR]
    assert bd_rate(ANCHOR, high) is None
    assert bd_rate(ANCHOR, ANCHOR[:1]) is None
