"""A live channel's DASH MPD, from the same CMAF segments as its HLS playlists: a pure core.

A dynamic MPD (ISO/IEC 23009-1, isoff-live profile) over the window's complete segments,
addressed by ``seg_$Number$.m4s`` with a SegmentTimeline per rendition (video and audio are cut
at different instants). Each encoder run (a feed, a slate, the feed again) is a Period of its
own, with its own init segment: DASH's discontinuity. The availability start is the UNIX epoch,
so a Period starts at the wall-clock time (the program date) of its first segment, and a
segment's time in the Period is its media time less the Period's presentationTimeOffset.

Parts are not addressed: the MPD plays at segment granularity, a few seconds behind the live
edge (low-latency DASH, chunked delivery of the segment being written, is not done).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from streamplane.live.playlist import Segment, Window

__all__ = ["DashRendition", "live_mpd"]

_NS: Final = "urn:mpeg:dash:schema:mpd:2011"
_PROFILE: Final = "urn:mpeg:dash:profile:isoff-live:2011"
_TIMESCALE: Final = 1000


@dataclass(frozen=True)
class DashRendition:
    """One rendition as the MPD describes it, and its window."""

    id: str
    codecs: str
    bandwidth: int
    window: Window
    width: int = 0
    height: int = 0
    audio: bool = False


def _date(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _duration(seconds: float) -> str:
    return f"PT{seconds:.3f}S"


def live_mpd(renditions: list[DashRendition], now: float, dvr_seconds: float) -> str:
    """The MPD of a channel at wall-clock ``now`` (UNIX seconds)."""
    if not any(not r.audio for r in renditions):
        raise ValueError("a live channel needs at least one video rendition")
    video = next(r for r in renditions if not r.audio)
    segment_target = video.window.segment_target
    mpd = ET.Element(
        "MPD",
        {
            "xmlns": _NS,
            "profiles": _PROFILE,
            "type": "dynamic",
            "availabilityStartTime": "1970-01-01T00:00:00Z",
            "publishTime": _date(now),
            "minimumUpdatePeriod": _duration(segment_target),
            "minBufferTime": _duration(segment_target),
            "timeShiftBufferDepth": _duration(dvr_seconds),
            "suggestedPresentationDelay": _duration(3 * segment_target),
        },
    )
    # Periods by encoder run, as the video's segments show them (every rendition begins a
    # run together).
    runs: dict[str, list[Segment]] = {}
    for seg in video.window.segments:
        if seg.duration is not None:
            runs.setdefault(seg.map_uri, []).append(seg)
    videos = [r for r in renditions if not r.audio]
    audios = [r for r in renditions if r.audio]
    for map_uri, segments in runs.items():
        period = ET.SubElement(
            mpd,
            "Period",
            {"id": map_uri.removesuffix(".mp4"), "start": _duration(segments[0].program_date_time)},
        )
        # The rungs share their segment boundaries (the encoder forces the same keyframes):
        # one AdaptationSet, one template, so a player switches between them.
        _adaptation_set(period, "0", videos, map_uri, segments[0])
        for number, audio in enumerate(audios, start=1):
            _adaptation_set(period, str(number), [audio], map_uri, segments[0])
    ET.indent(mpd)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(mpd, "unicode") + "\n"


def _adaptation_set(
    period: ET.Element,
    set_id: str,
    renditions: list[DashRendition],
    map_uri: str,
    first_video: Segment,
) -> None:
    first = renditions[0]
    segments = [s for s in first.window.segments if s.duration is not None and s.map_uri == map_uri]
    if not segments:
        return
    audio = first.audio
    attrs = {
        "id": set_id,
        "contentType": "audio" if audio else "video",
        "mimeType": "audio/mp4" if audio else "video/mp4",
        "segmentAlignment": "true",
        "startWithSAP": "1",
    }
    adaptation = ET.SubElement(period, "AdaptationSet", attrs)
    # The Period starts at the video's first segment: media time there is the offset, on the
    # run's own timeline (audio and video of a run share it).
    template = ET.SubElement(
        adaptation,
        "SegmentTemplate",
        {
            "timescale": str(_TIMESCALE),
            "presentationTimeOffset": str(round(first_video.start * _TIMESCALE)),
            "initialization": f"$RepresentationID$/{map_uri}",
            "media": "$RepresentationID$/seg_$Number$.m4s",
            "startNumber": str(segments[0].msn),
        },
    )
    timeline = ET.SubElement(template, "SegmentTimeline")
    expected = None
    for seg in segments:
        t = round(seg.start * _TIMESCALE)
        d = round((seg.duration or 0.0) * _TIMESCALE)
        ET.SubElement(timeline, "S", {"d": str(d)} if t == expected else {"t": str(t), "d": str(d)})
        expected = t + d
    for rendition in renditions:
        rep = {
            "id": rendition.id,
            "codecs": rendition.codecs,
            "bandwidth": str(rendition.bandwidth),
        }
        if audio:
            rep["audioSamplingRate"] = "48000"
        else:
            rep |= {"width": str(rendition.width), "height": str(rendition.height), "sar": "1:1"}
        ET.SubElement(adaptation, "Representation", rep)
