"""Convex hulls over (bits, quality) and the equal-slope (Lagrangian) allocation. Pure.

Each shot offers encodes at several (resolution, quantiser) points. Only the upper convex hull of
a shot's points can be optimal: a point under the hull is beaten by a mix of its neighbours.
Choosing, for one lambda, each shot's hull point that maximises `weight * quality - lambda * bits`
gives an allocation no other choice of points beats at its total bits (Everett, 1963); sweeping
lambda walks the title's own rate-quality hull. `weight` is the shot's share of frames, so the
title's quality is the frame-weighted mean of its shots', as frame-pooled VMAF is.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RatePoint(Generic[T]):
    bits: float
    quality: float
    option: T


def upper_hull(points: Sequence[RatePoint[T]]) -> list[RatePoint[T]]:
    """The upper-left convex hull: rising in bits and quality, with falling slopes.

    Points that cost more bits for no more quality are dropped, and so is every point lying on or
    under the chord of its neighbours.
    """
    ordered = sorted(points, key=lambda p: (p.bits, -p.quality))
    rising: list[RatePoint[T]] = []
    for p in ordered:
        if rising and p.bits == rising[-1].bits:
            continue  # same bits, no better quality (sorted by quality descending within bits)
        if rising and p.quality <= rising[-1].quality:
            continue
        rising.append(p)
    hull: list[RatePoint[T]] = []
    for p in rising:
        while len(hull) >= 2 and _not_concave(hull[-2], hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def _not_concave(a: RatePoint[T], b: RatePoint[T], c: RatePoint[T]) -> bool:
    # b is on or under the chord a-c when slope(a,b) <= slope(b,c); cross-multiplied for exactness.
    return (b.quality - a.quality) * (c.bits - b.bits) <= (c.quality - b.quality) * (
        b.bits - a.bits
    )


def slopes(hull: Sequence[RatePoint[T]]) -> list[float]:
    """Quality gained per bit for each step up the hull (falling along a valid hull)."""
    return [(b.quality - a.quality) / (b.bits - a.bits) for a, b in itertools.pairwise(hull)]


def choose_at_slope(
    hulls: Sequence[Sequence[RatePoint[T]]], weights: Sequence[float], lam: float
) -> list[int]:
    """Each shot's hull index maximising `weight * quality - lam * bits` (ties: fewer bits)."""
    picks = []
    for hull, w in zip(hulls, weights, strict=True):
        best, best_value = 0, w * hull[0].quality - lam * hull[0].bits
        for j, p in enumerate(hull[1:], start=1):
            value = w * p.quality - lam * p.bits
            if value > best_value:
                best, best_value = j, value
        picks.append(best)
    return picks


@dataclass(frozen=True)
class Allocation(Generic[T]):
    picks: tuple[int, ...]  # index into each shot's hull
    points: tuple[RatePoint[T], ...]
    bits: float
    quality: float  # frame-weighted mean over shots
    slope: float  # the lambda every shot's choice is at (inf when nothing was upgraded)
    feasible: bool  # False when even the cheapest points exceed the budget / miss the target


def _steps(
    hulls: Sequence[Sequence[RatePoint[T]]], weights: Sequence[float]
) -> list[tuple[float, int, int]]:
    """Every upgrade step (weighted slope, shot, to-index), steepest first.

    Hull slopes fall within a shot, so this order never takes a step before its predecessor."""
    steps = []
    for i, (hull, w) in enumerate(zip(hulls, weights, strict=True)):
        for j, s in enumerate(slopes(hull), start=1):
            steps.append((w * s, i, j))
    steps.sort(key=lambda t: (-t[0], t[1], t[2]))
    return steps


def _allocation(
    hulls: Sequence[Sequence[RatePoint[T]]],
    weights: Sequence[float],
    picks: list[int],
    slope: float,
    feasible: bool,
) -> Allocation[T]:
    points = tuple(h[j] for h, j in zip(hulls, picks, strict=True))
    total_w = sum(weights)
    quality = sum(w * p.quality for w, p in zip(weights, points, strict=True)) / total_w
    return Allocation(tuple(picks), points, sum(p.bits for p in points), quality, slope, feasible)


def allocate_bits(
    hulls: Sequence[Sequence[RatePoint[T]]], weights: Sequence[float], budget: float
) -> Allocation[T]:
    """The best frame-weighted quality within `budget` bits at one slope across all shots."""
    _check(hulls, weights)
    picks = [0] * len(hulls)
    bits = sum(h[0].bits for h in hulls)
    if bits > budget:
        return _allocation(hulls, weights, picks, float("inf"), feasible=False)
    slope = float("inf")
    for s, i, j in _steps(hulls, weights):
        extra = hulls[i][j].bits - hulls[i][j - 1].bits
        if bits + extra > budget:
            break
        picks[i], bits, slope = j, bits + extra, s
    return _allocation(hulls, weights, picks, slope, feasible=True)


def allocate_quality(
    hulls: Sequence[Sequence[RatePoint[T]]], weights: Sequence[float], target: float
) -> Allocation[T]:
    """The fewest bits at one slope whose frame-weighted quality reaches `target`."""
    _check(hulls, weights)
    picks = [0] * len(hulls)
    total_w = sum(weights)
    quality = sum(w * h[0].quality for h, w in zip(hulls, weights, strict=True)) / total_w
    slope = float("inf")
    for s, i, j in _steps(hulls, weights):
        if quality >= target:
            break
        quality += weights[i] * (hulls[i][j].quality - hulls[i][j - 1].quality) / total_w
        picks[i], slope = j, s
    return _allocation(hulls, weights, picks, slope, feasible=quality >= target)


def _check(hulls: Sequence[Sequence[RatePoint[T]]], weights: Sequence[float]) -> None:
    if not hulls:
        raise ValueError("no shots to allocate")
    if len(hulls) != len(weights):
        raise ValueError(f"{len(hulls)} hulls but {len(weights)} weights")
    if any(not h for h in hulls):
        raise ValueError("a shot has no encodes to choose from")
    if any(w <= 0 for w in weights):
        raise ValueError("shot weights must be positive")
