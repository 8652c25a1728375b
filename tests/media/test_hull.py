"""The convex hull and the equal-slope allocation, against brute force."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamplane.media.hull import (
    RatePoint,
    allocate_bits,
    allocate_quality,
    choose_at_slope,
    slopes,
    upper_hull,
)

point = st.builds(
    lambda b, q: RatePoint(float(b), float(q), (b, q)),
    st.integers(1, 10_000),
    st.integers(0, 100),
)
points = st.lists(point, min_size=1, max_size=12)


@given(points)
def test_no_hull_point_is_dominated(pts: list[RatePoint[object]]) -> None:
    hull = upper_hull(pts)
    for h in hull:
        for p in pts:
            # nothing is at least as good on both axes and strictly better on one
            assert not (
                p.bits <= h.bits
                and p.quality >= h.quality
                and (p.bits, p.quality) != (h.bits, h.quality)
            )


@given(points)
def test_hull_rises_with_falling_slopes(pts: list[RatePoint[object]]) -> None:
    hull = upper_hull(pts)
    assert hull
    assert all(a.bits < b.bits and a.quality < b.quality for a, b in itertools.pairwise(hull))
    s = slopes(hull)
    assert all(x > y for x, y in itertools.pairwise(s))


@given(points)
def test_every_point_lies_under_the_hull(pts: list[RatePoint[object]]) -> None:
    hull = upper_hull(pts)
    for p in pts:
        if p.bits < hull[0].bits:
            continue
        # interpolate the hull at p.bits (flat beyond its last point)
        q = hull[-1].quality
        for a, b in itertools.pairwise(hull):
            if a.bits <= p.bits <= b.bits:
                q = a.quality + (b.quality - a.quality) * (p.bits - a.bits) / (b.bits - a.bits)
                break
        assert p.quality <= q + 1e-9


def test_hull_drops_a_point_under_the_chord() -> None:
    pts = [RatePoint(100.0, 50.0, "a"), RatePoint(200.0, 60.0, "b"), RatePoint(300.0, 80.0, "c")]
    assert [p.option for p in upper_hull(pts)] == ["a", "c"]


shots = st.lists(points, min_size=1, max_size=4)
weights_for = st.integers(1, 50)


@settings(max_examples=150, deadline=None)
@given(shots, st.data())
def test_allocation_is_optimal_at_its_own_rate(
    shot_points: list[list[RatePoint[object]]], data: st.DataObject
) -> None:
    """Everett: no choice of points (hull or not) beats the Lagrangian choice at its bits."""
    assume(all(len(p) <= 6 for p in shot_points))
    weights = [float(data.draw(weights_for)) for _ in shot_points]
    hulls = [upper_hull(p) for p in shot_points]
    lo = sum(h[0].bits for h in hulls)
    hi = sum(h[-1].bits for h in hulls)
    budget = data.draw(st.floats(lo, hi)) if hi > lo else lo
    alloc = allocate_bits(hulls, weights, budget)
    assert alloc.feasible and alloc.bits <= budget
    for combo in itertools.product(*shot_points):
        bits = sum(p.bits for p in combo)
        if bits <= alloc.bits:
            q = sum(w * p.quality for w, p in zip(weights, combo, strict=True)) / sum(weights)
            assert q <= alloc.quality + 1e-9


@given(shots, st.data())
def test_choice_is_monotone_in_lambda(
    shot_points: list[list[RatePoint[object]]], data: st.DataObject
) -> None:
    hulls = [upper_hull(p) for p in shot_points]
    weights = [float(data.draw(weights_for)) for _ in shot_points]
    lo, hi = sorted(data.draw(st.floats(0, 10)) for _ in range(2))
    cheap = choose_at_slope(hulls, weights, hi)
    rich = choose_at_slope(hulls, weights, lo)
    for h, a, b in zip(hulls, cheap, rich, strict=True):
        assert h[a].bits <= h[b].bits


@given(shots, st.data())
def test_more_budget_never_lowers_quality(
    shot_points: list[list[RatePoint[object]]], data: st.DataObject
) -> None:
    hulls = [upper_hull(p) for p in shot_points]
    weights = [1.0] * len(hulls)
    lo = sum(h[0].bits for h in hulls)
    a, b = sorted(data.draw(st.floats(lo, lo + 50_000)) for _ in range(2))
    assert allocate_bits(hulls, weights, a).quality <= allocate_bits(hulls, weights, b).quality


@given(shots, st.floats(0, 100))
def test_quality_target_is_met_at_fewest_hull_bits(
    shot_points: list[list[RatePoint[object]]], target: float
) -> None:
    hulls = [upper_hull(p) for p in shot_points]
    weights = [1.0] * len(hulls)
    alloc = allocate_quality(hulls, weights, target)
    best = sum(h[-1].quality for h in hulls) / len(hulls)
    assert alloc.feasible == (best >= target)
    if alloc.feasible:
        assert alloc.quality >= target
        # the allocation is the Lagrangian one at its bits: nothing cheaper reaches the target
        cheaper = allocate_bits(hulls, weights, alloc.bits - 1e-6)
        assert not cheaper.feasible or cheaper.quality < target


def test_budget_below_the_cheapest_title_is_infeasible() -> None:
    hull = [RatePoint(100.0, 40.0, 0), RatePoint(200.0, 60.0, 1)]
    alloc = allocate_bits([hull, hull], [1.0, 1.0], 150.0)
    assert not alloc.feasible
    assert alloc.picks == (0, 0)


def test_equal_slope_spends_bits_where_quality_rises_most() -> None:
    easy = [RatePoint(100.0, 90.0, "e0"), RatePoint(400.0, 92.0, "e1")]
    hard = [RatePoint(100.0, 40.0, "h0"), RatePoint(400.0, 80.0, "h1")]
    alloc = allocate_bits([easy, hard], [1.0, 1.0], 500.0)
    assert [p.option for p in alloc.points] == ["e0", "h1"]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="no encodes"):
        allocate_bits([[]], [1.0], 10.0)
    with pytest.raises(ValueError, match="weights"):
        allocate_bits([[RatePoint(1.0, 1.0, 0)]], [1.0, 2.0], 10.0)
