"""Quality measurement: VMAF (and PSNR) with the libvmaf filter of the ffmpeg we ship.

The distorted encode is decoded and scaled bicubic to the display resolution; both streams are
re-timed from zero so frames pair one to one, and the frame count libvmaf reports is checked
against the reference, so a dropped or duplicated frame is an error rather than a skewed score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from streamplane.media.errors import EncodeError
from streamplane.media.ffmpeg import run_ffmpeg


@dataclass(frozen=True)
class QualityScore:
    vmaf: float  # arithmetic mean over frames
    vmaf_harmonic: float
    psnr_y: float
    frames: int  # frames scored (after subsampling)
    cpu_seconds: float
    frame_vmaf: tuple[float, ...] = ()  # every scored frame, in order


def harmonic_mean(scores: Sequence[float]) -> float:
    """VMAF's harmonic-mean pooling (offset by one so a zero score stays finite)."""
    if not scores:
        raise ValueError("no scores to pool")
    return len(scores) / sum(1.0 / (1.0 + s) for s in scores) - 1.0


def pool_psnr(values: Sequence[float]) -> float:
    """Mean PSNR over frames, through mean squared error (frames equal to the source cap at 60)."""
    capped = [min(v, 60.0) for v in values]
    mse = sum(10 ** (-v / 10) for v in capped) / len(capped)
    return -10 * math.log10(mse)


def parse_vmaf_log(log: dict[str, object]) -> tuple[list[float], list[float]]:
    frames = log.get("frames")
    if not isinstance(frames, list) or not frames:
        raise EncodeError("the VMAF log holds no frames")
    vmaf = [float(f["metrics"]["vmaf"]) for f in frames]
    psnr = [float(f["metrics"].get("psnr_y", 60.0)) for f in frames]
    return vmaf, psnr


def measure(
    distorted: Path,
    reference: list[str],
    width: int,
    height: int,
    reference_frames: int,
    subsample: int = 1,
    threads: int = 1,
    reference_span: tuple[int, int] | None = None,
    scale_reference: bool = False,
) -> QualityScore:
    """Score `distorted` against the frames ffmpeg reads with the input arguments `reference`
    (`ffmpeg.input_args`), shown at `width`x`height`; with `reference_span` = (first, end),
    against those frames of it only (a probe of part of a shot). With `scale_reference` the
    reference is scaled to `width`x`height` too (a score at a size below the source's)."""
    log_path = distorted.with_suffix(".vmaf.json")
    trim = ""
    if reference_span is not None:
        trim = f"trim=start_frame={reference_span[0]}:end_frame={reference_span[1]},"
    ref_scale = f"scale={width}:{height}:flags=bicubic," if scale_reference else ""
    graph = (
        f"[0:v]scale={width}:{height}:flags=bicubic,format=yuv420p,setpts=PTS-STARTPTS[d];"
        f"[1:v]{trim}{ref_scale}format=yuv420p,setpts=PTS-STARTPTS[r];"
        f"[d][r]libvmaf=log_path={log_path}:log_fmt=json:n_threads={threads}"
        f":n_subsample={subsample}:feature=name=psnr"
    )
    run = run_ffmpeg(
        ["-i", str(distorted), *reference, "-lavfi", graph, "-f", "null", "-"],
        what=f"VMAF of {distorted.name}",
    )
    vmaf, psnr = parse_vmaf_log(json.loads(log_path.read_text()))
    log_path.unlink()
    expected = math.ceil(reference_frames / subsample)
    if len(vmaf) != expected:
        raise EncodeError(
            f"VMAF of {distorted.name}: scored {len(vmaf)} frames, expected {expected}; "
            "the encode and its reference do not pair frame by frame"
        )
    return QualityScore(
        vmaf=sum(vmaf) / len(vmaf),
        vmaf_harmonic=harmonic_mean(vmaf),
        psnr_y=pool_psnr(psnr),
        frames=len(vmaf),
        cpu_seconds=run.cpu_seconds,
        frame_vmaf=tuple(round(v, 2) for v in vmaf),
    )
