"""Probe a source with PyAV (its wheel bundles the ffmpeg libraries; the ffmpeg binary we run
ships no ffprobe). Rejects what cannot be encoded with a message naming the problem."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from streamplane.media.errors import SourceError
from streamplane.media.title import AudioTrackInfo, SourceInfo


def probe(path: Path) -> SourceInfo:
    """Describe `path`'s first video stream and its audio streams, counting frames by demuxing.

    Frames are counted from packets, not taken from the header: a truncated file's header
    still claims its original length.
    """
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
        ctx = video.codec_context
        rate = video.average_rate or video.guessed_rate
        if not rate or rate <= 0:
            raise SourceError(f"{path}: the video stream has no frame rate")
        rate = Fraction(rate).limit_denominator(1001)
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
        n_frames = _count_video_frames(container, video, path)
    if n_frames == 0:
        raise SourceError(f"{path}: the video stream holds no frames (zero-length video)")
    duration = n_frames / rate
    return SourceInfo(
        path=str(path),
        duration_s=float(duration),
        width=ctx.width,
        height=ctx.height,
        fps_num=rate.numerator,
        fps_den=rate.denominator,
        n_frames=n_frames,
        video_codec=ctx.name,
        audio=audio,
    )


def _count_video_frames(container: object, video: object, path: Path) -> int:
    import av

    n = 0
    try:
        for packet in container.demux(video):  # type: ignore[attr-defined]
            if packet.size:
                n += 1
    except av.error.FFmpegError as exc:
        raise SourceError(f"{path}: the file is damaged or truncated ({exc})") from exc
    return n
