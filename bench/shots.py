"""Shot detection benchmark: PySceneDetect's AdaptiveDetector against ffmpeg's scdet filter.

Builds the sample titles, runs both detectors on each with their default thresholds, and
prints how fast and how accurate each is, then the same figures as markdown for
docs/benchmarks.md. A comparison, not a pass/fail check.

    .venv/bin/python bench/shots.py [--work build/bench] [--repeats 3] [--samples NAME ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.samples import SAMPLES, build_sample
from streamplane.media.shots import (
    DETECTORS,
    MIN_CUT_GAP_S,
    SCDET_THRESHOLD,
    SCENEDETECT_THRESHOLD,
    sample_true_cuts,
)

TOLERANCE = 2  # frames either side
BASELINE = "(decode only)"
DETECTOR_LABELS = {
    "scenedetect": f"PySceneDetect AdaptiveDetector (ratio >= {SCENEDETECT_THRESHOLD})",
    "scdet": f"ffmpeg scdet (score > {SCDET_THRESHOLD})",
}


@dataclass(frozen=True)
class Score:
    true_pos: int
    n_found: int
    n_true: int

    @property
    def precision(self) -> float:
        return self.true_pos / self.n_found if self.n_found else 1.0

    @property
    def recall(self) -> float:
        return self.true_pos / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class Result:
    sample: str
    n_frames: int
    detector: str
    wall_s: float
    cpu_s: float
    cuts: list[int]
    vs_pieces: Score  # against Sample.cut_frames()
    vs_all: Score  # against every true cut, the clips' own included


def score(found: list[int], truth: list[int], tolerance: int = TOLERANCE) -> Score:
    """One-to-one matching, closest pairs first, so a double detection counts as a false one."""
    pairs = sorted(
        (abs(f - t), f, t) for f in set(found) for t in set(truth) if abs(f - t) <= tolerance
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    for _, f, t in pairs:
        if f not in used_f and t not in used_t:
            used_f.add(f)
            used_t.add(t)
    return Score(len(used_t), len(set(found)), len(set(truth)))


def cpu_seconds() -> float:
    """CPU of this process (all its threads) plus every child it has waited for (ffmpeg)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(detect: Callable[[Path], list[int]], path: Path) -> tuple[float, float, list[int]]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    cuts = detect(path)
    return time.perf_counter() - wall, cpu_seconds() - cpu, cuts


def decode_only(path: Path) -> list[int]:
    """The floor both detectors stand on: decoding every frame and nothing else."""
    run_ffmpeg(["-i", str(path), "-map", "0:v:0", "-f", "null", "-"], "decoding (baseline)")
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(work: Path, names: list[str], repeats: int, console: Console) -> list[Result]:
    paths = {}
    for name in names:
        console.print(f"building sample {name} (once) in {work}", style="dim")
        paths[name] = build_sample(name, work)
    # Warm-up, not timed: imports (OpenCV, PyAV) and the page cache.
    for detect in DETECTORS.values():
        detect(paths[names[0]])
    timings: dict[tuple[str, str], list[tuple[float, float, list[int]]]] = {}
    runners = {**DETECTORS, BASELINE: decode_only}
    for i in range(repeats):
        for name in names:
            # Alternate the order so neither detector always runs on a cold cache.
            order = sorted(runners, reverse=bool(i % 2))
            for det in order:
                timings.setdefault((name, det), []).append(measure(runners[det], paths[name]))
    results = []
    for name in names:
        sample = SAMPLES[name]
        for det in [*sorted(DETECTORS), BASELINE]:
            runs = timings[(name, det)]
            cuts = runs[0][2]
            if any(r[2] != cuts for r in runs):
                console.print(f"[red]{det} on {name} gave different cuts across runs[/red]")
            results.append(
                Result(
                    sample=name,
                    n_frames=sample.n_frames,
                    detector=det,
                    # Best of N: the machine may be shared, and other load only ever adds.
                    wall_s=min(r[0] for r in runs),
                    cpu_s=min(r[1] for r in runs),
                    cuts=cuts,
                    vs_pieces=score(cuts, sample.cut_frames()),
                    vs_all=score(cuts, sample_true_cuts(sample)),
                )
            )
    return results


def _prf(s: Score) -> tuple[str, str, str]:
    return f"{s.precision:.2f}", f"{s.recall:.2f}", f"{s.f1:.2f}"


def _slash(s: Score) -> str:
    return "/".join(_prf(s))


def _ratios(results: list[Result]) -> list[tuple[str, str, str, str]]:
    """Per sample and overall: scdet / scenedetect for wall and CPU, if accuracy is equal."""
    rows = []
    by = {(r.sample, r.detector): r for r in results}
    names = list(dict.fromkeys(r.sample for r in results))
    totals = {d: [0.0, 0.0] for d in ("scdet", "scenedetect")}
    all_equal = True
    for name in names:
        a, b = by[(name, "scdet")], by[(name, "scenedetect")]
        equal = (a.vs_all, a.vs_pieces) == (b.vs_all, b.vs_pieces)
        all_equal &= equal
        for r in (a, b):
            totals[r.detector][0] += r.wall_s
            totals[r.detector][1] += r.cpu_s
        if equal:
            acc = f"equal (F1 {a.vs_all.f1:.2f} all cuts, {a.vs_pieces.f1:.2f} pieces)"
            rows.append((name, f"{a.wall_s / b.wall_s:.2f}", f"{a.cpu_s / b.cpu_s:.2f}", acc))
        else:
            acc = (
                f"differs: F1 all cuts scdet {a.vs_all.f1:.2f} vs "
                f"scenedetect {b.vs_all.f1:.2f}; no ratio at unequal accuracy"
            )
            rows.append((name, "-", "-", acc))
    if all_equal and names:
        s, p = totals["scdet"], totals["scenedetect"]
        rows.append(("all samples", f"{s[0] / p[0]:.2f}", f"{s[1] / p[1]:.2f}", "equal"))
    return rows


def markdown(results: list[Result], repeats: int, command: str, load: tuple[float, float]) -> str:
    lines = [
        "### Shot detection: PySceneDetect vs ffmpeg scdet",
        "",
        f"Best of {repeats} runs on {os.cpu_count()} CPU(s) ({cpu_model()}; load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after: wall times grow with other load, CPU "
        "times hardly), "
        f"`{command}`. Defaults: scdet score > {SCDET_THRESHOLD} on frames <= 320 px wide; "
        f"AdaptiveDetector ratio >= {SCENEDETECT_THRESHOLD}; both ignore a cut "
        f"< {MIN_CUT_GAP_S} s after the previous one. A detection counts if within "
        f"+-{TOLERANCE} frames of a true cut (one-to-one). *Pieces* = the sample's own "
        "boundaries (`cut_frames()`); *all* adds the hard cuts inside bikes.mp4, which is a "
        "montage, so a detector finding those is right, not wrong.",
        "",
        "| sample | frames | detector | wall s | CPU s | P / R / F1 (pieces) "
        "| P / R / F1 (all cuts) |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for r in results:
        acc = ("-", "-") if r.detector == BASELINE else (_slash(r.vs_pieces), _slash(r.vs_all))
        lines.append(
            f"| {r.sample} | {r.n_frames} | {r.detector} | {r.wall_s:.2f} | {r.cpu_s:.2f} "
            f"| {acc[0]} | {acc[1]} |"
        )
    lines += ["", "| sample | wall scdet/scenedetect | CPU scdet/scenedetect | accuracy |"]
    lines += ["|---|---:|---:|---|"]
    lines += [f"| {n} | {w} | {c} | {a} |" for n, w, c, a in _ratios(results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--repeats", type=int, default=5)
    by_size = sorted(SAMPLES, key=lambda n: SAMPLES[n].n_frames)
    parser.add_argument("--samples", nargs="+", default=by_size, choices=by_size)
    args = parser.parse_args()
    # Wide enough for the table when piped to a file (rich would assume 80 columns).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    command = shlex.join([".venv/bin/python", "bench/shots.py", *sys.argv[1:]])

    console.rule("Shot detection: PySceneDetect vs ffmpeg scdet")
    console.print(
        "Method: each sample is generated once (H.264 CRF 10, 25 fps) with known piece "
        f"boundaries. Each detector runs {args.repeats} times per sample (order alternated, "
        "after an untimed warm-up); wall and CPU seconds are the best of those runs. CPU = "
        "getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN) deltas, so it counts "
        "PySceneDetect's decode threads and the ffmpeg child alike. A detection is a hit "
        f"within +-{TOLERANCE} frames of a true cut, matched one to one. Scored twice: "
        "against the pieces (Sample.cut_frames()) and against all true cuts, which adds "
        "the hard cuts inside bikes.mp4 (a montage; clip frames 30, 76, 137, 187, 242, "
        "checked by eye). The speed ratio is only given where both detectors score the same."
    )
    console.print(
        f"Detectors: {DETECTOR_LABELS['scdet']}; {DETECTOR_LABELS['scenedetect']}; both drop "
        f"a cut < {MIN_CUT_GAP_S} s after the previous one."
    )
    console.print(f"Reproduce: [bold]{command}[/bold]  (from the repository root)")
    console.print(
        f"Machine: {os.cpu_count()} CPU(s), {cpu_model()}, Python {platform.python_version()}"
    )

    load_before = os.getloadavg()[0]
    results = run(args.work, args.samples, args.repeats, console)
    load = (load_before, os.getloadavg()[0])
    console.print(
        f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
        "(wall time suffers from other load; CPU time much less)",
        style="dim",
    )

    table = Table(title=f"Shot detectors, +-{TOLERANCE} frames, best of {args.repeats}")
    for col in ("sample", "frames", "detector", "wall s", "CPU s", "CPU ms/frame"):
        table.add_column(col, justify="left" if col in ("sample", "detector") else "right")
    table.add_column("P/R/F1 pieces")
    table.add_column("P/R/F1 all cuts")
    for r in results:
        baseline = r.detector == BASELINE
        table.add_row(
            r.sample,
            str(r.n_frames),
            r.detector,
            f"{r.wall_s:.2f}",
            f"{r.cpu_s:.2f}",
            f"{1000 * r.cpu_s / r.n_frames:.1f}",
            "-" if baseline else _slash(r.vs_pieces),
            "-" if baseline else _slash(r.vs_all),
            style="dim" if baseline else None,
        )
    console.print(table)

    ratios = Table(title="Speed ratio scdet / scenedetect (below 1: scdet is faster)")
    for col in ("sample", "wall", "CPU", "accuracy"):
        ratios.add_column(col, justify="right" if col in ("wall", "CPU") else "left")
    for row in _ratios(results):
        ratios.add_row(*row)
    console.print(ratios)

    for r in results:
        if r.detector == BASELINE:
            continue
        truth = sample_true_cuts(SAMPLES[r.sample])
        missed = [t for t in truth if all(abs(t - c) > TOLERANCE for c in r.cuts)]
        extra = [c for c in r.cuts if all(abs(t - c) > TOLERANCE for t in truth)]
        console.print(
            f"{r.sample} {r.detector}: cuts {r.cuts}; missed {missed or 'none'}; "
            f"false {extra or 'none'}",
            style="dim",
        )

    console.rule("markdown for docs/benchmarks.md")
    print(markdown(results, args.repeats, command, load))


if __name__ == "__main__":
    main()
