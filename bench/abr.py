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

    .venv/bin/python bench/abr.py [--title catalog/demo-mix] [--traces 20] [--seed 2024]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from streamplane.player import (
    ALGORITHMS,
    TRACE_KINDS,
    Manifest,
    Metrics,
    SimSettings,
    load_manifest,
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


def _row(name: str, m: Metrics) -> list[str]:
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
    "avg switch kbps",
    "abandoned",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--title", type=Path, help="title package or title.json")
    parser.add_argument("--traces", type=int, default=20, help="traces per set")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--duration", type=float, default=600.0, help="session length, s")
    parser.add_argument("--max-buffer", type=float, default=30.0)
    parser.add_argument("--sets", nargs="+", default=list(TRACE_KINDS), choices=TRACE_KINDS)
    args = parser.parse_args()

    print(__doc__.split("\n\n")[1].replace("\n", " "))
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
    per_set: dict[str, dict[str, Metrics]] = {}
    for kind in args.sets:
        traces = trace_set(kind, args.traces, args.seed, duration_s=args.duration)
        mean_kbps = sum(t.mean_kbps for t in traces) / len(traces)
        per_set[kind] = {
            name: mean_metrics(
                [simulate(manifest, t, make_abr(name), settings).metrics for t in traces]
            )
            for name in ALGORITHMS
        }
        print()
        print(
            f"### {LABELS[kind]}: {len(traces)} traces, mean bandwidth {mean_kbps / 1000:.2f} Mbps"
        )
        print()
        rows = [_row(name, m) for name, m in per_set[kind].items()]
        print("\n".join(markdown_table(Table(HEADERS, rows, frozenset(range(1, 11))))))
    print()
    print(f"### mean over the {len(args.sets)} sets")
    print()
    rows = [_row(name, mean_metrics([per_set[k][name] for k in args.sets])) for name in ALGORITHMS]
    print("\n".join(markdown_table(Table(HEADERS, rows, frozenset(range(1, 11))))))
    print()
    met = True
    for kind in args.sets:
        res = per_set[kind]
        ranked = sorted(res, key=lambda n: res[n].qoe_per_segment, reverse=True)
        sp, be = res["streamplane"], res["bola-e"]
        runner_up = next(n for n in ranked if n != "streamplane")
        best = ranked[0] == "streamplane"
        safe = sp.rebuffer_ratio <= be.rebuffer_ratio
        met &= best and safe
        gain = sp.qoe_per_segment / res[runner_up].qoe_per_segment - 1
        print(
            f"{LABELS[kind]}: streamplane ranks {ranked.index('streamplane') + 1} of "
            f"{len(ranked)} on QoE ({gain:+.1%} against {runner_up}); rebuffer ratio "
            f"{100 * sp.rebuffer_ratio:.3f} % vs BOLA-E {100 * be.rebuffer_ratio:.3f} % "
            f"({'no higher' if safe else 'HIGHER'})"
        )
    print(f"goal {'met' if met else 'NOT met'} on {', '.join(LABELS[k] for k in args.sets)}")
    print(f"{time.perf_counter() - started:.0f} s")
    print()
    print("reproduce:", shlex.join([".venv/bin/python", "bench/abr.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
