"""The fast path's probe schemes, replayed on real encodes of the whole grid.

Method
  For each source, the whole grid (every shot x resolution x CRF) is encoded and scored for real,
  in one run: at the shipped preset with VMAF on every frame (the full matrix), and at the probe
  preset with VMAF on every 4th frame (every probe any scheme could run); the default's probes
  are also scored on every 8th frame (--subsamples). A scheme picks which probes it runs and how
  the grid is filled from them (measured only, or the rest predicted as media/fastpath.py does);
  the ladder is chosen from that grid with the pipeline's own `build_ladder`. Its shipped rungs
  are the full matrix's encodes of the chosen points: exactly the encodes the fast path's final
  stage runs (same shot, resolution, CRF, shipped preset, VMAF on every frame), so the shipped
  curve and its BD-rate against the full matrix's ladder are the fast path's, before capped CRF
  (applied to both paths alike; its own cost is in bench/encode.py).
  CPU (ffmpeg user + system, as a share of the whole full matrix), by part as the fast path
  spends it: each shot decoded into its cut twice (once for its probes, once for its final
  encodes; one cut per shot for the full matrix), the probes' encodes and VMAF, the distinct
  chosen points' encodes and VMAF. A probe's encode is counted from the 1/4 matrix for every
  subsample (the encodes are the same bits), so schemes differ only by what they change.
  BD-rate is deterministic; CPU seconds move a little with the machine's load.
  --lowres: every resolution above the lowest is also probed at half its height (the default's
  CRFs, share and subsample), scored at that size against the reference scaled down to it, and
  mapped to the rung's size (log bits and log(101 - VMAF): an offset or a line per resolution
  and CRF, fitted on the other sources' shots, and on every source's for reference; or each
  shot's own offset measured by one probe at the rung's size at the middle CRF), the target
  being what the default's probe at the rung's size measured.
  --calibration: the default's probes put on the shipped preset's scale shot by shot
  (`calibrated_grid`): by one more probe at the shipped preset at the middle CRF (the top
  resolution or every resolution; half of each shot, VMAF on every Nth frame), or by the shipped
  encodes themselves (the ladder chosen again from the probes calibrated by every shipped-preset
  encode so far, the new points encoded, up to two rounds; optionally with the chosen points'
  CRF neighbours encoded too); probes at the shipped preset on a quarter of each shot (with
  and without re-checking) and on half of it; five probed CRFs at either preset. Diagnostics:
  the same calibration made by the full matrix's own encodes (exact, not a scheme), the
  prediction from its own points at 3, 4 and 5 CRFs (and with their VMAF or bits taken as a
  probe would), how far one calibration point is from the others, and how far a half-shot
  probe scores from the same frames of the whole shot's encode.
  --final-subsamples: the full matrix's rungs encoded once more and scored on every Nth frame
  (and on every frame), each rung's reported VMAF against every frame's, with libvmaf's CPU.

Reproduce: .venv/bin/python bench/probes.py --sources real-mix bench-mix --height 180
  .venv/bin/python bench/probes.py --sources real-mix bench-mix demo-mix --height 360 \
      --subsamples 8 --shares 0.5 --lowres --final-subsamples 2 3 4 5
  .venv/bin/python bench/probes.py --sources real-mix bench-mix demo-mix --height 360 \
      --subsamples 8 --shares 0.5 --no-grid-probes --calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from streamplane.media import SAMPLES, EncodeSettings, build_sample
from streamplane.media.bdrate import bd_rate
from streamplane.media.fastpath import (
    VMAF_CEILING,
    grid_point,
    predicted_grid,
    probe_quantisers,
)
from streamplane.media.ladder import build_ladder, even, scaled_size
from streamplane.media.matrix import EncodeResult, run_matrix
from streamplane.media.pipeline import (
    QuietProgress,
    _matrix_jobs,
    _named,
    _plan,
    _quantisers,
    segment_vmaf,
)
from streamplane.media.title import ShotChoice

console = Console(width=420)  # a column per source, into a log file
Point = tuple[int, int, int, int]


def _choice(k: Point, r: EncodeResult) -> ShotChoice:
    return ShotChoice(k[0], k[1], k[2], k[3], r.shot_bits, round(r.vmaf, 4))


def _grid(results: list[EncodeResult]) -> dict[Point, EncodeResult]:
    return {(r.job.shot, r.job.width, r.job.height, r.job.crf or 0): r for r in results}


def _cut_cpu(matrix: dict[Point, EncodeResult], shot: int) -> float:
    """The CPU of decoding `shot` into its cut for that matrix's stage (charged to one job)."""
    return sum(r.cut_cpu_seconds for k, r in matrix.items() if k[0] == shot)


@dataclasses.dataclass
class LowRes:
    """A title's probes at half the height of the rung they stand for, beside what the default
    probes measured at the rung's own size (the target of the mapping)."""

    name: str
    sizes: list[tuple[int, int]]
    default_q: tuple[int, ...]
    grid_q: tuple[int, ...]
    probes: dict[Point, EncodeResult]  # the default's probes, every resolution at its own size
    low: dict[Point, EncodeResult]  # keyed by the rung's point they stand for
    full: dict[Point, EncodeResult]
    full_cpu: float
    ship: Callable[[list[ShotChoice]], tuple[list[tuple[float, float]], set[Point]]]
    full_curve: list[tuple[float, float]]


def _gap(vmaf: float) -> float:
    return math.log(VMAF_CEILING - vmaf)


Fit = dict[tuple[int, int], tuple[float, float, float, float]]  # (level, q): bits a, b; gap a, b


def fit_mapping(titles: Sequence[LowRes], linear: bool) -> Fit:
    """log(rung bits) and log(101 - rung VMAF) from the half-height probe's, per resolution level
    (0 = the top) and CRF, over every shot of `titles`: an offset (the median difference), or a
    least-squares line."""
    pairs: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
    for t in titles:
        for k, r in t.low.items():
            level = t.sizes.index((k[1], k[2]))
            target = t.probes[k]
            pairs.setdefault((level, k[3]), []).append(
                (
                    math.log(r.shot_bits),
                    math.log(target.shot_bits),
                    _gap(r.vmaf),
                    _gap(target.vmaf),
                )
            )

    def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
        if not linear or len(xs) < 3 or statistics.pvariance(xs) == 0:
            return statistics.median(y - x for x, y in zip(xs, ys, strict=True)), 1.0
        slope, intercept = statistics.linear_regression(xs, ys)
        return intercept, slope

    fit: Fit = {}
    for key, ps in pairs.items():
        ba, bb = line([p[0] for p in ps], [p[1] for p in ps])
        va, vb = line([p[2] for p in ps], [p[3] for p in ps])
        fit[key] = (ba, bb, va, vb)
    return fit


def calibrated_grid(
    points: Sequence[ShotChoice],
    shipped: dict[Point, tuple[float, float]],
    vmaf_shift: str = "gap",
) -> list[ShotChoice]:
    """`points` (the probe preset's grid, probed and predicted) moved onto the shipped preset's
    scale by encodes at that preset, `shipped` = {grid point: (bits, VMAF)}: each (shot,
    resolution) by its own differences at its shipped points, in log(bits) and in VMAF
    (`vmaf_shift`: "gap", log(101 - VMAF), the scale fastpath.py predicts on; "points", VMAF
    itself; "none", bits only), interpolated linearly in the quantiser between them and
    constant beyond; a resolution of a shot with none takes the mean of the shot's other
    resolutions' differences at that quantiser; a shot with none stays as probed. Points
    measured at the shipped preset stand as measured."""

    def scale(vmaf: float) -> float:
        return _gap(vmaf) if vmaf_shift == "gap" else vmaf

    def unscale(x: float) -> float:
        return VMAF_CEILING - math.exp(x) if vmaf_shift == "gap" else x

    probed = {grid_point(c): c for c in points}
    differences: dict[tuple[int, int, int], list[tuple[int, float, float]]] = {}
    for k, (bits, vmaf) in shipped.items():
        if k in probed:
            p = probed[k]
            d_vmaf = 0.0 if vmaf_shift == "none" else scale(vmaf) - scale(p.vmaf)
            differences.setdefault(k[:3], []).append(
                (k[3], math.log(bits) - math.log(p.bits), d_vmaf)
            )
    for ds in differences.values():
        ds.sort()

    def at(ds: list[tuple[int, float, float]], q: int) -> tuple[float, float]:
        if q <= ds[0][0]:
            return ds[0][1], ds[0][2]
        for (q0, b0, g0), (q1, b1, g1) in itertools.pairwise(ds):
            if q <= q1:
                t = (q - q0) / (q1 - q0)
                return b0 + t * (b1 - b0), g0 + t * (g1 - g0)
        return ds[-1][1], ds[-1][2]

    out: list[ShotChoice] = []
    for c in points:
        k = grid_point(c)
        if k in shipped:
            bits, vmaf = shipped[k]
            out.append(ShotChoice(*k, max(1, round(bits)), round(vmaf, 4)))
            continue
        own = differences.get(k[:3])
        if own:
            d_bits, d_vmaf = at(own, c.quantiser)
        else:
            others = [at(ds, c.quantiser) for s, ds in differences.items() if s[0] == c.shot]
            if not others:
                out.append(c)
                continue
            d_bits = statistics.mean(d[0] for d in others)
            d_vmaf = statistics.mean(d[1] for d in others)
        bits = math.exp(math.log(c.bits) + d_bits)
        vmaf = min(100.0, max(0.0, unscale(scale(c.vmaf) + d_vmaf)))
        out.append(ShotChoice(*k, max(1, round(bits)), round(vmaf, 4)))
    return out


Ship = Callable[[list[ShotChoice]], tuple[list[tuple[float, float]], set[Point]]]


def calibration_rows(
    source: Path,
    plan: Any,
    settings: EncodeSettings,
    title_work: Path,
    matrices: dict[tuple[int, float], dict[Point, EncodeResult]],
    full: dict[Point, EncodeResult],
    grid_q: tuple[int, ...],
    default_q: tuple[int, ...],
    sizes: list[tuple[int, int]],
    ship: Ship,
    full_curve: list[tuple[float, float]],
) -> dict[str, tuple[float, dict[str, float]]]:
    """The default's probes (`veryfast`, half of each shot, VMAF 1/8) put on the shipped
    preset's scale shot by shot, and probes at the shipped preset itself."""
    vs, share = settings.probe_vmaf_subsample, 0.5
    fast = matrices[(vs, share)]
    middle = default_q[len(default_q) // 2]

    def shipped_matrix(
        share: float, qs: tuple[int, ...], preset: str | None = None
    ) -> dict[Point, EncodeResult]:
        s = msgspec.structs.replace(
            settings,
            mode="fast",
            probe_preset=preset or settings.preset,
            probe_vmaf_subsample=vs,
            probe_share=share,
        )
        jobs = _matrix_jobs(
            source, plan.info, plan.shots, plan.segments, title_work / "m", s, False, qs
        )
        outcome = run_matrix(jobs, title_work / "results", workers=settings.workers or None)
        return _grid([outcome.results[j.key] for j in jobs])

    at_middle = shipped_matrix(share, (middle,))
    quarter = shipped_matrix(0.25, default_q)
    veryfast = [_choice(k, r) for k, r in fast.items() if k[3] in default_q]
    base = predicted_grid(veryfast, grid_q)
    step = {q: i for i, q in enumerate(grid_q)}

    def run(
        probe_runs: list[EncodeResult],
        cut_from: dict[Point, EncodeResult],
        known: dict[Point, tuple[float, float]],
        base: list[ShotChoice],
        rounds: int,
        neighbours: bool,
        vmaf_shift: str = "gap",
    ) -> tuple[float, dict[str, float]]:
        """Ship the ladder chosen from `base` calibrated by `known`; then, for `rounds` more
        rounds, calibrate by every shipped-preset encode made so far (the chosen points', and
        with `neighbours` their neighbours' on the CRF grid) and choose again, encoding the
        new points."""
        grid = calibrated_grid(base, known, vmaf_shift) if known else base
        curve, used = ship(grid)
        encoded = set(used)
        cut_rounds = [{k[0] for k in used}]
        if neighbours:
            extra = {
                (k[0], k[1], k[2], grid_q[j])
                for k in used
                for j in (step[k[3]] - 1, step[k[3]] + 1)
                if 0 <= j < len(grid_q)
            } - encoded
            encoded |= extra
        for _ in range(rounds):
            measured = known | {k: (full[k].shot_bits, full[k].vmaf) for k in encoded}
            curve, used = ship(calibrated_grid(base, measured, vmaf_shift))
            new = used - encoded
            if not new:
                break
            encoded |= new
            cut_rounds.append({k[0] for k in new})
        cpu = {
            "cut": sum(_cut_cpu(cut_from, s) for s in {k[0] for k in cut_from})
            + sum(_cut_cpu(full, s) for r in cut_rounds for s in r),
            "probe encode": sum(r.encode_cpu_seconds for r in probe_runs),
            "probe VMAF": sum(r.vmaf_cpu_seconds for r in probe_runs),
            "final encode": sum(full[k].encode_cpu_seconds for k in encoded),
            "final VMAF": sum(full[k].vmaf_cpu_seconds for k in encoded),
            "probes": len(probe_runs),
            "shipped": len(encoded),
        }
        bd = bd_rate(full_curve, curve)
        return (bd.percent if bd else float("nan")), cpu

    top = sizes[0]
    vf_runs = [fast[k] for k in fast if k[3] in default_q]
    mid_top = {k: r for k, r in at_middle.items() if (k[1], k[2]) == top}

    def pts(m: dict[Point, EncodeResult]) -> dict[Point, tuple[float, float]]:
        return {k: (float(r.shot_bits), r.vmaf) for k, r in m.items()}

    rows: dict[str, tuple[float, dict[str, float]]] = {}
    rows["default, shipped encodes re-checked: calibrated by them, chosen again (2 rounds)"] = run(
        vf_runs, fast, {}, base, 2, False
    )
    rows["default, shipped encodes and their CRF neighbours re-checked (2 rounds)"] = run(
        vf_runs, fast, {}, base, 2, True
    )
    rows[f"+ a `{settings.preset}` probe at CRF {middle}, top resolution, per shot"] = run(
        [*vf_runs, *mid_top.values()], fast, pts(mid_top), base, 0, False
    )
    rows[f"+ a `{settings.preset}` probe at CRF {middle}, every resolution, per shot"] = run(
        [*vf_runs, *at_middle.values()], fast, pts(at_middle), base, 0, False
    )
    rows[f"+ a `{settings.preset}` probe at CRF {middle}, every resolution, re-checked"] = run(
        [*vf_runs, *at_middle.values()], fast, pts(at_middle), base, 2, False
    )
    rows[f"`{settings.preset}` probes on a quarter of each shot, VMAF 1/{vs}"] = run(
        list(quarter.values()),
        quarter,
        {},
        predicted_grid([_choice(k, r) for k, r in quarter.items()], grid_q),
        0,
        False,
    )
    rows[f"`{settings.preset}` probes on a quarter of each shot, re-checked"] = run(
        list(quarter.values()),
        quarter,
        {},
        predicted_grid([_choice(k, r) for k, r in quarter.items()], grid_q),
        2,
        False,
    )
    half = shipped_matrix(share, default_q)
    rows[f"`{settings.preset}` probes on half of each shot, VMAF 1/{vs}"] = run(
        list(half.values()),
        half,
        {},
        predicted_grid([_choice(k, r) for k, r in half.items()], grid_q),
        0,
        False,
    )
    five = probe_quantisers(grid_q, 5)
    for preset in (settings.probe_preset, settings.preset):
        m = shipped_matrix(share, five, preset)
        rows[f"`{preset}` probes at CRFs {five} on half of each shot, VMAF 1/{vs}"] = run(
            list(m.values()),
            fast,
            {},
            predicted_grid([_choice(k, r) for k, r in m.items()], grid_q),
            0,
            False,
        )
    rows[f"`{settings.preset}` probes on a quarter of each shot, re-checked once"] = run(
        list(quarter.values()),
        quarter,
        {},
        predicted_grid([_choice(k, r) for k, r in quarter.items()], grid_q),
        1,
        False,
    )
    # diagnostics (their CPU is not a scheme's): the calibration made by the full matrix's own
    # encodes, whole shots scored on every frame, instead of probes at the shipped preset
    whole = pts(full)
    rows[f"diagnostic: calibrated by the full matrix's own CRF {middle} encodes"] = run(
        vf_runs, fast, {k: v for k, v in whole.items() if k[3] == middle}, base, 0, False
    )
    rows[f"diagnostic: calibrated by the full matrix's own encodes at CRFs {default_q}"] = run(
        vf_runs, fast, {k: v for k, v in whole.items() if k[3] in default_q}, base, 0, False
    )
    # the prediction's floor with more probed CRFs: the full matrix's own encodes at 4 and 5
    # CRFs, the rest of the grid predicted from them alone
    for count in (4, 5):
        qs = probe_quantisers(grid_q, count)
        rows[f"diagnostic: predicted from the full matrix's own encodes at CRFs {qs}"] = run(
            [],
            fast,
            {},
            predicted_grid([_choice(k, r) for k, r in full.items() if k[3] in qs], grid_q),
            0,
            False,
        )
    rows[f"diagnostic: predicted from the full matrix's own encodes at CRFs {default_q}"] = run(
        [],
        fast,
        {},
        predicted_grid([_choice(k, r) for k, r in full.items() if k[3] in default_q], grid_q),
        0,
        False,
    )

    # bench-mix's gap split further, from the full matrix's own three points: their VMAF from
    # every 8th frame, from the probes' middle frames, and their bits from the half-shot
    # `medium` probes (everything else as measured on whole shots)
    def variant(r: EncodeResult, k: Point, part: str) -> ShotChoice:
        c = _choice(k, r)
        frames = r.frame_vmaf
        span = half[k].job.span
        if part == "VMAF 1/8" and frames:
            return msgspec.structs.replace(c, vmaf=round(statistics.mean(frames[::vs]), 4))
        if part == "VMAF of the probes' frames" and frames and span:
            return msgspec.structs.replace(
                c, vmaf=round(statistics.mean(frames[span[0] : span[1]]), 4)
            )
        if part == "bits of the half-shot probes":
            return msgspec.structs.replace(c, bits=half[k].shot_bits)
        if part == "both" and frames and span:
            return msgspec.structs.replace(
                c,
                bits=half[k].shot_bits,
                vmaf=round(statistics.mean(frames[span[0] : span[1]]), 4),
            )
        return c

    parts = ("VMAF 1/8", "VMAF of the probes' frames", "bits of the half-shot probes", "both")
    for part in parts:
        rows[f"diagnostic: the full matrix's own CRFs {default_q}, {part}"] = run(
            [],
            fast,
            {},
            predicted_grid(
                [variant(r, k, part) for k, r in full.items() if k[3] in default_q], grid_q
            ),
            0,
            False,
        )
    for shift in ("points", "none"):
        how = "VMAF shifted in points" if shift == "points" else "bits only"
        rows[f"+ a `{settings.preset}` probe at CRF {middle}, every resolution, {how}"] = run(
            [*vf_runs, *at_middle.values()], fast, pts(at_middle), base, 0, False, shift
        )
        rows[f"diagnostic: calibrated by the full matrix's own CRF {middle}, {how}"] = run(
            vf_runs, fast, {k: v for k, v in whole.items() if k[3] == middle}, base, 0, False, shift
        )
    # a probe is its own encode of the shot's middle frames: its VMAF against the same frames,
    # at the same stride, of the whole shot's encode at the same point
    for q in default_q:
        gaps = sorted(
            r.vmaf - statistics.mean(full[k].frame_vmaf[span[0] : span[1]][::vs])
            for k, r in half.items()
            if k[3] == q and (span := r.job.span) and full[k].frame_vmaf
        )
        if gaps:
            console.print(
                f"{title_work.name} CRF {q}: the half-shot `{settings.preset}` probe's VMAF "
                f"against the same frames of the whole shot's encode (min / median / max over "
                f"{len(gaps)}): {gaps[0]:+.1f} / {statistics.median(gaps):+.1f} / {gaps[-1]:+.1f}"
            )
    # how far one calibration point is from the others: each (shot, resolution)'s probe at
    # CRF q calibrated by its shipped-preset difference at the middle CRF, against the full
    # matrix's encode at q (bits in %, VMAF in points)
    for name, cal in (("the full matrix's", whole), ("the half-shot probe's", pts(at_middle))):
        for q in default_q:
            bits_err, vmaf_err = [], []
            for (shot, w, h, qq), r in fast.items():
                if qq != q:
                    continue
                ref = (shot, w, h, middle)
                d_bits = math.log(cal[ref][0]) - math.log(fast[ref].shot_bits)
                d_gap = _gap(cal[ref][1]) - _gap(fast[ref].vmaf)
                bits = r.shot_bits * math.exp(d_bits)
                vmaf = VMAF_CEILING - math.exp(_gap(r.vmaf) + d_gap)
                truth = full[(shot, w, h, q)]
                bits_err.append(100 * (bits / truth.shot_bits - 1))
                vmaf_err.append(vmaf - truth.vmaf)
            raw_bits = [
                100 * (r.shot_bits / full[k].shot_bits - 1) for k, r in fast.items() if k[3] == q
            ]
            raw_vmaf = [r.vmaf - full[k].vmaf for k, r in fast.items() if k[3] == q]

            def span(xs: list[float]) -> str:
                xs = sorted(xs)
                return f"{xs[0]:+.1f} / {statistics.median(xs):+.1f} / {xs[-1]:+.1f}"

            console.print(
                f"{title_work.name} CRF {q}: the probe against the shipped preset's encode "
                f"(min / median / max over {len(raw_bits)} shot x resolution): bits "
                f"{span(raw_bits)} %, VMAF {span(raw_vmaf)}; calibrated by {name} CRF "
                f"{middle}: bits {span(bits_err)} %, VMAF {span(vmaf_err)}"
            )
    return rows


def lowres_row(
    t: LowRes, fit: Fit, levels: int, calibrate: int | None = None
) -> tuple[float, dict[str, float]]:
    """BD-rate and CPU of the scheme: the top `levels` resolutions from their half-height
    probes mapped by `fit`, the others probed at their own size as the default does. With
    `calibrate`, the mapped resolutions are also probed at their own size at that CRF, and
    each shot's half-height probes are mapped by that shot's own offsets there instead."""
    mapped = set(t.sizes[:levels])
    measured = [
        k
        for k in t.probes
        if (k[1], k[2]) not in mapped or (calibrate is not None and k[3] == calibrate)
    ]
    points = [_choice(k, t.probes[k]) for k in measured]
    low = {k: r for k, r in t.low.items() if (k[1], k[2]) in mapped}
    for k, r in low.items():
        if calibrate is not None:
            if k[3] == calibrate:
                continue
            at = (k[0], k[1], k[2], calibrate)
            own, half = t.probes[at], t.low[at]
            ba, bb = math.log(own.shot_bits) - math.log(half.shot_bits), 1.0
            va, vb = _gap(own.vmaf) - _gap(half.vmaf), 1.0
        else:
            ba, bb, va, vb = fit[(t.sizes.index((k[1], k[2])), k[3])]
        bits = math.exp(ba + bb * math.log(r.shot_bits))
        vmaf = min(100.0, max(0.0, VMAF_CEILING - math.exp(va + vb * _gap(r.vmaf))))
        points.append(ShotChoice(k[0], k[1], k[2], k[3], max(1, round(bits)), round(vmaf, 4)))
    curve, used = t.ship(predicted_grid(points, t.grid_q))
    bd = bd_rate(t.full_curve, curve)
    runs = [*(t.probes[k] for k in measured), *low.values()]
    cpu = {
        "cut": sum(r.cut_cpu_seconds for r in runs)
        + sum(_cut_cpu(t.full, s) for s in {k[0] for k in used}),
        "probe encode": sum(r.encode_cpu_seconds for r in runs),
        "probe VMAF": sum(r.vmaf_cpu_seconds for r in runs),
        "final encode": sum(t.full[k].encode_cpu_seconds for k in used),
        "final VMAF": sum(t.full[k].vmaf_cpu_seconds for k in used),
        "probes": len(runs),
        "shipped": len(used),
    }
    return (bd.percent if bd else float("nan")), cpu


def final_vmaf_subsamples(
    plan: Any,
    settings: EncodeSettings,
    title_work: Path,
    full: dict[Point, EncodeResult],
    subsamples: Sequence[int],
    full_cpu: float,
) -> dict[str, str]:
    """The full matrix's shipped rungs scored on every Nth frame: one encode of each chosen
    point, scored at every subsample in turn, and how far each rung's reported mean and
    harmonic-mean VMAF and its segments' VMAF move against every frame, with the VMAF CPU."""
    frames = [s.n_frames for s in plan.shots]
    ladder = build_ladder(
        [_choice(k, r) for k, r in full.items()],
        frames,
        settings.rungs,
        settings.top_quality,
        settings.bottom_quality,
    )
    keys = sorted(
        {(c.shot, c.width, c.height, c.quantiser) for r in ladder.rungs for c in r.choices}
    )
    scored: dict[int, dict[Point, EncodeResult]] = {}
    for n in sorted({1, *subsamples}):
        jobs = {
            k: msgspec.structs.replace(
                full[k].job,
                vmaf_subsample=n,
                keep_output=True,
                output=str(title_work / "final" / f"{full[k].job.key}.mp4"),
            )
            for k in keys
        }
        outcome = run_matrix(
            list(jobs.values()), title_work / "results", workers=settings.workers or None
        )
        scored[n] = {k: outcome.results[j.key] for k, j in jobs.items()}
    out: dict[str, str] = {}
    total = sum(frames)
    for n in sorted(scored):
        cpu = sum(r.vmaf_cpu_seconds for r in scored[n].values())
        out[f"final VMAF 1/{n}: CPU"] = f"{cpu:.1f} s = {100 * cpu / full_cpu:.1f} % of full"
    for i, rung in enumerate(ladder.rungs):
        ks = [(c.shot, c.width, c.height, c.quantiser) for c in rung.choices]

        def report(n: int, ks: list[Point] = ks) -> tuple[float, float, list[float]]:
            rs = {k[0]: scored[n][k] for k in ks}
            mean = sum(rs[s].vmaf * frames[s] for s in rs) / total
            hmean = total / sum(frames[s] / (1 + rs[s].vmaf_harmonic) for s in rs) - 1
            segs = [segment_vmaf(rs[g.shot], g, plan.shots[g.shot]) for g in plan.segments]
            return mean, hmean, segs

        m1, h1, s1 = report(1)
        cells = [f"{rung.height}p VMAF {m1:.2f} hmean {h1:.2f}"]
        for n in sorted(scored)[1:]:
            m, h, sg = report(n)
            worst = max(abs(a - b) for a, b in zip(sg, s1, strict=True))
            # the same frames picked from the every-frame scores: what subsampling alone moves,
            # apart from libvmaf's motion feature taken across the skipped frames
            picked = (
                sum(statistics.mean(scored[1][k].frame_vmaf[::n]) * frames[k[0]] for k in ks)
                / total
            )
            cells.append(
                f"1/{n}: mean {m - m1:+.2f} hmean {h - h1:+.2f} worst segment {worst:.2f}"
                f" (every {n}th of the every-frame scores: mean {picked - m1:+.2f})"
            )
        out[f"final VMAF rung {i + 1}"] = "; ".join(cells)
    return out


def measure(
    name: str,
    height: int | None,
    settings: EncodeSettings,
    work: Path,
    subsamples: list[int],
    shares: list[float],
    grid_probes: bool = True,
    lowres: bool = False,
    final_subsamples: Sequence[int] = (),
    calibration: bool = False,
) -> tuple[dict[str, str], LowRes | None]:
    if height:
        full = SAMPLES[name]
        name = f"{name}-{height}p"
        SAMPLES[name] = dataclasses.replace(
            full, name=name, width=even(full.width * height / full.height), height=height
        )
    source = build_sample(name, work / "samples")
    title_work = work / name
    title_work.mkdir(parents=True, exist_ok=True)
    plan = _plan(source, title_work, settings, QuietProgress())
    grid_q = _quantisers(settings)
    default_q = probe_quantisers(grid_q, settings.probe_count)
    # (mode, VMAF subsample, share of each shot's frames, quantisers): the full matrix, every
    # probe at the first subsample, and the default probes at every other subsample and share
    vs = settings.probe_vmaf_subsample
    runs = [("full", 1, 1.0, grid_q)]
    if grid_probes:
        runs.append(("fast", vs, 1.0, grid_q))
    runs += [
        ("fast", n, share, default_q)
        for share in ([1.0, *shares] if grid_probes else shares)
        for n in subsamples
        if (n, share) != (vs, 1.0) or not grid_probes
    ]
    matrices: dict[tuple[int, float], dict[Point, EncodeResult]] = {}
    for mode, subsample, share, qs in runs:
        s = msgspec.structs.replace(
            settings, mode=mode, probe_vmaf_subsample=subsample, probe_share=share
        )
        jobs = _matrix_jobs(
            source, plan.info, plan.shots, plan.segments, title_work / "m", s, False, qs
        )
        outcome = run_matrix(jobs, title_work / "results", workers=settings.workers or None)
        key = (0, 1.0) if mode == "full" else (subsample, share)
        matrices[key] = _grid([outcome.results[j.key] for j in jobs])
    full = matrices[(0, 1.0)]
    frames = [s.n_frames for s in plan.shots]
    duration = plan.info.duration_s
    full_cpu = sum(r.cpu_seconds for r in full.values())
    sizes = sorted({(k[1], k[2]) for k in full}, key=lambda wh: -wh[1])

    def ship(points: list[ShotChoice]) -> tuple[list[tuple[float, float]], set[Point]]:
        ladder = build_ladder(
            points, frames, settings.rungs, settings.top_quality, settings.bottom_quality
        )
        curve, used = [], set()
        for rung in ladder.rungs:
            keys = [(c.shot, c.width, c.height, c.quantiser) for c in rung.choices]
            used |= set(keys)
            bits = sum(full[k].bits for k in keys)
            vmaf = sum(full[k].vmaf * frames[k[0]] for k in keys) / sum(frames)
            curve.append((bits / duration, vmaf))
        return curve, used

    full_curve, _ = ship([_choice(k, r) for k, r in full.items()])

    # (subsample, share), which probes, predict the rest?
    Scheme = tuple[tuple[int, float], Callable[[Point], bool], bool]
    ends_pruned = {sizes[0]: (18, 30), sizes[-1]: (30, 42)}

    def pruned(k: Point) -> bool:
        return k[3] in ends_pruned.get((k[1], k[2]), default_q)

    schemes: dict[str, Scheme] = {}
    if grid_probes:
        schemes["every grid point, measured (previous default)"] = (
            (vs, 1.0),
            lambda k: True,
            False,
        )
    for n in subsamples if grid_probes else []:
        schemes[f"{len(default_q)} CRFs {default_q}, rest predicted, VMAF 1/{n}"] = (
            (n, 1.0),
            lambda k: k[3] in default_q,
            True,
        )
        schemes[f"same, top resolution (18, 30), bottom (30, 42), VMAF 1/{n}"] = (
            (n, 1.0),
            pruned,
            True,
        )
    for share in shares:
        for n in subsamples:
            schemes[
                f"{len(default_q)} CRFs, rest predicted, VMAF 1/{n}, {share:g} of each shot"
            ] = (
                (n, share),
                lambda k: k[3] in default_q,
                True,
            )
    rows: dict[str, tuple[float, dict[str, float]]] = {}
    for label, ((subsample, share), wanted, predict) in schemes.items():
        probes = matrices[(subsample, share)]
        run = {k for k in probes if wanted(k)}
        points = [_choice(k, probes[k]) for k in run]
        curve, used = ship(predicted_grid(points, grid_q) if predict else points)
        bd = bd_rate(full_curve, curve)
        # A probe's encode (and its shot's cut) is the same whatever frames VMAF scores (the
        # bits are identical), so it is counted from one matrix for every scheme: the schemes
        # then differ only by what they change, not by the load at the time each ran.
        encodes = matrices[(vs, share)]
        cpu = {
            "cut": sum(_cut_cpu(encodes, s) for s in {k[0] for k in run})
            + sum(_cut_cpu(full, s) for s in {k[0] for k in used}),
            "probe encode": sum(encodes[k].encode_cpu_seconds for k in run),
            "probe VMAF": sum(probes[k].vmaf_cpu_seconds for k in run),
            "final encode": sum(full[k].encode_cpu_seconds for k in used),
            "final VMAF": sum(full[k].vmaf_cpu_seconds for k in used),
            "probes": len(run),
            "shipped": len(used),
        }
        rows[label] = (bd.percent if bd else float("nan"), cpu)

    if calibration:
        rows.update(
            calibration_rows(
                source,
                plan,
                settings,
                title_work,
                matrices,
                full,
                grid_q,
                default_q,
                sizes,
                ship,
                full_curve,
            )
        )

    def share(cpu: dict[str, float]) -> float:
        return 100 * sum(v for k, v in cpu.items() if k not in ("probes", "shipped")) / full_cpu

    out = {"source": name, "shots": str(len(plan.shots)), "full CPU s": f"{full_cpu:.0f}"}
    for label, (bd, cpu) in rows.items():
        out[label] = (
            f"{bd:+.2f} % at {share(cpu):.0f} % CPU ({cpu['probes']:.0f} probes, "
            f"{cpu['shipped']:.0f} shipped)"
        )
    # where the CPU goes: each part of each scheme as a share of the full matrix
    for label, (_, cpu) in rows.items():
        out[f"{label}: CPU by part"] = "  ".join(
            f"{part} {100 * v / full_cpu:.1f}"
            for part, v in cpu.items()
            if part not in ("probes", "shipped")
        )
    low = None
    if lowres:
        low_share = shares[0] if shares else 1.0
        # every resolution above the lowest probed at half its height, scored at that size
        half = {wh: scaled_size(wh[0], wh[1], wh[1] // 2) for wh in sizes[:-1]}
        low_jobs = {
            (j.shot, j.width, j.height, j.crf or 0): _named(
                msgspec.structs.replace(
                    j,
                    width=half[(j.width, j.height)][0],
                    height=half[(j.width, j.height)][1],
                    vmaf_at_encode_size=True,
                ),
                title_work / "m",
            )
            for j in _matrix_jobs(
                source,
                plan.info,
                plan.shots,
                plan.segments,
                title_work / "m",
                msgspec.structs.replace(
                    settings, mode="fast", probe_vmaf_subsample=vs, probe_share=low_share
                ),
                False,
                default_q,
            )
            if (j.width, j.height) in half
        }
        outcome = run_matrix(
            list(low_jobs.values()), title_work / "results", workers=settings.workers or None
        )
        low = LowRes(
            name=name,
            sizes=sizes,
            default_q=default_q,
            grid_q=grid_q,
            probes=matrices[(vs, low_share)],
            low={k: outcome.results[j.key] for k, j in low_jobs.items()},
            full=full,
            full_cpu=full_cpu,
            ship=ship,
            full_curve=full_curve,
        )
    if final_subsamples:
        out.update(
            final_vmaf_subsamples(plan, settings, title_work, full, final_subsamples, full_cpu)
        )
    return out, low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=["real-mix", "bench-mix", "demo-mix"])
    ap.add_argument("--height", type=int, help="build the sources at this height")
    ap.add_argument("--probe-preset", default="veryfast")
    ap.add_argument(
        "--subsamples",
        type=int,
        nargs="*",
        default=[4, 8],
        help="VMAF on every Nth frame for the probes (the first is the default's)",
    )
    ap.add_argument(
        "--shares",
        type=float,
        nargs="*",
        default=[0.5, 0.25],
        help="probes of part of each shot: this share of its frames, from its middle",
    )
    ap.add_argument(
        "--no-grid-probes",
        action="store_true",
        help="skip probing every grid point of whole shots (and the schemes that need it)",
    )
    ap.add_argument(
        "--lowres",
        action="store_true",
        help="also probe every resolution above the lowest at half its height (the first "
        "subsample and share), mapped to the rung's size by relations fitted on the other "
        "sources (and, for reference, on all of them)",
    )
    ap.add_argument(
        "--final-subsamples",
        type=int,
        nargs="*",
        default=[],
        help="score the full matrix's shipped rungs on every Nth frame too, against every frame",
    )
    ap.add_argument(
        "--calibration",
        action="store_true",
        help="also replay the probes put on the shipped preset's scale, shot by shot: by a "
        "probe at the shipped preset at the middle CRF, by probes at the shipped preset on a "
        "quarter of each shot, and by the shipped encodes themselves (the ladder re-chosen)",
    )
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("build/bench/probes"))
    args = ap.parse_args()
    print(__doc__)
    settings = EncodeSettings(
        probe_preset=args.probe_preset,
        probe_vmaf_subsample=args.subsamples[0],
        workers=args.workers,
    )
    measured = [
        measure(
            name,
            args.height,
            settings,
            args.work,
            args.subsamples,
            args.shares,
            grid_probes=not args.no_grid_probes,
            lowres=args.lowres,
            final_subsamples=args.final_subsamples,
            calibration=args.calibration,
        )
        for name in args.sources
    ]
    rows = [out for out, _ in measured]
    lows = [low for _, low in measured if low is not None]
    for linear in (False, True) if lows else ():
        fit_kind = "a line" if linear else "an offset"
        for row, t in zip(rows, lows, strict=True):
            others = [o for o in lows if o is not t]
            fits = {"the other sources": others, "every source": lows} if others else {}
            fits.setdefault("every source", lows)
            for (on, titles), levels in itertools.product(fits.items(), (1, len(t.sizes) - 1)):
                bd, cpu = lowres_row(t, fit_mapping(titles, linear), levels)
                which = "the top resolution" if levels == 1 else "all but the lowest"
                label = f"half-height probes for {which}, {fit_kind} fitted on {on}"
                total = sum(v for k, v in cpu.items() if k not in ("probes", "shipped"))
                row[label] = (
                    f"{bd:+.2f} % at {100 * total / t.full_cpu:.0f} % CPU ({cpu['probes']:.0f} "
                    f"probes, {cpu['shipped']:.0f} shipped)"
                )
                row[f"{label}: CPU by part"] = "  ".join(
                    f"{part} {100 * v / t.full_cpu:.1f}"
                    for part, v in cpu.items()
                    if part not in ("probes", "shipped")
                )
    for row, t in zip(rows, lows, strict=True) if lows else ():
        middle = t.default_q[len(t.default_q) // 2]
        for levels in (1, len(t.sizes) - 1):
            bd, cpu = lowres_row(t, {}, levels, calibrate=middle)
            which = "the top resolution" if levels == 1 else "all but the lowest"
            label = f"half-height probes for {which}, each shot's offset measured at CRF {middle}"
            total = sum(v for k, v in cpu.items() if k not in ("probes", "shipped"))
            row[label] = (
                f"{bd:+.2f} % at {100 * total / t.full_cpu:.0f} % CPU ({cpu['probes']:.0f} "
                f"probes, {cpu['shipped']:.0f} shipped)"
            )
    table = Table(title="fast path schemes: BD-rate against the full matrix, CPU as its share")
    table.add_column("scheme")
    for row in rows:
        table.add_column(f"{row['source']} ({row['shots']} shots, full {row['full CPU s']} CPU s)")
    for label in list(rows[0])[3:]:
        table.add_row(label, *(row[label] for row in rows))
    console.print(table)
    if len(rows) > 1:
        for label in [k for k in list(rows[0])[3:] if " % at " in rows[0][k]]:
            bds = [float(row[label].split(" %")[0]) for row in rows]
            console.print(f"mean BD-rate, {label}: {statistics.mean(bds):+.2f} %")


if __name__ == "__main__":
    main()
