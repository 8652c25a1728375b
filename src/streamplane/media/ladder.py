"""From measured encodes to a ladder of rungs. Pure.

Every shot has been encoded at several resolutions x quantisers and scored. A rung is one
resolution (see below) and, per shot, the quantiser at the rung's equal-slope point. Rung targets
are spread geometrically in bitrate between the cheapest title that reaches `bottom_quality`
VMAF and the cheapest that reaches `top_quality` (past it, viewers see no difference, so bits
there are wasted).

Why one resolution per rung: a rung that switches resolution from shot to shot needs in-band
parameter sets (avc3/hev1) and a player and decoder that reconfigure mid-track. `build_ladder`
also computes that mixed ladder at the same targets, so the quality it would add is measured
(`Ladder.mixed`), and the benchmark records it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from streamplane.media.hull import (
    Allocation,
    RatePoint,
    allocate_bits,
    allocate_quality,
    upper_hull,
)
from streamplane.media.title import ShotChoice

# Apple's HLS authoring specification, H.264 ladder for 16:9 (width, height, kbps).
APPLE_H264_LADDER: tuple[tuple[int, int, int], ...] = (
    (416, 234, 145),
    (640, 360, 365),
    (768, 432, 730),
    (768, 432, 1100),
    (960, 540, 2000),
    (1280, 720, 3000),
    (1280, 720, 4500),
    (1920, 1080, 6000),
    (1920, 1080, 7800),
)

DEFAULT_SCALES = (1.0, 0.75, 0.5, 1 / 3)


def even(x: float) -> int:
    """The even number at or below x (4:2:0 needs even sides; never above the source)."""
    return max(2, 2 * math.floor(x / 2 + 1e-9))


def scaled_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """A picture size of `target_height` lines with the source's aspect, both sides even."""
    return even(width * target_height / height), even(target_height)


def matrix_resolutions(
    width: int, height: int, heights: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Resolutions to encode at: the given heights (never above the source) or default scales."""
    wanted = heights if heights else [height * s for s in DEFAULT_SCALES]
    sizes = {scaled_size(width, height, min(round(h), height)) for h in wanted if h >= 16}
    return sorted(sizes, key=lambda s: -s[1])


def fixed_ladder(width: int, height: int, minimum_rungs: int = 4) -> list[tuple[int, int, int]]:
    """Apple's ladder capped at the source: rungs above the source's height are dropped.

    A source smaller than most rungs keeps at least `minimum_rungs` (the lowest ones, at the
    source's size) so the baseline still draws a curve.
    """
    rungs = [
        (*scaled_size(width, height, h), kbps) for _, h, kbps in APPLE_H264_LADDER if h <= height
    ]
    for _, h, kbps in APPLE_H264_LADDER[len(rungs) :]:
        if len(rungs) >= minimum_rungs:
            break
        rungs.append((*scaled_size(width, height, min(h, height)), kbps))
    return rungs


@dataclass(frozen=True)
class LadderRung:
    width: int
    height: int
    target_bits: float
    allocation: Allocation[ShotChoice]

    @property
    def choices(self) -> tuple[ShotChoice, ...]:
        return tuple(p.option for p in self.allocation.points)


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[LadderRung, ...]
    mixed: tuple[Allocation[ShotChoice], ...]  # free resolution per shot, same targets
    targets_bits: tuple[float, ...]


def shot_hulls(
    points: Sequence[ShotChoice], n_shots: int, size: tuple[int, int] | None = None
) -> list[list[RatePoint[ShotChoice]]]:
    """Per shot, the hull over its points at `size` (or over every resolution when None)."""
    by_shot: dict[int, list[RatePoint[ShotChoice]]] = defaultdict(list)
    for p in points:
        if size is None or (p.width, p.height) == size:
            by_shot[p.shot].append(RatePoint(float(p.bits), p.vmaf, p))
    return [upper_hull(by_shot[i]) for i in range(n_shots)]


def build_ladder(
    points: Sequence[ShotChoice],
    shot_frames: Sequence[int],
    n_rungs: int = 6,
    top_quality: float = 95.0,
    bottom_quality: float = 40.0,
) -> Ladder:
    """Choose `n_rungs` rungs (fewer if several targets land on the same encodes).

    The bottom rung is the cheapest title reaching `bottom_quality` (a picture worse than that
    is not worth sending), the top the cheapest reaching `top_quality`.
    """
    n_shots = len(shot_frames)
    if n_rungs < 1:
        raise ValueError("a ladder needs at least one rung")
    sizes = sorted({(p.width, p.height) for p in points}, key=lambda s: s[1])
    hulls_by_size = {}
    for size in sizes:
        hulls = shot_hulls(points, n_shots, size)
        if all(hulls):  # a resolution missing a shot (failed encodes) cannot make a rung
            hulls_by_size[size] = hulls
    if not hulls_by_size:
        raise ValueError("no resolution has an encode for every shot")
    weights = [float(f) for f in shot_frames]
    top = _cheapest_reaching(hulls_by_size, weights, top_quality)
    if top is None:
        top = max(sum(x[-1].bits for x in h) for h in hulls_by_size.values())
    cheapest = min(sum(h[0].bits for h in hulls) for hulls in hulls_by_size.values())
    bottom = _cheapest_reaching(hulls_by_size, weights, bottom_quality) or cheapest
    bottom = min(bottom, top)
    targets = _geometric(bottom, top, n_rungs)
    rungs: list[LadderRung] = []
    for target in targets:
        best: LadderRung | None = None
        for size, hulls in hulls_by_size.items():
            if rungs and size[1] < rungs[-1].height:
                # Resolution never falls up the ladder: players cap rungs by picture size and
                # expect a higher rung to look at least as sharp.
                continue
            alloc = allocate_bits(hulls, weights, target)
            if alloc.feasible and (best is None or alloc.quality > best.allocation.quality):
                best = LadderRung(size[0], size[1], target, alloc)
        if best is None:
            continue
        if rungs and best.allocation.bits <= rungs[-1].allocation.bits:
            continue  # a target that adds nothing over the rung below
        rungs.append(best)
    mixed_hulls = shot_hulls(points, n_shots, None)
    mixed = tuple(allocate_bits(mixed_hulls, weights, t) for t in targets)
    return Ladder(tuple(rungs), mixed, tuple(targets))


def _cheapest_reaching(
    hulls_by_size: dict[tuple[int, int], list[list[RatePoint[ShotChoice]]]],
    weights: list[float],
    quality: float,
) -> float | None:
    reaching = [
        a.bits
        for a in (allocate_quality(h, weights, quality) for h in hulls_by_size.values())
        if a.feasible
    ]
    return min(reaching) if reaching else None


def _geometric(lo: float, hi: float, n: int) -> list[float]:
    if n == 1 or hi <= lo:
        return [hi]
    ratio = math.exp(math.log(hi / lo) / (n - 1))
    return [lo * ratio**k for k in range(n - 1)] + [hi]
