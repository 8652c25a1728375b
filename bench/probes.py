"""The fast path's probe schemes, replayed on real encodes of the whole grid.

Method
  For each source, two matrices are encoded and scored for real (every shot x resolution x CRF
  of the grid), in one run: at the shipped preset with VMAF on every frame (the full matrix),
  and at the probe preset with VMAF on every 4th frame (every probe any scheme could run).
  A scheme picks which probes it runs and how the grid is filled from them (measured only, or
  the rest predicted as media/fastpath.py does); the ladder is chosen from that grid with the
  pipeline's own `build_ladder`. Its shipped rungs are the full matrix's encodes of the chosen
  points: exactly the encodes the fast path's final stage runs (same shot, resolution, CRF,
  shipped preset, VMAF on every frame), so the shipped curve and its BD-rate against the full
  matrix's ladder are the fast path's, before capped CRF (applied to both paths alike; its own
  cost is in bench/encode.py). CPU: the recorded CPU seconds (ffmpeg user + system) of the
  probes the scheme runs and of its distinct chosen points, against the whole full matrix.
  BD-rate is deterministic; CPU seconds move a little with the machine's load.

Reproduce: .venv/bin/python bench/probes.py --sources real-mix bench-mix demo-mix --height 180
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

console = Console(width=300)
Point = tuple[int, int, int, int]


def _choice(k: Point, r: EncodeResult) -> ShotChoice:
    return ShotChoice(k[0], k[1], k[2], k[3], r.bits, round(r.vmaf, 4))


def _grid(results: list[EncodeResult]) -> dict[Point, EncodeResult]:
    return {(r.job.shot, r.job.width, r.job.height, r.job.crf or 0): r for r in results}


def measure(name: str, height: int | None, settings: EncodeSettings, work: Path) -> dict[str, str]:
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
    matrices = {}
    for label, mode in (("full", "full"), ("probes", "fast")):
        s = msgspec.structs.replace(settings, mode=mode)
        jobs = _matrix_jobs(
            source, plan.info, plan.shots, plan.segments, title_work / "m", s, False, grid_q
        )
        outcome = run_matrix(jobs, title_work / "results", workers=settings.workers or None)
        matrices[label] = _grid([outcome.results[j.key] for j in jobs])
    full, probes = matrices["full"], matrices["probes"]
    frames = [s.n_frames for s in plan.shots]
    duration = plan.info.duration_s
    full_cpu = sum(r.cpu_seconds for r in full.values())

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

    def measured(qs: tuple[int, ...]) -> tuple[list[ShotChoice], set[Point]]:
        run = {k for k in probes if k[3] in qs}
        return [_choice(k, probes[k]) for k in run], run

    def predicted(qs: tuple[int, ...]) -> tuple[list[ShotChoice], set[Point]]:
        points, run = measured(qs)
        return predicted_grid(points, grid_q), run

    every_other = tuple(sorted(grid_q)[::2])
    schemes: dict[str, Callable[[], tuple[list[ShotChoice], set[Point]]]] = {
        "every grid point, measured (previous default)": lambda: measured(tuple(grid_q)),
        f"{len(every_other)} CRFs {every_other}, measured only": lambda: measured(every_other),
    }
    inner = tuple(sorted(grid_q)[1:-1])
    for qs in (
        every_other,
        probe_quantisers(grid_q, 3),
        probe_quantisers(inner, 3),
        probe_quantisers(grid_q, 2),
        probe_quantisers(inner, 2),
    ):
        schemes[f"{len(qs)} CRFs {qs}, rest predicted"] = lambda qs=qs: predicted(qs)  # type: ignore[misc]
    rows = {}
    for label, scheme in schemes.items():
        points, run = scheme()
        curve, used = ship(points)
        probe_cpu = sum(probes[k].cpu_seconds for k in run)
        final_cpu = sum(full[k].cpu_seconds for k in used)
        bd = bd_rate(full_curve, curve)
        rows[label] = (
            bd.percent if bd else float("nan"),
            100 * (probe_cpu + final_cpu) / full_cpu,
            100 * probe_cpu / full_cpu,
            len(run),
            len(used),
        )
    return {"source": name, "shots": str(len(plan.shots)), "full CPU s": f"{full_cpu:.0f}"} | {
        label: f"{bd:+.2f} % at {cpu:.0f} % CPU ({pc:.0f} % probes; {n} probes, {nf} shipped)"
        for label, (bd, cpu, pc, n, nf) in rows.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=["real-mix", "bench-mix", "demo-mix"])
    ap.add_argument("--height", type=int, help="build the sources at this height")
    ap.add_argument("--probe-preset", default="veryfast")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("build/bench/probes"))
    args = ap.parse_args()
    print(__doc__)
    settings = EncodeSettings(probe_preset=args.probe_preset, workers=args.workers)
    rows = [measure(name, args.height, settings, args.work) for name in args.sources]
    table = Table(title="fast path schemes: BD-rate against the full matrix, CPU as its share")
    table.add_column("scheme")
    for row in rows:
        table.add_column(f"{row['source']} ({row['shots']} shots, full {row['full CPU s']} CPU s)")
    for label in list(rows[0])[3:]:
        table.add_row(label, *(row[label] for row in rows))
    console.print(table)
    if len(rows) > 1:
        for label in list(rows[0])[3:]:
            bds = [float(row[label].split(" %")[0]) for row in rows]
            console.print(f"mean BD-rate, {label}: {statistics.mean(bds):+.2f} %")


if __name__ == "__main__":
    main()
