"""Probe a source with PyAV (its wheel bundles the ffmpeg libraries; the ffmpeg binary we run
ships no ffprobe). Rejects what cannot be encoded with a message naming the problem."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

from streamplane.media.errors import SourceError
from streamplane.media.title import AudioTrackInfo, SourceInfo


@contextmanager
def open_video(path: Path) -> Iterator[tuple[Any, Any, Fraction, int]]:
    """Open `path` and yield (container, first video stream, frame rate, frames the header
    claims or 0), or raise `SourceError` saying why it is not a usable video."""
    import av

    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, not a video file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: the file is empty (zero length)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise SourceError(f"{path}: not a readable media file ({exc})") from exc
    with container:
        if not container.streams.video:
            raise SourceError(f"{path}: has no video stream")
        video = container.streams.video[0]
        rate = video.average_rate or video.guessed_rate
        if not rate or rate <= 0:
            raise SourceError(f"{path}: the video stream has no frame rate")
        rate = Fraction(rate).limit_denominator(1001)
        claimed = video.frames
        if not claimed and container.duration:
            claimed = round(container.duration / 1_000_000 * rate)
        yield container, video, rate, int(claimed or 0)


def check_complete(path: Path, present: int, claimed: int) -> None:
    """Raise if the file holds well under the frames its header promises.

    A file cut short with its index at the front still opens and decodes up to the cut; the
    slack allows for containers whose count is an estimate from the duration.
    """
    if present == 0:
        raise SourceError(f"{path}: the video stream holds no frames (zero-length video)")
    if claimed and present < claimed - max(2, claimed // 100):
        raise SourceError(
            f"{path}: only {present} of the {claimed} frames its header promises are there: "
            "the file is truncated or damaged"
        )


def probe(path: Path) -> SourceInfo:
    """Describe `path`'s first video stream and its audio streams, counting frames by demuxing."""
    import av

    with open_video(path) as (container, video, rate, claimed):
        ctx = video.codec_context
        if not ctx.width or not ctx.height:
            raise SourceError(f"{path}: the video stream has no picture size")
        audio = tuple(
            AudioTrackInfo(
                index=i,
                codec=a.codec_context.name,
                channels=a.codec_context.channels,
                sample_rate=a.codec_context.sample_rate,
                language=a.metadata.get("language", "und"),
            )
            for i, a in enumerate(container.streams.audio)
        )
        n_frames = 0
        try:
            for packet in container.demux(video):
                if packet.size:
                    n_frames += 1
        except av.error.FFmpegError as exc:
            raise SourceError(f"{path}: the file is damaged or truncated ({exc})") from exc
    check_complete(path, n_frames, claimed)
    return SourceInfo(
        path=str(path),
        duration_s=float(n_frames / rate),
        width=ctx.width,
        height=ctx.height,
        fps_num=rate.numerator,
        fps_den=rate.denominator,
        n_frames=n_frames,
        video_codec=ctx.name,
        audio=audio,
    )
