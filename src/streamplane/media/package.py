"""Packaging: per-shot encodes of a rung → one CMAF track cut into init + media segments, the
audio as its own CMAF track, then HLS and DASH manifests and `title.json`.

Each shot's encode of a rung is remuxed by ffmpeg into a fragmented MP4 with a fragment per
keyframe; since keyframes sit exactly at the planned segment starts, each fragment is one
segment, moved to the shot's place on the title's timeline (`pack_shot`). The shots' headers
are content-independent, so they share one init segment and join into one stream. The segments
are then checked against the plan: a segment that does not start with a sync sample or does not
last what the plan says is an error, not a subtle playback bug.

Audio is encoded to AAC-LC, whose encoder puts 1024 samples of priming before the first real
one. The init segment's edit list skips them (media_time = the priming), so presentation time 0
is the first real sample and the track presents exactly as long as the video; the AAC frames are
then regrouped into one segment per video segment, each starting with the first frame presented
at or after the video segment's start.
"""

from __future__ import annotations

import bisect
import errno
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from streamplane.media.errors import DiskFullError, PackagingError
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.fmp4 import (
    TrackInit,
    read_fragment,
    read_init,
    read_samples,
    retime_fragment,
    split_fragmented,
    write_fragment,
)
from streamplane.media.title import Segment

CMAF_FLAGS = "cmaf+frag_keyframe+empty_moov+default_base_moof+negative_cts_offsets"
# The audio mux: a fragment per AAC frame, regrouped into segments afterwards. ffmpeg writes the
# edit list only when asked (-use_editlist 1: its cmaf flag turns edit lists off by default) and,
# in a fragmented file, only if the moov waits for the first packet (delay_moov), whose negative
# timestamp is the priming; with empty_moov alone it writes none (and warns).
AUDIO_FLAGS = "cmaf+frag_every_frame+empty_moov+delay_moov+default_base_moof"


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
    # Presentation time of each segment and how long it presents, ticks. For video that is the
    # decode time of its keyframe (composition offset 0); for audio it is after the edit list.
    starts: tuple[int, ...]
    durations: tuple[int, ...]  # ticks
    sizes: tuple[int, ...]  # bytes
    width: int = 0
    height: int = 0
    channels: int = 0
    sample_rate: int = 0
    media_time: int = 0  # ticks the init's edit list skips (the AAC priming), 0 without one


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"writing {path}: the disk is full") from exc
        raise


def _packaged(
    info: TrackInit,
    directory: Path,
    paths: Sequence[Path],
    starts: Sequence[int],
    durations: Sequence[int],
    sizes: Sequence[int],
) -> PackagedTrack:
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
        media_time=info.media_time,
    )


@dataclass(frozen=True)
class PackedShot:
    """The segments one shot's encode became in its rung: where each starts, how long it
    lasts (ticks), its size."""

    first_segment: int  # index of its first segment in the title (0-based)
    starts: tuple[int, ...]
    durations: tuple[int, ...]
    sizes: tuple[int, ...]


def pack_shot(
    shot_encode: Path, directory: Path, first_segment: int, start_ticks: int, timescale: int
) -> PackedShot:
    """Write one shot's encode of a rung as that rung's segments `first_segment` + 1 on
    (`seg_<n>.m4s` in `directory`), the shot starting `start_ticks` into the title.

    The encode is remuxed into fragments (one per keyframe, so one per segment), each moved to
    the shot's place on the title's timeline and numbered in the title's sequence; the init
    segment is written by the first shot packed and must be the same for every other (the
    encoders' headers do not depend on the content). Shots can be packed in any order, and a
    shot packed again (a capped re-encode) replaces its segments: a rung is built while its
    shots are encoded, and no encode waits for the whole title.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fragmented = directory / f".{shot_encode.stem}.mp4"
    run_ffmpeg(
        [
            *["-i", str(shot_encode), "-map", "0:v:0", "-c", "copy"],
            *["-video_track_timescale", str(timescale)],
            # no btrt box: it would declare this shot's bit rates in the rung's shared init
            # (the manifests declare the rung's)
            *["-write_btrt", "0"],
            *["-f", "mp4", "-movflags", CMAF_FLAGS, str(fragmented)],
        ],
        what=f"packaging {shot_encode.name} into {directory.name}",
    )
    try:
        init, fragments = split_fragmented(fragmented.read_bytes())
    finally:
        fragmented.unlink()
    info = read_init(init)
    if info.timescale != timescale:
        raise PackagingError(f"{shot_encode}: timescale {info.timescale}, not {timescale}")
    init_path = directory / "init.mp4"
    if not init_path.exists():
        write_atomic(init_path, init)
    else:
        have, have_level = _without_level(init_path.read_bytes())
        new, new_level = _without_level(init)
        if have != new:
            raise PackagingError(
                f"{shot_encode}: its init segment differs from the rest of {directory.name}'s; "
                "the shot encodes of a rung must share their headers"
            )
        if new_level > have_level:
            write_atomic(init_path, init)
    starts, durations, sizes = [], [], []
    for n, fragment in enumerate(fragments, start=first_segment + 1):
        segment = retime_fragment(fragment, n, start_ticks)
        frag = read_fragment(segment, info.default_sample_duration, info.default_sample_flags)
        path = directory / f"seg_{n}.m4s"
        if not frag.first_sample_is_sync:
            raise PackagingError(f"{path}: the segment does not start with a keyframe")
        write_atomic(path, segment)
        starts.append(frag.base_media_decode_time)
        durations.append(frag.duration)
        sizes.append(len(segment))
    return PackedShot(first_segment, tuple(starts), tuple(durations), tuple(sizes))


def _without_level(init: bytes) -> tuple[bytes, int]:
    """The init segment with its H.264 level zeroed, and that level (0 for other codecs).

    x264 raises the level it declares for a VBV-capped encode's maxrate, so a rung's capped and
    plain shots differ there and only there; the rung declares the highest (a decoder for a
    level decodes every stream of a lower one).
    """
    info = read_init(init)
    if info.sample_entry not in ("avc1", "avc3") or len(info.config) < 12:
        return init, 0
    at = init.find(info.config)
    out = bytearray(init)
    out[at + 3] = 0  # AVCLevelIndication
    if info.config[8] & 0x1F == 7:  # the first SPS's level_idc
        out[at + 11] = 0
    return bytes(out), info.config[3]


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a reader, or a rerun, never sees half of it)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        _write(partial, data)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)


def package_audio(
    source: Path,
    track: int,
    directory: Path,
    segment_starts: Sequence[Fraction],
    duration: Fraction,
    bitrate_kbps: int = 128,
) -> PackagedTrack:
    """Encode audio track `track` of `source` to stereo AAC-LC as a CMAF track of `duration`
    seconds, with a segment starting at each of `segment_starts` (seconds, the first 0).

    The track presents exactly `duration`: a source track that ends early is padded with
    silence, a longer one is cut, and the encoder's priming is skipped by the init segment's edit
    list. Each segment starts with the first AAC frame presented at or after its start, so audio
    and video segments cover the same time to within one AAC frame.
    """
    if not segment_starts or segment_starts[0] != 0:
        raise PackagingError(f"audio segments must start at 0, not {list(segment_starts)[:1]}")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "joined.mp4"
    seconds = f"{float(duration):.6f}"
    run_ffmpeg(
        [
            *["-i", str(source), "-map", f"0:a:{track}"],
            *["-af", f"apad=whole_dur={seconds}", "-t", seconds],
            *["-c:a", "aac", "-b:a", f"{bitrate_kbps}k", "-ac", "2", "-ar", "48000"],
            *["-f", "mp4", "-movflags", AUDIO_FLAGS, "-use_editlist", "1", str(out)],
        ],
        what=f"encoding audio track {track}",
    )
    init, fragments = split_fragmented(out.read_bytes())
    info = read_init(init)
    if info.handler != "soun":
        raise PackagingError(f"{out}: expected an audio track, found {info.handler!r}")
    samples = [
        sample
        for fragment in fragments
        for sample in read_samples(
            fragment, info.default_sample_duration, info.default_sample_flags
        )
    ]
    presented = [s.decode_time + s.composition_offset - info.media_time for s in samples]
    end = samples[-1].decode_time + samples[-1].duration - info.media_time
    boundaries = [round(t * info.timescale) for t in segment_starts]
    cuts = audio_cuts(presented, boundaries, end)
    _write(directory / "init.mp4", init)
    paths, starts, durations, sizes = [], [], [], []
    for n, (first, stop) in enumerate(itertools.pairwise([*cuts, len(samples)]), start=1):
        segment = write_fragment(n, info.track_id, samples[first:stop])
        path = directory / f"seg_{n}.m4s"
        _write(path, segment)
        start = max(presented[first], 0)  # the edit list starts presentation at 0
        paths.append(path)
        starts.append(start)
        durations.append((presented[stop] if stop < len(samples) else end) - start)
        sizes.append(len(segment))
    out.unlink()
    return _packaged(info, directory, paths, starts, durations, sizes)


def audio_cuts(presented: Sequence[int], boundaries: Sequence[int], end: int) -> list[int]:
    """Index of the first sample of each audio segment: the first sample presented at or after
    the segment's start (`presented` ascending, ticks; `boundaries` the segment starts, the
    first 0 taking the samples before 0 too, such as the AAC priming; `end` the track's end).

    Each segment then starts less than one sample duration after its boundary. A boundary no
    sample reaches (the track ends first) is an error, not a missing segment.
    """
    if not presented:
        raise PackagingError("the audio track has no samples")
    cuts = [0]
    for k, boundary in enumerate(boundaries[1:], start=2):
        if boundary <= boundaries[k - 2]:
            raise PackagingError(
                f"audio segment {k} starts at {boundary}, not after segment {k - 1}"
            )
        cut = bisect.bisect_left(presented, boundary)
        if cut >= len(presented):
            raise PackagingError(
                f"audio segment {k} should start at tick {boundary}, but the track ends at {end}"
            )
        if cut == cuts[-1]:
            raise PackagingError(f"audio segment {k - 1} would hold no sample")
        cuts.append(cut)
    return cuts


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
