"""BD-rate: the average bitrate difference between two rate-quality curves at equal quality.

Method (as JCTVC-L0242 and Netflix's `bd_rate.py` recommend for VMAF): piecewise cubic Hermite
(PCHIP) interpolation of log-rate over quality, integrated over the quality interval both curves
cover. Computed by the `bjontegaard` package; this module only prepares the curves (each must
rise in quality with rate, so it is reduced to its upper hull first) and reports the overlap.
Negative means the test curve needs fewer bits than the anchor for the same quality.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from streamplane.media.hull import RatePoint, upper_hull


@dataclass(frozen=True)
class BdRate:
    percent: float  # test vs anchor; -20.0 means 20 % fewer bits at equal quality
    overlap: float  # share of the narrower curve's quality range both curves cover (0..1)


def monotone_curve(rates: Sequence[float], qualities: Sequence[float]) -> list[tuple[float, float]]:
    hull = upper_hull([RatePoint(r, q, None) for r, q in zip(rates, qualities, strict=True)])
    return [(p.bits, p.quality) for p in hull]


def bd_rate(
    anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]
) -> BdRate | None:
    """BD-rate of `test` against `anchor`, each a sequence of (bitrate, quality).

    None when the curves cannot be compared: fewer than two hull points on either side or no
    common quality range.
    """
    import bjontegaard

    a = monotone_curve([r for r, _ in anchor], [q for _, q in anchor])
    t = monotone_curve([r for r, _ in test], [q for _, q in test])
    if len(a) < 2 or len(t) < 2:
        return None
    lo = max(a[0][1], t[0][1])
    hi = min(a[-1][1], t[-1][1])
    if hi <= lo:
        return None
    narrower = min(a[-1][1] - a[0][1], t[-1][1] - t[0][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = bjontegaard.bd_rate(
            [r for r, _ in a],
            [q for _, q in a],
            [r for r, _ in t],
            [q for _, q in t],
            method="pchip",
            require_matching_points=False,
            min_overlap=0,
        )
    return BdRate(percent=float(value), overlap=(hi - lo) / narrower if narrower > 0 else 0.0)
