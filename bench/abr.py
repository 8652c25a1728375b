"""ABR algorithms on the same traces and a real title: streamplane's against BBA, BOLA and the rest.

Method: every algorithm plays the same title over the same network traces in the trace-driven
simulator (streamplane.player.sim: one request at a time, latency per request, 30 s maximum
buffer, playback from the first segment, abandonment offered every 0.25 s). The title is a real
streamplane encode (its rungs' average bitrates, every segment's real size and VMAF and its
uneven segment durations), played back to back until it lasts `--duration` seconds. The traces
are seeded sets of three kinds (3G-like, LTE-like, broadband-like, each with drops and
recoveries; see streamplane.player.traces), generated from `--seed`; the default is none of the
seeds streamplane's parameters were tuned on (3, 5, 7, 11, 13, 19, 23, 29). Per set, one row per
algorithm: the mean over the set's traces of Pensieve's linear QoE per segment (bitrate Mbps -
4.3 x rebuffer s - |bitrate change| Mbps), the average bitrate and VMAF, rebuffering (seconds
per session, ratio of session time, stalls), startup delay, switches and their average size, and
abandoned requests. The goal (issue 5): streamplane's algorithm has the best mean QoE on every
set with a rebuffer ratio no higher than BOLA-E's. A comparison, not a pass/fail check.

With `--traces DIR [DIR ...]` the traces are real ones instead: every trace file of each folder
(cooked `seconds Mbps` lines, Pensieve's and Puffer's, with `--latency-ms` per request, 80 by
Pensieve's convention; or JSON periods, Sabre's, with their own latency), the same table per
folder, each folder split in two by a fixed hash of the file name (`held_out`: about a third
held out, never tuned on) and reported whole, tuning part and held-out part. The goal (issue
18): on every folder and on its held-out part, streamplane's mean QoE is the best and its
rebuffer ratio no higher than BOLA-E's.

    .venv/bin/python bench/abr.py [--title catalog/demo-mix] [--traces 20] [--seed 2024]
    .venv/bin/python bench/abr.py --traces ../shared/abr-traces/fcc-2016-train [DIR ...] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamplane.player import (
    ALGORITHMS,
    TRACE_KINDS,
    Manifest,
    Metrics,
    SimSettings,
    Trace,
    load_manifest,
    load_trace_dir,
    loop_manifest,
    make_abr,
    mean_metrics,
    simulate,
    trace_set,
)
from streamplane.reporting import Table, markdown_table

LABELS = {"3g": "3G-like", "lte": "LTE-like", "broadband": "broadband-like"}


def _title(path: Path | None) -> Path:
    """title.json of the given package, else catalog/demo-mix, else an encode of the sample."""
    for candidate in [path] if path is not None else [Path("catalog/demo-mix")]:
        f = candidate if candidate.suffix == ".json" else candidate / "title.json"
        if f.is_file():
            return f
        if path is not None:
            sys.exit(f"error: {f} not found")
    built = Path("build/bench/demo-mix/title.json")
    if not built.is_file():
        from streamplane import media

        print("no catalog title: encoding the demo-mix sample once into build/bench/demo-mix")
        source = media.build_sample("demo-mix", Path("build/samples"))
        media.encode(source, built.parent, media.EncodeSettings(baseline=False))
    return built


def switch_rate(sessions: Sequence[Metrics]) -> float:
    """Switches per minute of media, averaged over sessions."""
    return sum(60.0 * m.switches / m.media_s for m in sessions) / len(sessions)


def _row(name: str, m: Metrics, per_min: float) -> list[str]:
    return [
        name,
        f"{m.qoe_per_segment:.3f}",
        f"{m.avg_bitrate_kbps:.0f}",
        "-" if m.avg_vmaf is None else f"{m.avg_vmaf:.1f}",
        f"{m.rebuffer_s:.2f}",
        f"{100 * m.rebuffer_ratio:.3f}",
        f"{m.rebuffer_events}",
        f"{m.startup_s:.2f}",
        f"{m.switches}",
        f"{per_min:.2f}",
        f"{m.avg_switch_kbps:.0f}",
        f"{m.abandoned}",
    ]


HEADERS = (
    "algorithm",
    "QoE/segment",
    "avg kbps",
    "VMAF",
    "rebuffer s",
    "rebuffer %",
    "stalls",
    "startup s",
    "switches",
    "switches/min",
    "avg switch kbps",
    "abandoned",
)


def held_out(name: str) -> bool:
    """The fixed split of a real trace folder: a trace is held out (never tuned on) when the
    SHA-256 of its file name, read as a number, is divisible by 3. It depends on nothing but
    the name, so it is the same on every machine and for every folder's order or size."""
    return int.from_bytes(hashlib.sha256(Path(name).name.encode()).digest(), "big") % 3 == 0


_WORK: tuple[Manifest, SimSettings] | None = None


def _init(manifest: Manifest, settings: SimSettings) -> None:
    global _WORK
    _WORK = (manifest, settings)


def _session(job: tuple[Trace, str]) -> Metrics:
    assert _WORK is not None
    trace, name = job
    return simulate(_WORK[0], trace, make_abr(name), _WORK[1]).metrics


def run_sessions(
    manifest: Manifest,
    traces: Sequence[Trace],
    names: Sequence[str],
    settings: SimSettings,
    jobs: int,
    label: str = "sessions",
) -> dict[str, list[Metrics]]:
    """Every algorithm of `names` on every trace, in `jobs` processes: per algorithm, the
    sessions' metrics in trace order (deterministic whatever the number of processes)."""
    work = [(t, n) for n in names for t in traces]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=len(work))
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(manifest, settings)) as pool:
            out = []
            for m in pool.map(_session, work, chunksize=4):
                out.append(m)
                bar.advance(task)
    k = len(traces)
    return {n: out[i * k : (i + 1) * k] for i, n in enumerate(names)}


def verdict(label: str, res: dict[str, Metrics]) -> bool:
    """Print where streamplane ranks on `res` and whether the goal holds there."""
    ranked = sorted(res, key=lambda n: res[n].qoe_per_segment, reverse=True)
    sp, be = res["streamplane"], res["bola-e"]
    runner_up = next(n for n in ranked if n != "streamplane")
    best = ranked[0] == "streamplane"
    safe = sp.rebuffer_ratio <= be.rebuffer_ratio
    gain = sp.qoe_per_segment / res[runner_up].qoe_per_segment - 1
    print(
        f"{label}: streamplane ranks {ranked.index('streamplane') + 1} of "
        f"{len(ranked)} on QoE ({gain:+.1%} against {runner_up}); rebuffer ratio "
        f"{100 * sp.rebuffer_ratio:.3f} % vs BOLA-E {100 * be.rebuffer_ratio:.3f} % "
        f"({'no higher' if safe else 'HIGHER'})"
    )
    return best and safe


def _print_table(res: dict[str, Metrics], per_min: dict[str, float]) -> None:
    rows = [_row(name, m, per_min[name]) for name, m in res.items()]
    print("\n".join(markdown_table(Table(HEADERS, rows, frozenset(range(1, len(HEADERS)))))))


def real_traces(args: argparse.Namespace, manifest: Manifest, settings: SimSettings) -> bool:
    """The `--traces DIR` mode: per folder, the whole, tuning and held-out tables."""
    met = True
    names = list(ALGORITHMS)
    for folder in args.traces:
        traces = load_trace_dir(Path(folder), args.latency_ms)
        runs = run_sessions(manifest, traces, names, settings, args.jobs, Path(folder).name)
        parts = {
            "all": list(range(len(traces))),
            "tuning": [k for k, t in enumerate(traces) if not held_out(t.name)],
            "held-out": [k for k, t in enumerate(traces) if held_out(t.name)],
        }
        mean_kbps = sum(t.mean_kbps for t in traces) / len(traces)
        for part, idx in parts.items():
            if not idx:
                continue
            res = {n: mean_metrics([runs[n][k] for k in idx]) for n in names}
            rates = {n: switch_rate([runs[n][k] for k in idx]) for n in names}
            print()
            print(
                f"### {Path(folder).name}, {part}: {len(idx)} traces"
                + (f", mean bandwidth {mean_kbps / 1000:.2f} Mbps" if part == "all" else "")
            )
            print()
            _print_table(res, rates)
            print()
            ok = verdict(f"{Path(folder).name} {part}", res)
            if part != "tuning":
                met &= ok
    return met


def _trace_source(values: list[str]) -> int | list[str]:
    """`--traces 20` (traces per generated set) or `--traces DIR [DIR ...]` (real folders)."""
    if len(values) == 1 and values[0].isdigit():
        return int(values[0])
    for v in values:
        if not Path(v).is_dir():
            sys.exit(f"error: --traces takes a count or folders of traces; {v} is neither")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--title", type=Path, help="title package or title.json")
    parser.add_argument(
        "--traces", nargs="+", default=["20"], help="traces per generated set, or folders"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=80.0, help="per request, on cooked real traces"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--duration", type=float, default=600.0, help="session length, s")
    parser.add_argument("--max-buffer", type=float, default=30.0)
    parser.add_argument("--sets", nargs="+", default=list(TRACE_KINDS), choices=TRACE_KINDS)
    args = parser.parse_args()
    args.traces = _trace_source(args.traces)
    real = isinstance(args.traces, list)

    print(__doc__.split("\n\n")[2 if real else 1].replace("\n", " "))
    print()
    title = _title(args.title)
    base = load_manifest(title)
    manifest: Manifest = loop_manifest(base, args.duration)
    rates = " ".join(f"{r.bitrate_kbps:.0f}" for r in base.rungs)
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(
        f"title {title}: {len(base.segment_durations_s)} segments, {base.duration_s:.1f} s, "
        f"rungs {rates} kbps; looped to {len(manifest.segment_durations_s)} segments "
        f"({manifest.duration_s:.0f} s)"
    )
    started = time.perf_counter()
    settings = SimSettings(max_buffer_s=args.max_buffer)
    if real:
        met = real_traces(args, manifest, settings)
        print()
        print(f"goal {'met' if met else 'NOT met'} on every folder and its held-out part")
    else:
        met = generated_sets(args, manifest, settings)
    print(f"{time.perf_counter() - started:.0f} s")
    print()
    print("reproduce:", shlex.join([".venv/bin/python", "bench/abr.py", *sys.argv[1:]]))


def generated_sets(args: argparse.Namespace, manifest: Manifest, settings: SimSettings) -> bool:
    """The seeded 3G-like, LTE-like and broadband-like sets, a table each and their mean."""
    per_set: dict[str, dict[str, Metrics]] = {}
    rates: dict[str, dict[str, float]] = {}
    names = list(ALGORITHMS)
    for kind in args.sets:
        traces = trace_set(kind, args.traces, args.seed, duration_s=args.duration)
        mean_kbps = sum(t.mean_kbps for t in traces) / len(traces)
        runs = run_sessions(manifest, traces, names, settings, args.jobs, LABELS[kind])
        per_set[kind] = {name: mean_metrics(runs[name]) for name in names}
        rates[kind] = {name: switch_rate(runs[name]) for name in names}
        print()
        print(
            f"### {LABELS[kind]}: {len(traces)} traces, mean bandwidth {mean_kbps / 1000:.2f} Mbps"
        )
        print()
        _print_table(per_set[kind], rates[kind])
    print()
    print(f"### mean over the {len(args.sets)} sets")
    print()
    _print_table(
        {n: mean_metrics([per_set[k][n] for k in args.sets]) for n in names},
        {n: sum(rates[k][n] for k in args.sets) / len(args.sets) for n in names},
    )
    print()
    met = True
    for kind in args.sets:
        met &= verdict(LABELS[kind], per_set[kind])
    print(f"goal {'met' if met else 'NOT met'} on {', '.join(LABELS[k] for k in args.sets)}")
    return met


if __name__ == "__main__":
    main()
