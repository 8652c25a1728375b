from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.media.ladder import (
    APPLE_H264_LADDER,
    build_ladder,
    fixed_ladder,
    matrix_resolutions,
    shot_hulls,
)
from streamplane.media.title import ShotChoice

SIZES = [(1280, 720), (960, 540), (640, 360)]
CRFS = [20, 25, 30, 35, 40]


def synthetic_matrix(complexities: list[float]) -> list[ShotChoice]:
    """Rate-quality points shaped like real ones: quality saturates with bits, small pictures
    saturate lower but cost less, harder shots need more bits."""
    pts = []
    for shot, c in enumerate(complexities):
        for (w, h), cap in zip(SIZES, (100.0, 93.0, 80.0), strict=True):
            for crf in CRFS:
                bits = int(c * w * h * 2 ** (-(crf - 20) / 6) / 10)
                vmaf = cap * (1 - math.exp(-bits / (c * w * h / 40)))
                pts.append(ShotChoice(shot, w, h, crf, bits, round(vmaf, 3)))
    return pts


def test_fixed_ladder_is_capped_at_the_source() -> None:
    assert fixed_ladder(1280, 720) == [r for r in APPLE_H264_LADDER if r[1] <= 720]
    small = fixed_ladder(320, 180)
    assert len(small) == 4
    assert all(h <= 180 and w <= 320 for w, h, _ in small)
    assert [k for _, _, k in small] == [145, 365, 730, 1100]


@given(st.integers(64, 4096), st.integers(64, 2160))
def test_matrix_resolutions_never_exceed_the_source(width: int, height: int) -> None:
    sizes = matrix_resolutions(width, height)
    assert sizes
    for w, h in sizes:
        assert h <= height and w <= width + 1 and w % 2 == 0 and h % 2 == 0


def test_matrix_resolutions_by_height() -> None:
    assert matrix_resolutions(1280, 720, [1080, 720, 360]) == [(1280, 720), (640, 360)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.2, 5.0), min_size=1, max_size=8), st.integers(1, 8))
def test_ladder_rises_and_uses_hull_points(complexities: list[float], n: int) -> None:
    pts = synthetic_matrix(complexities)
    frames = [100] * len(complexities)
    ladder = build_ladder(pts, frames, n_rungs=n)
    rungs = ladder.rungs
    assert 1 <= len(rungs) <= n
    for a, b in itertools.pairwise(rungs):
        assert a.allocation.bits < b.allocation.bits
        assert a.allocation.quality <= b.allocation.quality
        assert a.height <= b.height
    for rung in rungs:
        assert all((c.width, c.height) == (rung.width, rung.height) for c in rung.choices)
        hulls = shot_hulls(pts, len(complexities), (rung.width, rung.height))
        for c, hull in zip(rung.choices, hulls, strict=True):
            assert c in [p.option for p in hull]
        assert rung.allocation.bits <= rung.target_bits + 1e-6


def test_top_rung_stops_at_the_quality_target() -> None:
    pts = synthetic_matrix([0.5, 1.0, 3.0])
    ladder = build_ladder(pts, [100, 100, 100], n_rungs=5, top_quality=90.0)
    top = ladder.rungs[-1]
    assert top.allocation.quality >= 90.0
    # the most expensive encodes are not spent: the target was reached below them
    most = max(sum(p.bits for p in pts if p.shot == s) for s in range(3))
    assert top.allocation.bits < most


def test_easy_shots_get_fewer_bits_than_hard_ones() -> None:
    pts = synthetic_matrix([0.3, 4.0])
    ladder = build_ladder(pts, [100, 100], n_rungs=4)
    for rung in ladder.rungs[1:]:
        easy, hard = rung.choices
        assert easy.bits < hard.bits


def test_bottom_rung_is_the_cheapest_title_worth_watching() -> None:
    pts = synthetic_matrix([0.5, 1.0, 3.0])
    ladder = build_ladder(pts, [100, 100, 100], n_rungs=4, bottom_quality=50.0)
    assert ladder.rungs[0].allocation.quality >= 50.0
    cheapest = build_ladder(pts, [100, 100, 100], n_rungs=4, bottom_quality=0.0)
    assert cheapest.rungs[0].allocation.bits < ladder.rungs[0].allocation.bits
