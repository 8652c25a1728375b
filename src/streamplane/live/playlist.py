"""Low-latency HLS playlists written from a list of segments and parts: a pure core.

ffmpeg's own HLS muxer writes no partial segments, preload hints or blocking reloads (it knows
only the older community LHLS), so a live channel's media playlists are written here, over the
CMAF fragments ffmpeg produces. Everything here is plain data in, text or a decision out: no
clock, no files. References: RFC 8216bis (draft-pantos-hls-rfc8216bis), sections 4.4.3.7
(EXT-X-PART-INF), 4.4.3.8 (EXT-X-SERVER-CONTROL), 4.4.4.9 (EXT-X-PART), 4.4.5.3
(EXT-X-PRELOAD-HINT) and 6.2.5.2 (blocking playlist reload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

__all__ = [
    "PART_HOLD_BACK_PARTS",
    "BadReload",
    "Part",
    "Rendition",
    "Segment",
    "Window",
    "master_playlist",
    "media_playlist",
    "part_name",
    "reload_ready",
    "segment_name",
]

# RFC 8216bis: PART-HOLD-BACK at least twice the part target, three times recommended.
PART_HOLD_BACK_PARTS: Final = 3.0
# Parts are listed for the segments of about the last three target durations (the spec lets a
# server drop older parts: players only ever join near the live edge with them).
_PART_SEGMENTS: Final = 3


@dataclass(frozen=True)
class Part:
    """One partial segment (a CMAF fragment) and its file."""

    duration: float  # seconds
    independent: bool  # starts with a sync sample: a player may start decoding here
    uri: str


@dataclass(frozen=True)
class Segment:
    """One segment: complete when ``duration`` is set, else still receiving parts."""

    msn: int
    uri: str
    parts: tuple[Part, ...]
    map_uri: str  # the init segment of the encoder run it came from
    program_date_time: float  # wall-clock seconds of its first frame (UNIX epoch)
    discontinuity: bool = False  # the encoder restarted before it (a new feed, a slate)
    duration: float | None = None
    start: float = 0.0  # media time of its first sample, seconds on its encoder run's timeline


@dataclass(frozen=True)
class Window:
    """A media playlist's content: the DVR window of one rendition, oldest first.

    ``segments`` ends with the open segment (``duration is None``) while the channel is live;
    ``discontinuity_sequence`` counts the discontinuities of segments that left the window.
    """

    segments: tuple[Segment, ...]
    part_target: float
    segment_target: float
    discontinuity_sequence: int = 0
    ended: bool = False

    @property
    def first_msn(self) -> int:
        return self.segments[0].msn if self.segments else 0

    def last_part(self) -> tuple[int, int] | None:
        """(msn, part index) of the newest part, or None before the first."""
        for seg in reversed(self.segments):
            if seg.parts:
                return seg.msn, len(seg.parts) - 1
        return None

    def next_part(self) -> tuple[int, int]:
        """(msn, part index) of the part that comes next: what the preload hint names."""
        if not self.segments:
            return 0, 0
        last = self.segments[-1]
        if last.duration is None:
            return last.msn, len(last.parts)
        return last.msn + 1, 0


class BadReload(ValueError):
    """A blocking reload that can never be answered (RFC 8216bis 6.2.5.2: 400)."""


def reload_ready(window: Window, msn: int, part: int | None) -> bool:
    """Whether a playlist request with ``_HLS_msn=msn`` (``_HLS_part=part``) can be answered.

    Ready once the window holds that part of that segment, or something later; without a
    part, once segment ``msn`` is complete (or later ones exist). A request more than three
    target durations ahead of the live edge is refused with :class:`BadReload`, as is a
    negative one or a part without a segment number; an ended channel answers everything.
    """
    if msn < 0 or (part is not None and part < 0):
        raise BadReload("_HLS_msn and _HLS_part must not be negative")
    if window.ended:
        return True
    segments = window.segments
    if not segments:
        return False
    newest = segments[-1]
    complete_up_to = newest.msn if newest.duration is not None else newest.msn - 1
    if msn > complete_up_to + 2:  # "greater than the last segment's number plus two"
        raise BadReload(f"_HLS_msn={msn} is too far ahead of the live edge ({complete_up_to})")
    if part is None:
        return msn <= complete_up_to
    last = window.last_part()
    if last is None:
        return False
    return (msn, part) <= last or msn < last[0]


def _attrs(*pairs: tuple[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs)


def _seconds(value: float) -> str:
    return f"{value:.5f}".rstrip("0").rstrip(".") if value else "0"


def _date(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def media_playlist(window: Window) -> str:
    """The LL-HLS media playlist of ``window``."""
    target = max(
        [math.ceil(window.segment_target)]
        + [round(s.duration) for s in window.segments if s.duration is not None]
    )
    part_target = window.part_target
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:9",
        f"#EXT-X-TARGETDURATION:{target}",
        "#EXT-X-SERVER-CONTROL:"
        + _attrs(
            ("CAN-BLOCK-RELOAD", "YES"),
            ("PART-HOLD-BACK", _seconds(PART_HOLD_BACK_PARTS * part_target)),
        ),
        f"#EXT-X-PART-INF:PART-TARGET={_seconds(part_target)}",
        f"#EXT-X-MEDIA-SEQUENCE:{window.first_msn}",
        f"#EXT-X-DISCONTINUITY-SEQUENCE:{window.discontinuity_sequence}",
    ]
    with_parts = {s.msn for s in window.segments[-_PART_SEGMENTS:]}
    map_uri = None
    for seg in window.segments:
        if seg.duration is None and not seg.parts:
            continue  # nothing of it yet: the preload hint names its first part
        if seg.discontinuity and map_uri is not None:
            lines.append("#EXT-X-DISCONTINUITY")
        if seg.map_uri != map_uri:
            lines.append(f'#EXT-X-MAP:URI="{seg.map_uri}"')
            map_uri = seg.map_uri
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(seg.program_date_time)}")
        if seg.msn in with_parts:
            for part in seg.parts:
                pairs = [("DURATION", _seconds(part.duration)), ("URI", f'"{part.uri}"')]
                if part.independent:
                    pairs.append(("INDEPENDENT", "YES"))
                lines.append("#EXT-X-PART:" + _attrs(*pairs))
        if seg.duration is not None:
            lines.append(f"#EXTINF:{_seconds(seg.duration)},")
            lines.append(seg.uri)
    if window.ended:
        lines.append("#EXT-X-ENDLIST")
    elif window.segments:
        msn, index = window.next_part()
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{part_name(msn, index)}"')
    return "\n".join(lines) + "\n"


def part_name(msn: int, index: int) -> str:
    """The file name of part ``index`` of segment ``msn``."""
    return f"seg_{msn}.{index}.m4s"


def segment_name(msn: int) -> str:
    return f"seg_{msn}.m4s"


@dataclass(frozen=True)
class Rendition:
    """One entry of the master playlist: a video rung or the audio track."""

    uri: str
    codecs: str
    bandwidth: int
    width: int = 0
    height: int = 0
    audio: bool = False


def master_playlist(renditions: list[Rendition]) -> str:
    """The multivariant playlist: every video rung, with the audio rendition as its group."""
    audio = [r for r in renditions if r.audio]
    videos = sorted((r for r in renditions if not r.audio), key=lambda r: -r.bandwidth)
    if not videos:
        raise ValueError("a live channel needs at least one video rendition")
    lines = ["#EXTM3U", "#EXT-X-VERSION:9", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for track in audio[:1]:
        lines.append(
            "#EXT-X-MEDIA:"
            + _attrs(
                ("TYPE", "AUDIO"),
                ("GROUP-ID", '"aud"'),
                ("NAME", '"main"'),
                ("DEFAULT", "YES"),
                ("AUTOSELECT", "YES"),
                ("URI", f'"{track.uri}"'),
            )
        )
    extra_bw = audio[0].bandwidth if audio else 0
    for video in videos:
        codecs = video.codecs + (f",{audio[0].codecs}" if audio else "")
        pairs = [
            ("BANDWIDTH", str(video.bandwidth + extra_bw)),
            ("CODECS", f'"{codecs}"'),
            ("RESOLUTION", f"{video.width}x{video.height}"),
        ]
        if audio:
            pairs.append(("AUDIO", '"aud"'))
        lines.append("#EXT-X-STREAM-INF:" + _attrs(*pairs))
        lines.append(video.uri)
    return "\n".join(lines) + "\n"
