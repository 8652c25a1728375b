"""HLS playlists and the DASH MPD of a title package, as text.

Pure functions of the title contract (`title.py`): no file is read or written here. The layout
they describe is the package's: video rung `<id>` in `v/<id>/`, audio rendition `<id>` in
`a/<id>/`, each directory holding `init.mp4`, `seg_1.m4s`, `seg_2.m4s`, ... and `playlist.m3u8`.
"""

from __future__ import annotations

import math
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from streamplane.media.errors import PackagingError
from streamplane.media.title import AudioRendition, Rung, Title

__all__ = [
    "AUDIO_GROUP",
    "dash_bandwidth",
    "dash_mpd",
    "hls_master",
    "hls_media_playlist",
    "package_files",
    "segment_name",
]

AUDIO_GROUP = "aud"
HLS_VERSION = 7  # EXT-X-MAP in a non-I-frame playlist needs 6; 7 keeps room for SERVICE-n ids
DASH_NS = "urn:mpeg:dash:schema:mpd:2011"
DASH_PROFILE = "urn:mpeg:dash:profile:isoff-live:2011"
CHANNEL_SCHEME = "urn:mpeg:dash:23003:3:audio_channel_configuration:2011"
FIRST_SEGMENT_NUMBER = 1


def segment_name(number: int) -> str:
    """File name of media segment `number` (counted from 1) inside a rung's directory."""
    if number < FIRST_SEGMENT_NUMBER:
        raise ValueError(f"segment numbers start at {FIRST_SEGMENT_NUMBER}, got {number}")
    return f"seg_{number}.m4s"


def package_files(title: Title) -> list[str]:
    """Every file an edge needs to serve the title, relative to its directory, manifests first.

    What a proactive fill pulls: manifests, then each rendition's init segment, playlist and
    media segments. The report and the encode's working files are not part of it.
    """
    files = ["title.json", title.hls, title.dash, *title.artwork]
    renditions: list[tuple[str, str, int]] = [
        (r.init, r.playlist, len(r.segment_bytes)) for r in title.rungs
    ]
    renditions += [(a.init, a.playlist, len(a.segments)) for a in title.audio]
    for init, playlist, count in renditions:
        directory = posixpath.dirname(init)
        files += [init, playlist]
        files += [
            posixpath.join(directory, segment_name(n))
            for n in range(FIRST_SEGMENT_NUMBER, FIRST_SEGMENT_NUMBER + count)
        ]
    return files


# ---------------------------------------------------------------------------------------------
# HLS


def hls_master(title: Title) -> str:
    """The multivariant playlist (RFC 8216 4.3.4): one variant per rung, one audio group."""
    if not title.rungs:
        raise PackagingError(f"title {title.title!r} has no rungs to list")
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{HLS_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    names = _audio_names(title.audio)
    for i, rendition in enumerate(title.audio):
        attrs = [
            "TYPE=AUDIO",
            f"GROUP-ID={_quoted(AUDIO_GROUP)}",
            f"NAME={_quoted(names[i])}",
            f"LANGUAGE={_quoted(rendition.language)}",
            # One default per group (RFC 8216 4.3.4.1.1); the first rendition is the main one.
            f"DEFAULT={'YES' if i == 0 else 'NO'}",
            "AUTOSELECT=YES",
            f"CHANNELS={_quoted(str(rendition.channels))}",
            f"URI={_quoted(rendition.playlist)}",
        ]
        lines.append("#EXT-X-MEDIA:" + ",".join(attrs))

    # The client may pair any rung with any rendition of the group, so a variant has to
    # announce the worst pairing (4.3.4.2), and every codec the group may bring along.
    audio_peak = max((a.peak_bitrate_bps for a in title.audio), default=0)
    audio_average = max((a.average_bitrate_bps for a in title.audio), default=0)
    audio_codecs = list(dict.fromkeys(a.codec_string for a in title.audio))
    for rung in sorted(title.rungs, key=lambda r: (r.peak_bitrate_bps, r.average_bitrate_bps)):
        attrs = [
            f"BANDWIDTH={rung.peak_bitrate_bps + audio_peak}",
            f"AVERAGE-BANDWIDTH={rung.average_bitrate_bps + audio_average}",
            f"CODECS={_quoted(','.join([rung.codec_string, *audio_codecs]))}",
            f"RESOLUTION={rung.width}x{rung.height}",
            f"FRAME-RATE={float(_frame_rate(rung.frame_rate)):.3f}",
        ]
        if title.audio:
            attrs.append(f"AUDIO={_quoted(AUDIO_GROUP)}")
        lines.append("#EXT-X-STREAM-INF:" + ",".join(attrs))
        lines.append(_uri_line(rung.playlist))
    return "\n".join(lines) + "\n"


def hls_media_playlist(durations_s: list[float], init_uri: str, segment_uris: list[str]) -> str:
    """A VOD media playlist of fMP4 segments (RFC 8216 4.3.3), URIs relative to the playlist."""
    if len(durations_s) != len(segment_uris):
        raise PackagingError(
            f"{len(durations_s)} segment durations for {len(segment_uris)} segment URIs"
        )
    if not durations_s:
        raise PackagingError("a media playlist needs at least one segment")
    extinfs = []
    for i, duration in enumerate(durations_s):
        if not math.isfinite(duration) or duration <= 0:
            raise PackagingError(f"segment {i + FIRST_SEGMENT_NUMBER} has duration {duration!r}")
        extinfs.append(f"{duration:.6f}")
    # The rule binds the EXTINF values as written, so round what the client will read; and half
    # up, which is never below round-half-even, so either reading of "nearest" is satisfied.
    target = max(
        int(Decimal(text).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for text in extinfs
    )
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{HLS_VERSION}",
        f"#EXT-X-TARGETDURATION:{max(target, 1)}",
        f"#EXT-X-MEDIA-SEQUENCE:{FIRST_SEGMENT_NUMBER}",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
        f"#EXT-X-MAP:URI={_quoted(init_uri)}",
    ]
    for extinf, uri in zip(extinfs, segment_uris, strict=True):
        lines.append(f"#EXTINF:{extinf},")
        lines.append(_uri_line(uri))
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def _audio_names(renditions: Sequence[AudioRendition]) -> list[str]:
    # NAME must be unique within a group (4.3.4.1.1); the language alone is the friendliest.
    languages = [a.language for a in renditions]
    return [
        a.language if languages.count(a.language) == 1 else f"{a.language} ({a.id})"
        for a in renditions
    ]


def _quoted(value: str) -> str:
    if any(c in value for c in '"\r\n'):
        raise PackagingError(f"{value!r} cannot be an HLS quoted-string (quote or line break)")
    return f'"{value}"'


def _uri_line(uri: str) -> str:
    if not uri or uri.startswith("#") or any(c in uri for c in "\r\n"):
        raise PackagingError(f"{uri!r} cannot be a URI line of a playlist")
    return uri


def _frame_rate(text: str) -> Fraction:
    try:
        rate = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise PackagingError(f"frame rate {text!r} is not a number or a ratio") from None
    if rate <= 0:
        raise PackagingError(f"frame rate {text!r} is not positive")
    return rate


# ---------------------------------------------------------------------------------------------
# DASH


def dash_bandwidth(
    segment_bits: list[int], segment_durations_s: list[float], min_buffer_time_s: float
) -> int:
    """The smallest integer @bandwidth (bit/s) that honours ISO/IEC 23009-1 5.3.5.2.

    The promise is: delivered continuously at B bit/s from any SAP, a client that starts playing
    minBufferTime after the first bit arrives never stalls. Every segment starts with a SAP, so
    for every start segment k and every later segment i, all of segments k..i must have arrived
    by the time segment i is due:

        (bits[k] + ... + bits[i]) / B  <=  minBufferTime + (d[k] + ... + d[i-1])

    B is computed in exact rational arithmetic (floats are dyadic rationals), so the condition
    holds at the result and fails one bit per second below it. Bounds, with T the total duration,
    S the total bits and peak = max(bits[i] / d[i]):

    * B >= S / (T + minBufferTime - d[last])  (take k = first, i = last); so B >= S / T, the
      average, whenever the last segment lasts at least minBufferTime, and always
      B >= S / (T + minBufferTime).
    * B <= ceil(peak) whenever no segment is longer than minBufferTime, because then
      bits[k..i] <= peak * (d[k..i-1] + d[i]) <= peak * (d[k..i-1] + minBufferTime).
    """
    if len(segment_bits) != len(segment_durations_s):
        raise ValueError(
            f"{len(segment_bits)} segment sizes for {len(segment_durations_s)} durations"
        )
    if not (math.isfinite(min_buffer_time_s) and min_buffer_time_s > 0):
        raise ValueError(f"minBufferTime must be positive, got {min_buffer_time_s!r}")
    if any(b < 0 for b in segment_bits):
        raise ValueError("segment sizes cannot be negative")
    if any(not (math.isfinite(d) and d > 0) for d in segment_durations_s):
        raise ValueError("segment durations must be positive and finite")
    total = sum(segment_bits)
    if total == 0:
        return 0
    scale, buffer_time, starts = _integer_timeline(segment_durations_s, min_buffer_time_s)
    # Feasibility is monotone in B, and B = ceil(S / minBufferTime) always suffices (every
    # window has at most S bits and at least minBufferTime of slack): bisect in between.
    lo, hi = 0, -(-total * scale // buffer_time)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _never_stalls(mid, segment_bits, scale, buffer_time, starts):
            hi = mid
        else:
            lo = mid
    return hi


def _integer_timeline(durations: list[float], buffer_s: float) -> tuple[int, int, list[int]]:
    """(scale, buffer, segment starts): times as exact integers, in units of 1/scale second."""
    exact = [Fraction(d) for d in durations]
    buffer = Fraction(buffer_s)
    scale = math.lcm(buffer.denominator, *(d.denominator for d in exact))
    starts = []
    at = 0
    for d in exact:
        starts.append(at)
        at += d.numerator * (scale // d.denominator)
    return scale, buffer.numerator * (scale // buffer.denominator), starts


def _never_stalls(
    bandwidth: int, bits: list[int], scale: int, buffer_time: int, starts: list[int]
) -> bool:
    # Segment i arrives in time from start k iff
    #   scale * (P[i+1] - P[k]) <= B * (buffer + start[i] - start[k]),
    # i.e. B*buffer + B*start[i] - scale*P[i+1] >= max over k <= i of (B*start[k] - scale*P[k]);
    # keeping that maximum as we go checks every (k, i) pair in one pass.
    worst_start: int | None = None
    received = 0  # P[i], bits of the segments before i
    for start, size in zip(starts, bits, strict=True):
        here = bandwidth * start - scale * received
        worst_start = here if worst_start is None else max(worst_start, here)
        received += size
        if bandwidth * (buffer_time + start) - scale * received < worst_start:
            return False
    return True


def dash_mpd(title: Title, min_buffer_time_s: float | None = None) -> str:
    """A static MPD (ISO/IEC 23009-1, isoff-live profile) over the same files as the HLS.

    minBufferTime defaults to the longest segment: with less, @bandwidth must exceed the peak
    segment bit rate (a whole segment has to arrive before it plays), which misleads players.
    """
    if not title.rungs:
        raise PackagingError(f"title {title.title!r} has no rungs to list")
    if not title.segments:
        raise PackagingError(f"title {title.title!r} has no segments")
    if min_buffer_time_s is None:
        min_buffer_time_s = max(s.duration_s for s in title.segments)
    mpd = ET.Element(
        "MPD",
        {
            "xmlns": DASH_NS,
            "profiles": DASH_PROFILE,
            "type": "static",
            "mediaPresentationDuration": _iso_duration(title.duration_s),
            "minBufferTime": _iso_duration(min_buffer_time_s),
        },
    )
    period = ET.SubElement(mpd, "Period", {"id": "0", "start": "PT0S"})
    _video_adaptation_set(period, title, min_buffer_time_s)
    for i, rendition in enumerate(title.audio, start=1):
        _audio_adaptation_set(period, i, rendition, min_buffer_time_s)
    ET.indent(mpd)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(mpd, "unicode") + "\n"


def _video_adaptation_set(period: ET.Element, title: Title, min_buffer_time_s: float) -> None:
    rungs = sorted(title.rungs, key=lambda r: r.peak_bitrate_bps)
    rates = {r.id: _frame_rate(r.frame_rate) for r in rungs}
    adaptation = ET.SubElement(
        period,
        "AdaptationSet",
        {
            "id": "0",
            "contentType": "video",
            "mimeType": "video/mp4",
            "segmentAlignment": "true",
            "startWithSAP": "1",
            "maxWidth": str(max(r.width for r in rungs)),
            "maxHeight": str(max(r.height for r in rungs)),
            "maxFrameRate": _dash_frame_rate(max(rates.values())),
        },
    )
    directory = _id_template([(r.id, r.init) for r in rungs], "rung")
    timescale = title.video_timescale
    _segment_template(
        adaptation,
        timescale,
        directory,
        [(s.start_ticks, s.duration_ticks) for s in title.segments],
    )
    durations = [s.duration_ticks / timescale for s in title.segments]
    for rung in rungs:
        _check_segment_count(rung, len(title.segments))
        ET.SubElement(
            adaptation,
            "Representation",
            {
                "id": rung.id,
                "codecs": rung.codec_string,
                "width": str(rung.width),
                "height": str(rung.height),
                "frameRate": _dash_frame_rate(rates[rung.id]),
                "sar": "1:1",
                "bandwidth": str(
                    dash_bandwidth(
                        [8 * b for b in rung.segment_bytes], durations, min_buffer_time_s
                    )
                ),
            },
        )


def _audio_adaptation_set(
    period: ET.Element, index: int, rendition: AudioRendition, min_buffer_time_s: float
) -> None:
    if not rendition.segments:
        raise PackagingError(f"audio rendition {rendition.id!r} has no segments")
    adaptation = ET.SubElement(
        period,
        "AdaptationSet",
        {
            "id": str(index),
            "contentType": "audio",
            "mimeType": "audio/mp4",
            "lang": rendition.language,
            "segmentAlignment": "true",
            "startWithSAP": "1",
        },
    )
    directory = _id_template([(rendition.id, rendition.init)], "audio rendition")
    segments = rendition.segments
    _segment_template(
        adaptation,
        rendition.timescale,
        directory,
        [(s.start_ticks, s.duration_ticks) for s in segments],
    )
    bandwidth = dash_bandwidth(
        [8 * s.bytes for s in segments],
        [s.duration_ticks / rendition.timescale for s in segments],
        min_buffer_time_s,
    )
    representation = ET.SubElement(
        adaptation,
        "Representation",
        {
            "id": rendition.id,
            "codecs": rendition.codec_string,
            "audioSamplingRate": str(rendition.sample_rate),
            "bandwidth": str(bandwidth),
        },
    )
    ET.SubElement(
        representation,
        "AudioChannelConfiguration",
        {"schemeIdUri": CHANNEL_SCHEME, "value": str(rendition.channels)},
    )


def _segment_template(
    parent: ET.Element, timescale: int, directory: str, timeline: list[tuple[int, int]]
) -> None:
    template = ET.SubElement(
        parent,
        "SegmentTemplate",
        {
            "timescale": str(timescale),
            "initialization": f"{directory}/init.mp4",
            "media": f"{directory}/seg_$Number$.m4s",
            "startNumber": str(FIRST_SEGMENT_NUMBER),
        },
    )
    runs = ET.SubElement(template, "SegmentTimeline")
    for start, duration, repeat, explicit in _timeline_runs(timeline):
        attrs = {"t": str(start)} if explicit else {}
        attrs["d"] = str(duration)
        if repeat:
            attrs["r"] = str(repeat)
        ET.SubElement(runs, "S", attrs)


def _timeline_runs(timeline: list[tuple[int, int]]) -> list[tuple[int, int, int, bool]]:
    """(t, d, r, whether t must be written) per S element: equal back-to-back segments merge."""
    runs: list[tuple[int, int, int, bool]] = []
    expected: int | None = None
    for start, duration in timeline:
        if duration <= 0:
            raise PackagingError(f"segment at tick {start} has duration {duration}")
        if runs and start == expected and runs[-1][1] == duration:
            t, d, r, explicit = runs[-1]
            runs[-1] = (t, d, r + 1, explicit)
        else:
            # t may only be left out where it follows on from the previous S without a gap.
            runs.append((start, duration, 0, start != expected))
        expected = start + duration
    return runs


def _id_template(items: list[tuple[str, str]], what: str) -> str:
    """The directory part of the templates, `<dir>/$RepresentationID$`, checked against every
    representation's init path, since one SegmentTemplate serves them all."""
    templates = set()
    for ident, init in items:
        if not ident or any(c.isspace() or c in '/$"' for c in ident):
            raise PackagingError(f"{what} id {ident!r} cannot name a directory in a template")
        parent, name = posixpath.split(init)
        head, last = posixpath.split(parent)
        if name != "init.mp4" or last != ident:
            raise PackagingError(
                f"{what} {ident!r} has init {init!r}; expected <dir>/{ident}/init.mp4"
            )
        templates.add(posixpath.join(head, "$RepresentationID$"))
    if len(templates) != 1:
        raise PackagingError(f"{what}s do not share one directory: {sorted(templates)}")
    return templates.pop()


def _check_segment_count(rung: Rung, expected: int) -> None:
    if len(rung.segment_bytes) != expected:
        raise PackagingError(
            f"rung {rung.id!r} has {len(rung.segment_bytes)} segment sizes for {expected} segments"
        )


def _dash_frame_rate(rate: Fraction) -> str:
    return str(rate.numerator) if rate.denominator == 1 else str(rate)


def _iso_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        raise PackagingError(f"{seconds!r} is not a duration")
    return f"PT{seconds:.3f}S"
