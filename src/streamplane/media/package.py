"""Packaging: per-shot encodes of a rung → one CMAF track cut into init + media segments, the
audio as its own CMAF track, then HLS and DASH manifests and `title.json`.

ffmpeg concatenates a rung's shot encodes (their headers are content-independent, so the
streams join) and writes one fragmented MP4 with a fragment per keyframe; since keyframes sit
exactly at the planned segment starts, each fragment is one segment. The fragments are then
checked against the plan: a segment that does not start with a sync sample or does not last what
the plan says is an error, not a subtle playback bug.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from streamplane.media.errors import DiskFullError, PackagingError
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.fmp4 import read_fragment, read_init, split_fragmented
from streamplane.media.title import Segment

CMAF_FLAGS = "cmaf+frag_keyframe+empty_moov+default_base_moof+negative_cts_offsets"


def video_timescale(fps_num: int, fps_den: int) -> int:
    """A timescale in which every frame lasts a whole number of ticks (90 kHz when it can)."""
    if (90000 * fps_den) % fps_num == 0:
        return 90000
    return fps_num if fps_den > 1 else fps_num * -(-10000 // fps_num)


@dataclass(frozen=True)
class PackagedTrack:
    codec_string: str
    timescale: int
    init_path: Path
    segment_paths: tuple[Path, ...]
    starts: tuple[int, ...]  # decode time of each segment, ticks
    durations: tuple[int, ...]  # ticks
    sizes: tuple[int, ...]  # bytes
    width: int = 0
    height: int = 0
    channels: int = 0
    sample_rate: int = 0


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"writing {path}: the disk is full") from exc
        raise


def split_into(fragmented: Path, directory: Path) -> PackagedTrack:
    """Cut a fragmented MP4 into `init.mp4` + `seg_<n>.m4s` (n from 1) in `directory`."""
    init, segments = split_fragmented(fragmented.read_bytes())
    info = read_init(init)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "init.mp4", init)
    paths, starts, durations, sizes = [], [], [], []
    for n, seg in enumerate(segments, start=1):
        frag = read_fragment(seg, info.default_sample_duration)
        path = directory / f"seg_{n}.m4s"
        _write(path, seg)
        paths.append(path)
        starts.append(frag.base_media_decode_time)
        durations.append(frag.duration)
        sizes.append(len(seg))
        if info.handler == "vide" and not frag.starts_with_sync:
            raise PackagingError(f"{path}: the segment does not start with a keyframe")
    fragmented.unlink()
    return PackagedTrack(
        codec_string=info.codec_string,
        timescale=info.timescale,
        init_path=directory / "init.mp4",
        segment_paths=tuple(paths),
        starts=tuple(starts),
        durations=tuple(durations),
        sizes=tuple(sizes),
        width=info.width,
        height=info.height,
        channels=info.channels,
        sample_rate=info.sample_rate,
    )


def package_video(
    shot_encodes: Sequence[Path],
    directory: Path,
    timescale: int,
) -> PackagedTrack:
    """Join one rung's shot encodes (in shot order) and cut them into CMAF segments."""
    directory.mkdir(parents=True, exist_ok=True)
    listing = directory / "shots.ffconcat"
    lines = ["ffconcat version 1.0", *(f"file '{p.resolve()}'" for p in shot_encodes)]
    listing.write_text("\n".join(lines) + "\n")
    joined = directory / "joined.mp4"
    run_ffmpeg(
        [
            *["-f", "concat", "-safe", "0", "-i", str(listing)],
            *["-map", "0:v:0", "-c", "copy", "-video_track_timescale", str(timescale)],
            *["-f", "mp4", "-movflags", CMAF_FLAGS, str(joined)],
        ],
        what=f"packaging {directory.name}",
    )
    listing.unlink()
    return split_into(joined, directory)


def package_audio(
    source: Path,
    track: int,
    directory: Path,
    duration_s: float,
    segment_s: float,
    bitrate_kbps: int = 128,
) -> PackagedTrack:
    """Encode audio track `track` of `source` to stereo AAC-LC in CMAF segments of ~segment_s."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "joined.mp4"
    run_ffmpeg(
        [
            *["-i", str(source), "-map", f"0:a:{track}", "-t", f"{duration_s:.6f}"],
            *["-c:a", "aac", "-b:a", f"{bitrate_kbps}k", "-ac", "2", "-ar", "48000"],
            *["-f", "mp4", "-movflags", CMAF_FLAGS, "-frag_duration", str(int(segment_s * 1e6))],
            str(out),
        ],
        what=f"encoding audio track {track}",
    )
    return split_into(out, directory)


def check_alignment(
    tracks: Sequence[PackagedTrack], plan: Sequence[Segment], fps: Fraction
) -> None:
    """Every rung must have the planned segments, at the planned times, in every rung."""
    for t in tracks:
        if len(t.durations) != len(plan):
            raise PackagingError(
                f"{t.init_path.parent.name}: {len(t.durations)} segments, the plan has {len(plan)}"
            )
        frame_ticks = t.timescale / fps
        for seg, start, dur in zip(plan, t.starts, t.durations, strict=True):
            want_start = seg.start_frame * frame_ticks
            want_dur = seg.n_frames * frame_ticks
            if start != want_start or dur != want_dur:
                raise PackagingError(
                    f"{t.init_path.parent.name} segment {seg.index + 1}: starts at {start} and "
                    f"lasts {dur} ticks; the plan says {want_start} and {want_dur}"
                )


def peak_and_average_bps(sizes: Sequence[int], durations_s: Sequence[float]) -> tuple[int, int]:
    """RFC 8216's peak segment bit rate and the average over the whole track."""
    if not sizes:
        return 0, 0
    peak = max(8 * b / d for b, d in zip(sizes, durations_s, strict=True))
    return round(peak), round(8 * sum(sizes) / sum(durations_s))
