"""A live channel's DASH MPD, from the same CMAF segments as its HLS playlists: a pure core.

A low-latency dynamic MPD (ISO/IEC 23009-1 isoff-live, DASH-IF low-latency live) over the
window's segments, addressed by ``seg_$Number$.m4s`` with a SegmentTimeline per rendition
(video and audio are cut at different instants). Each encoder run (a feed, a slate, the feed
again) is a Period of its own, with its own init segment: DASH's discontinuity. The
availability start is the UNIX epoch, so a Period starts at the wall-clock time (the program
date) of its first segment, and a segment's time in the Period is its media time less the
Period's presentationTimeOffset.

Low latency: the segment being written is listed too, at its nominal length (the encoder
forces a keyframe every segment target, so that is its length unless the feed is lost), and
``availabilityTimeOffset`` (the segment target less one part) with
``availabilityTimeComplete="false"`` tells a player it may ask for a segment once its first
part (CMAF chunk) exists; the origin sends the segment being written chunk by chunk as its
parts land. ``ServiceDescription`` gives the latency to hold, ``UTCTiming`` where to read the
origin's clock (``time`` beside the MPD), and ``timeShiftBufferDepth`` the DVR window.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from streamplane.live.playlist import Segment, Window

__all__ = ["LATENCY_PARTS", "TIME_PATH", "DashRendition", "live_mpd"]

_NS: Final = "urn:mpeg:dash:schema:mpd:2011"
_PROFILE: Final = (
    "urn:mpeg:dash:profile:isoff-live:2011,http://www.dashif.org/guidelines/low-latency-live-v5"
)
_TIMESCALE: Final = 1000
# The latency a player holds: four parts behind the newest (one more than LL-HLS's
# PART-HOLD-BACK: a DASH player learns of a segment from the MPD, not from a blocking reload).
LATENCY_PARTS: Final = 4
TIME_PATH: Final = "time"


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


def _listed(window: Window) -> list[Segment]:
    """The segments an MPD lists: the whole ones, and the one being written once it has a
    part, at its nominal length."""
    return [
        s if s.duration is not None else replace(s, duration=window.segment_target)
        for s in window.segments
        if s.duration is not None or (s.parts and not window.ended)
    ]


def live_mpd(renditions: list[DashRendition], now: float, dvr_seconds: float) -> str:
    """The MPD of a channel at wall-clock ``now`` (UNIX seconds)."""
    if not any(not r.audio for r in renditions):
        raise ValueError("a live channel needs at least one video rendition")
    video = next(r for r in renditions if not r.audio)
    segment_target = video.window.segment_target
    part_target = video.window.part_target
    latency = LATENCY_PARTS * part_target
    mpd = ET.Element(
        "MPD",
        {
            "xmlns": _NS,
            "profiles": _PROFILE,
            "type": "dynamic",
            "availabilityStartTime": "1970-01-01T00:00:00Z",
            "publishTime": _date(now),
            # a new segment is listed every segment target; asking again each part keeps a
            # player that joins late from waiting a whole segment for its next number
            "minimumUpdatePeriod": _duration(part_target),
            "minBufferTime": _duration(part_target),
            "timeShiftBufferDepth": _duration(dvr_seconds),
            "suggestedPresentationDelay": _duration(latency),
        },
    )
    service = ET.SubElement(mpd, "ServiceDescription", {"id": "0"})
    ET.SubElement(
        service,
        "Latency",
        {
            "target": str(round(latency * 1000)),
            "min": str(round(2 * part_target * 1000)),
            "max": str(round((latency + 2 * segment_target) * 1000)),
        },
    )
    ET.SubElement(service, "PlaybackRate", {"min": "0.9", "max": "1.1"})
    # Periods by encoder run, as the video's segments show them (every rendition begins a
    # run together).
    runs: dict[str, list[Segment]] = {}
    for seg in _listed(video.window):
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
    # The origin's clock, read over HTTP (resolved against the MPD's URL); an edge that
    # does not pass it on leaves the player the MPD's own time, the direct scheme.
    ET.SubElement(
        mpd, "UTCTiming", {"schemeIdUri": "urn:mpeg:dash:utc:http-iso:2014", "value": TIME_PATH}
    )
    ET.SubElement(
        mpd, "UTCTiming", {"schemeIdUri": "urn:mpeg:dash:utc:direct:2014", "value": _date(now)}
    )
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
    segments = [s for s in _listed(first.window) if s.map_uri == map_uri]
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
            # a segment may be asked for once its first part exists; it comes chunk by chunk
            "availabilityTimeOffset": f"{first.window.segment_target - first.window.part_target:g}",
            "availabilityTimeComplete": "false",
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
