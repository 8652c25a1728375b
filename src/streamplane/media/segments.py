"""Segment planning: where every rung's segments start. Pure.

Segments never straddle a shot boundary, so every shot boundary is a segment boundary and every
segment starts with an IDR frame of its shot's encode. Shot planning already guarantees shots of
at least `min_s` (short shots are merged), so each shot splits into equal parts between `min_s`
and `max_s`, as close to `target_s` as those bounds allow.
"""

from __future__ import annotations

import itertools
import math

from streamplane.media.title import Segment, Shot


def split_counts(n_frames: int, fps: float, target_s: float, min_s: float, max_s: float) -> int:
    """How many equal segments a shot of `n_frames` splits into."""
    if not 0 < min_s <= target_s <= max_s:
        raise ValueError(f"need 0 < min_s <= target_s <= max_s, got {min_s}, {target_s}, {max_s}")
    seconds = n_frames / fps
    fewest = max(1, math.ceil(seconds / max_s - 1e-9))
    most = max(1, math.floor(seconds / min_s + 1e-9))
    near_target = max(1, round(seconds / target_s))
    return min(max(near_target, fewest), max(most, fewest))


def plan_segments(
    shots: tuple[Shot, ...] | list[Shot],
    fps: float,
    target_s: float = 4.0,
    min_s: float = 2.0,
    max_s: float = 6.0,
) -> tuple[Segment, ...]:
    """Cut each shot into segments; boundaries land on whole frames, spread evenly."""
    segments: list[Segment] = []
    for shot in shots:
        k = split_counts(shot.n_frames, fps, target_s, min_s, max_s)
        bounds = [shot.start_frame + (shot.n_frames * j) // k for j in range(k + 1)]
        for start, end in itertools.pairwise(bounds):
            segments.append(Segment(len(segments), shot.index, start, end))
    return tuple(segments)


def keyframes_in_shot(shot: Shot, segments: tuple[Segment, ...]) -> tuple[int, ...]:
    """Frame offsets, relative to the shot's first frame, where the shot's segments start."""
    return tuple(s.start_frame - shot.start_frame for s in segments if s.shot == shot.index)
