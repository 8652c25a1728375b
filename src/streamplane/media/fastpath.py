"""The fast path's probes: which grid points to encode, and the rest of the grid predicted. Pure.

The fast path chooses the ladder from cheap probe encodes, then encodes only the chosen points at
the shipped preset. Most of a probe's cost does not depend on the quantiser (decoding the shot
twice, starting the encoder and libvmaf), so the lever is how many probes run. Each (shot,
resolution) is probed at a few quantisers of the grid only (three by default: both ends and the
middle); the other grid points are predicted from them with the two laws an encoder's
rate-quality curve follows over a quantiser range:

* bits fall exponentially with the quantiser (x264's CRF: about half the bits every 6 steps), so
  log(bits) is interpolated linearly in the quantiser;
* VMAF's distance to its ceiling grows exponentially with the quantiser (quality saturates at
  low quantisers), so log(101 - VMAF) is interpolated linearly too.

Between two probes this interpolates (outside them, given probes not spanning the grid, the
nearest pair's line extends). The hulls and
the ladder then see the whole grid, as the full matrix does, and only the points the rungs use
are encoded for real, at the shipped preset. `bench/encode.py` measures the BD-rate this costs
against the full matrix and the CPU it saves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from streamplane.media.title import ShotChoice

GridPoint = tuple[int, int, int, int]  # (shot, width, height, quantiser)

# VMAF's ceiling for the saturation law: one above the model's clip at 100, so that a probe
# scoring exactly 100 stays finite on the log scale.
VMAF_CEILING = 101.0


def grid_point(c: ShotChoice) -> GridPoint:
    return (c.shot, c.width, c.height, c.quantiser)


def probe_quantisers(grid: Sequence[int], count: int = 3) -> tuple[int, ...]:
    """`count` quantisers of the grid to probe, spread evenly over it with both ends among
    them, so every grid point not probed is interpolated between two probes, never
    extrapolated; a grid of `count` or fewer values is probed whole."""
    ordered = sorted(set(grid))
    if count < 2:
        raise ValueError("predicting a curve needs at least two probes per shot and resolution")
    if len(ordered) <= count:
        return tuple(ordered)
    return tuple(
        sorted({ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)})
    )


def _line(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def predict_curve(
    probes: Mapping[int, tuple[float, float]], grid: Iterable[int]
) -> dict[int, tuple[float, float]]:
    """(bits, VMAF) at every quantiser of `grid`, from `probes` = {quantiser: (bits, VMAF)} at
    two or more quantisers: measured where probed, otherwise log(bits) and log(101 - VMAF)
    linear in the quantiser between the bracketing probes (the nearest pair outside them)."""
    known = sorted(probes)
    if len(known) < 2:
        raise ValueError("predicting a curve needs probes at two or more quantisers")
    for q in known:
        bits, vmaf = probes[q]
        if bits <= 0 or not 0 <= vmaf <= 100:
            raise ValueError(f"probe at quantiser {q}: {bits} bits, VMAF {vmaf} is not an encode")
    out: dict[int, tuple[float, float]] = {}
    for q in grid:
        if q in probes:
            out[q] = probes[q]
            continue
        i = 0
        while i < len(known) - 2 and q > known[i + 1]:
            i += 1
        a, b = known[i], known[i + 1]
        log_bits = _line(a, math.log(probes[a][0]), b, math.log(probes[b][0]), q)
        gap = _line(
            a,
            math.log(VMAF_CEILING - probes[a][1]),
            b,
            math.log(VMAF_CEILING - probes[b][1]),
            q,
        )
        vmaf = min(100.0, max(0.0, VMAF_CEILING - math.exp(gap)))
        out[q] = (math.exp(log_bits), vmaf)
    return out


def predicted_grid(probes: Sequence[ShotChoice], grid: Sequence[int]) -> list[ShotChoice]:
    """Every (shot, resolution) of the probes at every quantiser of `grid`: probed points as
    measured, the others predicted (`predict_curve`)."""
    curves: dict[tuple[int, int, int], dict[int, tuple[float, float]]] = {}
    for p in probes:
        curves.setdefault((p.shot, p.width, p.height), {})[p.quantiser] = (float(p.bits), p.vmaf)
    out: list[ShotChoice] = []
    for (shot, w, h), known in sorted(curves.items()):
        if len(known) < 2:
            raise ValueError(f"shot {shot} at {w}x{h} has {len(known)} probe(s); it needs two")
        for q, (bits, vmaf) in sorted(predict_curve(known, grid).items()):
            out.append(ShotChoice(shot, w, h, q, max(1, round(bits)), round(vmaf, 4)))
    return out
