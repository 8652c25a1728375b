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

Reproduce: .venv/bin/python bench/probes.py --sources real-mix bench-mix --height 180
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table

from streamplane.media import SAMPLES, EncodeSettings, build_sample
from streamplane.media.bdrate import bd_rate
from streamplane.media.fastpath import predicted_grid, probe_quantisers
from streamplane.media.ladder import build_ladder, even
from streamplane.media.matrix import EncodeResult, run_matrix
from streamplane.media.pipeline import QuietProgress, _matrix_jobs, _plan, _quantisers
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


def measure(
    name: str,
    height: int | None,
    settings: EncodeSettings,
    work: Path,
    subsamples: list[int],
    shares: list[float],
) -> dict[str, str]:
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
    runs = [("full", 1, 1.0, grid_q), ("fast", vs, 1.0, grid_q)]
    runs += [
        ("fast", n, share, default_q)
        for share in [1.0, *shares]
        for n in subsamples
        if (n, share) != (vs, 1.0)
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

    schemes: dict[str, Scheme] = {
        "every grid point, measured (previous default)": ((vs, 1.0), lambda k: True, False),
    }
    for n in subsamples:
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
    return out


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
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("build/bench/probes"))
    args = ap.parse_args()
    print(__doc__)
    settings = EncodeSettings(
        probe_preset=args.probe_preset,
        probe_vmaf_subsample=args.subsamples[0],
        workers=args.workers,
    )
    rows = [
        measure(name, args.height, settings, args.work, args.subsamples, args.shares)
        for name in args.sources
    ]
    table = Table(title="fast path schemes: BD-rate against the full matrix, CPU as its share")
    table.add_column("scheme")
    for row in rows:
        table.add_column(f"{row['source']} ({row['shots']} shots, full {row['full CPU s']} CPU s)")
    for label in list(rows[0])[3:]:
        table.add_row(label, *(row[label] for row in rows))
    console.print(table)
    if len(rows) > 1:
        for label in [k for k in list(rows[0])[3:] if not k.endswith("CPU by part")]:
            bds = [float(row[label].split(" %")[0]) for row in rows]
            console.print(f"mean BD-rate, {label}: {statistics.mean(bds):+.2f} %")


if __name__ == "__main__":
    main()
