"""The title package contract (`catalog/<title>/title.json`) shared by every plane.

The edge serves the files it names, the control plane registers titles from it, the player's
ABR reads per-segment sizes and VMAF from it. Times are kept both in seconds (for people) and in
the media timescale (ticks), which manifests need to be exact.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

SCHEMA_VERSION = 1


class AudioTrackInfo(msgspec.Struct, frozen=True):
    index: int
    codec: str
    channels: int
    sample_rate: int
    language: str = "und"


class SourceInfo(msgspec.Struct, frozen=True):
    """What probing the source found."""

    path: str
    duration_s: float
    width: int
    height: int
    fps_num: int
    fps_den: int
    n_frames: int
    video_codec: str
    audio: tuple[AudioTrackInfo, ...] = ()

    @property
    def fps(self) -> float:
        return self.fps_num / self.fps_den


class Shot(msgspec.Struct, frozen=True):
    index: int
    start_frame: int
    end_frame: int  # exclusive

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame


class Segment(msgspec.Struct, frozen=True):
    """One media segment: the same frames in every rung; it starts with an IDR frame."""

    index: int
    shot: int
    start_frame: int
    end_frame: int  # exclusive

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame


class ShotChoice(msgspec.Struct, frozen=True):
    """The encode a rung uses for one shot: its point on that shot's convex hull."""

    shot: int
    width: int
    height: int
    quantiser: int
    bits: int
    vmaf: float


class Rung(msgspec.Struct, frozen=True):
    id: str
    codec: str
    codec_string: str
    width: int
    height: int
    frame_rate: str
    average_bitrate_bps: int
    peak_bitrate_bps: int
    vmaf: float
    vmaf_harmonic: float
    psnr_y: float
    init: str
    playlist: str
    segment_bytes: tuple[int, ...]
    shots: tuple[ShotChoice, ...]
    segment_vmaf: tuple[float, ...] = ()  # mean VMAF of each segment, for quality-aware ABR


class AudioSegment(msgspec.Struct, frozen=True):
    start_ticks: int
    duration_ticks: int
    bytes: int


class AudioRendition(msgspec.Struct, frozen=True):
    id: str
    codec: str
    codec_string: str
    channels: int
    sample_rate: int
    language: str
    average_bitrate_bps: int
    peak_bitrate_bps: int
    timescale: int
    init: str
    playlist: str
    segments: tuple[AudioSegment, ...]


class SegmentTiming(msgspec.Struct, frozen=True):
    """Where a video segment sits on the media timeline (identical in every rung)."""

    index: int
    shot: int
    start_ticks: int
    duration_ticks: int
    start_s: float
    duration_s: float


class EncodeSummary(msgspec.Struct, frozen=True):
    mode: str
    codec: str
    preset: str
    probe_preset: str
    encodes_run: int
    cpu_seconds: float


class Title(msgspec.Struct, frozen=True):
    schema: int
    title: str
    duration_s: float
    frame_rate: str
    width: int
    height: int
    video_timescale: int
    shots: tuple[Shot, ...]
    segments: tuple[SegmentTiming, ...]
    rungs: tuple[Rung, ...]
    audio: tuple[AudioRendition, ...]
    hls: str = "master.m3u8"
    dash: str = "manifest.mpd"
    artwork: tuple[str, ...] = ()  # images a catalog shows, relative to the title directory
    encode: EncodeSummary | None = None


def encode_title(title: Title) -> bytes:
    return msgspec.json.format(msgspec.json.encode(title), indent=2)


def decode_title(data: bytes) -> Title:
    return msgspec.json.decode(data, type=Title)


def load_title(directory: Path) -> Title:
    """Read `title.json` from a title package directory."""
    return decode_title((directory / "title.json").read_bytes())
