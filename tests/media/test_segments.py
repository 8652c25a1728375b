from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.media.segments import keyframes_in_shot, plan_segments
from streamplane.media.title import Shot

FPS = 25.0


@st.composite
def shot_lists(draw: st.DrawFn) -> list[Shot]:
    # shots as shot planning makes them: at least 2 s (50 frames) each
    lengths = draw(st.lists(st.integers(50, 1500), min_size=1, max_size=20))
    shots, at = [], 0
    for i, n in enumerate(lengths):
        shots.append(Shot(i, at, at + n))
        at += n
    return shots


@given(shot_lists())
def test_segments_tile_the_title_and_respect_shots(shots: list[Shot]) -> None:
    segs = plan_segments(shots, FPS)
    assert segs[0].start_frame == 0
    assert segs[-1].end_frame == shots[-1].end_frame
    for a, b in itertools.pairwise(segs):
        assert a.end_frame == b.start_frame
    starts = {s.start_frame for s in segs}
    assert all(shot.start_frame in starts for shot in shots)  # every cut is a segment start
    for s in segs:
        shot = shots[s.shot]
        assert shot.start_frame <= s.start_frame < s.end_frame <= shot.end_frame
    assert [s.index for s in segs] == list(range(len(segs)))


@given(shot_lists())
def test_segment_lengths_stay_within_two_to_six_seconds(shots: list[Shot]) -> None:
    for s in plan_segments(shots, FPS, target_s=4.0, min_s=2.0, max_s=6.0):
        # whole frames: a bound may be missed by under one frame
        assert 2.0 - 1 / FPS <= s.n_frames / FPS <= 6.0 + 1 / FPS


def test_keyframes_are_segment_starts_relative_to_the_shot() -> None:
    shots = [Shot(0, 0, 100), Shot(1, 100, 400)]
    segs = plan_segments(shots, FPS)
    assert keyframes_in_shot(shots[1], segs) == (0, 100, 200)


def test_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        plan_segments([Shot(0, 0, 100)], FPS, target_s=1.0, min_s=2.0, max_s=6.0)
