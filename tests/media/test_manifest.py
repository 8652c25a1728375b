"""HLS playlists and the DASH MPD, read back with independent parsers (m3u8, mpegdash)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import m3u8
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpegdash.parser import MPEGDASHParser

from streamplane.media.errors import PackagingError
from streamplane.media.manifest import (
    dash_bandwidth,
    dash_mpd,
    hls_master,
    hls_media_playlist,
    segment_name,
)
from streamplane.media.title import (
    AudioRendition,
    AudioSegment,
    Rung,
    SegmentTiming,
    Title,
)

TIMESCALE = 12800
SEGMENT_TICKS = (25600, 32000, 20480)  # 2.0 s, 2.5 s, 1.6 s


def make_rung(
    ident: str, width: int, height: int, average: int, peak: int, sizes: list[int]
) -> Rung:
    return Rung(
        id=ident,
        codec="h264",
        codec_string="avc1.64001f",
        width=width,
        height=height,
        frame_rate="25/1",
        average_bitrate_bps=average,
        peak_bitrate_bps=peak,
        vmaf=90.0,
        vmaf_harmonic=89.0,
        psnr_y=40.0,
        init=f"v/{ident}/init.mp4",
        playlist=f"v/{ident}/playlist.m3u8",
        segment_bytes=tuple(sizes),
        shots=(),
    )


def make_title() -> Title:
    starts = [sum(SEGMENT_TICKS[:i]) for i in range(len(SEGMENT_TICKS))]
    segments = tuple(
        SegmentTiming(
            index=i,
            shot=i,
            start_ticks=start,
            duration_ticks=ticks,
            start_s=start / TIMESCALE,
            duration_s=ticks / TIMESCALE,
        )
        for i, (start, ticks) in enumerate(zip(starts, SEGMENT_TICKS, strict=True))
    )
    audio_ticks = (96256, 120832, 75712)
    audio_starts = [sum(audio_ticks[:i]) for i in range(3)]
    audio = AudioRendition(
        id="en",
        codec="aac",
        codec_string="mp4a.40.2",
        channels=2,
        sample_rate=48000,
        language="en",
        average_bitrate_bps=128_000,
        peak_bitrate_bps=131_000,
        timescale=48000,
        init="a/en/init.mp4",
        playlist="a/en/playlist.m3u8",
        segments=tuple(
            AudioSegment(start_ticks=s, duration_ticks=d, bytes=d // 48000 * 16_000 + 900)
            for s, d in zip(audio_starts, audio_ticks, strict=True)
        ),
    )
    return Title(
        schema=1,
        title="test",
        duration_s=sum(SEGMENT_TICKS) / TIMESCALE,
        frame_rate="25/1",
        width=1280,
        height=720,
        video_timescale=TIMESCALE,
        shots=(),
        segments=segments,
        # listed out of order on purpose: the manifests sort by bandwidth
        rungs=(
            make_rung("v1", 1280, 720, 1_500_000, 2_200_000, [500_000, 560_000, 300_000]),
            make_rung("v0", 640, 360, 400_000, 600_000, [130_000, 150_000, 90_000]),
        ),
        audio=(audio,),
    )


def test_master_playlist() -> None:
    title = make_title()
    text = hls_master(title)
    assert text.startswith("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n")
    master = m3u8.loads(text)
    assert master.is_variant
    assert [p.uri for p in master.playlists] == ["v/v0/playlist.m3u8", "v/v1/playlist.m3u8"]
    low, high = (p.stream_info for p in master.playlists)
    assert (low.bandwidth, low.average_bandwidth) == (600_000 + 131_000, 400_000 + 128_000)
    assert (high.bandwidth, high.average_bandwidth) == (2_200_000 + 131_000, 1_500_000 + 128_000)
    assert low.codecs == high.codecs == "avc1.64001f,mp4a.40.2"
    assert (low.resolution, high.resolution) == ((640, 360), (1280, 720))
    assert low.frame_rate == high.frame_rate == 25.0
    assert "FRAME-RATE=25.000" in text
    assert low.audio == high.audio == "aud"
    (media,) = master.media
    assert (media.type, media.group_id, media.language, media.uri) == (
        "AUDIO",
        "aud",
        "en",
        "a/en/playlist.m3u8",
    )
    assert (media.default, media.autoselect, media.channels) == ("YES", "YES", "2")


def test_master_without_audio_and_odd_frame_rate() -> None:
    title = make_title()
    ntsc = msgspec.structs.replace(title.rungs[0], frame_rate="30000/1001")
    title = msgspec.structs.replace(title, audio=(), rungs=(ntsc,))
    text = hls_master(title)
    (variant,) = m3u8.loads(text).playlists
    assert variant.stream_info.audio is None
    assert variant.stream_info.codecs == "avc1.64001f"
    assert variant.stream_info.bandwidth == 2_200_000
    assert "FRAME-RATE=29.970\n" in text
    assert "EXT-X-MEDIA" not in text


def test_master_names_two_renditions_of_one_language_apart() -> None:
    title = make_title()
    surround = msgspec.structs.replace(
        title.audio[0],
        id="en51",
        channels=6,
        codec_string="ec-3",
        peak_bitrate_bps=400_000,
        init="a/en51/init.mp4",
        playlist="a/en51/playlist.m3u8",
    )
    master = m3u8.loads(hls_master(msgspec.structs.replace(title, audio=(*title.audio, surround))))
    assert [m.name for m in master.media] == ["en (en)", "en (en51)"]
    assert [m.default for m in master.media] == ["YES", "NO"]
    assert master.playlists[0].stream_info.codecs == "avc1.64001f,mp4a.40.2,ec-3"
    assert master.playlists[0].stream_info.bandwidth == 600_000 + 400_000


def test_master_rejects_what_a_playlist_cannot_carry() -> None:
    title = make_title()
    with pytest.raises(PackagingError, match="no rungs"):
        hls_master(msgspec.structs.replace(title, rungs=()))
    bad = msgspec.structs.replace(title.rungs[0], playlist="v/v1/play\nlist.m3u8")
    with pytest.raises(PackagingError, match="URI line"):
        hls_master(msgspec.structs.replace(title, rungs=(bad,)))
    with pytest.raises(PackagingError, match="frame rate"):
        hls_master(
            msgspec.structs.replace(
                title, rungs=(msgspec.structs.replace(title.rungs[0], frame_rate="fast"),)
            )
        )


def test_media_playlist() -> None:
    durations = [t / TIMESCALE for t in SEGMENT_TICKS]
    uris = [segment_name(n) for n in range(1, 4)]
    text = hls_media_playlist(durations, "init.mp4", uris)
    playlist = m3u8.loads(text)
    assert playlist.version == 7
    assert playlist.target_duration == 3  # 2.5 rounds up
    assert playlist.media_sequence == 1
    assert playlist.playlist_type == "vod"
    assert playlist.is_endlist
    assert playlist.is_independent_segments
    assert [s.uri for s in playlist.segments] == ["seg_1.m4s", "seg_2.m4s", "seg_3.m4s"]
    assert [s.duration for s in playlist.segments] == durations
    assert playlist.segments[0].init_section.uri == "init.mp4"
    assert "#EXTINF:2.500000,\n" in text


def test_media_playlist_errors() -> None:
    with pytest.raises(PackagingError, match="2 segment durations for 1"):
        hls_media_playlist([1.0, 2.0], "init.mp4", ["seg_1.m4s"])
    with pytest.raises(PackagingError, match="at least one"):
        hls_media_playlist([], "init.mp4", [])
    with pytest.raises(PackagingError, match="duration"):
        hls_media_playlist([2.0, 0.0], "init.mp4", ["a", "b"])
    with pytest.raises(PackagingError, match="quoted-string"):
        hls_media_playlist([2.0], 'in"it.mp4', ["a"])
    with pytest.raises(ValueError):
        segment_name(0)


def _half_up(text: str) -> int:
    return int(Decimal(text).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(
    st.lists(
        st.floats(min_value=1e-3, max_value=30.0, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=30,
    )
)
def test_target_duration_rule(durations: list[float]) -> None:
    text = hls_media_playlist(
        durations, "init.mp4", [segment_name(n + 1) for n in range(len(durations))]
    )
    playlist = m3u8.loads(text)
    target = playlist.target_duration
    written = [
        line.removeprefix("#EXTINF:").rstrip(",")
        for line in text.splitlines()
        if line.startswith("#EXTINF:")
    ]
    assert len(written) == len(durations)
    rounded = [_half_up(w) for w in written]
    # RFC 8216 4.3.3.1 on the values as written, under either rounding of halves
    assert all(r <= target for r in rounded)
    assert all(round(float(w)) <= target for w in written)
    # and no larger than it must be (a target of 0 is not allowed, so 1 is the floor)
    assert target == max(1, *rounded)
    for w, d in zip(written, durations, strict=True):
        assert abs(float(w) - d) <= 5e-7


def _timeline_ticks(template: object) -> list[tuple[int, int]]:
    """(start, duration) of every segment a SegmentTemplate's SegmentTimeline describes."""
    out: list[tuple[int, int]] = []
    at = 0
    for s in template.segment_timelines[0].Ss:  # type: ignore[attr-defined]
        at = s.t if s.t is not None else at
        for _ in range((s.r or 0) + 1):
            out.append((at, s.d))
            at += s.d
    return out


def test_mpd() -> None:
    title = make_title()
    text = dash_mpd(title, min_buffer_time_s=2.0)
    ET.fromstring(text.encode())  # well-formed
    mpd = MPEGDASHParser.parse(text)
    assert mpd.type == "static"
    assert mpd.profiles == "urn:mpeg:dash:profile:isoff-live:2011"
    assert mpd.media_presentation_duration == "PT6.100S"
    assert mpd.min_buffer_time == "PT2.000S"
    (period,) = mpd.periods
    video, audio = period.adaptation_sets
    assert (video.content_type, video.mime_type) == ("video", "video/mp4")
    assert (video.max_width, video.max_height, video.max_frame_rate) == (1280, 720, "25")
    assert video.segment_alignment is True or video.segment_alignment == "true"
    (template,) = video.segment_templates
    assert template.timescale == TIMESCALE
    assert template.initialization == "v/$RepresentationID$/init.mp4"
    assert template.media == "v/$RepresentationID$/seg_$Number$.m4s"
    assert template.start_number == 1
    ticks = _timeline_ticks(template)
    assert ticks == [(s.start_ticks, s.duration_ticks) for s in title.segments]
    assert sum(d for _, d in ticks) / TIMESCALE == pytest.approx(title.duration_s)

    assert [r.id for r in video.representations] == ["v0", "v1"]
    durations = [t / TIMESCALE for t in SEGMENT_TICKS]
    for rep in video.representations:
        rung = next(r for r in title.rungs if r.id == rep.id)
        assert rep.codecs == rung.codec_string
        assert (rep.width, rep.height, rep.frame_rate, rep.sar) == (
            rung.width,
            rung.height,
            "25",
            "1:1",
        )
        bits = [8 * b for b in rung.segment_bytes]
        assert rep.bandwidth == dash_bandwidth(bits, durations, 2.0)
        # every segment here is at most 2.5 s, longer than minBufferTime: the peak bound
        # scales by 2.5 / 2.0 (see dash_bandwidth)
        peak = max(Fraction(b) / Fraction(d) for b, d in zip(bits, durations, strict=True))
        assert rep.bandwidth <= math.ceil(peak * Fraction(5, 4))

    (rendition,) = title.audio
    assert (audio.content_type, audio.mime_type, audio.lang) == ("audio", "audio/mp4", "en")
    (audio_template,) = audio.segment_templates
    assert audio_template.timescale == 48000
    assert audio_template.initialization == "a/$RepresentationID$/init.mp4"
    assert audio_template.media == "a/$RepresentationID$/seg_$Number$.m4s"
    audio_ticks = _timeline_ticks(audio_template)
    assert audio_ticks == [(s.start_ticks, s.duration_ticks) for s in rendition.segments]
    (audio_rep,) = audio.representations
    assert (audio_rep.id, audio_rep.codecs, audio_rep.audio_sampling_rate) == (
        "en",
        "mp4a.40.2",
        "48000",
    )
    (channels,) = audio_rep.audio_channel_configurations
    assert channels.scheme_id_uri == "urn:mpeg:dash:23003:3:audio_channel_configuration:2011"
    assert channels.value == "2"


def test_mpd_timeline_run_lengths_and_gaps() -> None:
    title = make_title()
    ticks = [(0, 100), (100, 100), (200, 100), (300, 50), (400, 50), (450, 50)]
    segments = tuple(
        SegmentTiming(index=i, shot=i, start_ticks=s, duration_ticks=d, start_s=0.0, duration_s=0.0)
        for i, (s, d) in enumerate(ticks)
    )
    rungs = tuple(msgspec.structs.replace(r, segment_bytes=(1000,) * 6) for r in title.rungs)
    title = msgspec.structs.replace(title, segments=segments, rungs=rungs, audio=())
    root = ET.fromstring(dash_mpd(title, min_buffer_time_s=2.0))
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    s_elements = [s.attrib for s in root.iterfind(".//d:SegmentTimeline/d:S", ns)]
    # a gap at 350 forces an explicit t; equal durations fold into r
    assert s_elements == [
        {"t": "0", "d": "100", "r": "2"},
        {"d": "50"},
        {"t": "400", "d": "50", "r": "1"},
    ]
    assert len(root.findall("d:Period/d:AdaptationSet", ns)) == 1


def test_mpd_checks_the_directory_layout() -> None:
    title = make_title()
    moved = msgspec.structs.replace(title.rungs[0], init="video/v1/init.mp4")
    with pytest.raises(PackagingError, match="do not share one directory"):
        dash_mpd(msgspec.structs.replace(title, rungs=(moved, title.rungs[1])))
    misnamed = msgspec.structs.replace(title.rungs[0], init="v/other/init.mp4")
    with pytest.raises(PackagingError, match=re.escape("expected <dir>/v1/init.mp4")):
        dash_mpd(msgspec.structs.replace(title, rungs=(misnamed,)))
    short = msgspec.structs.replace(title.rungs[0], segment_bytes=(1, 2))
    with pytest.raises(PackagingError, match="2 segment sizes for 3 segments"):
        dash_mpd(msgspec.structs.replace(title, rungs=(short,)))


# ---------------------------------------------------------------------------------------------
# dash_bandwidth


def never_stalls(bandwidth: int, bits: list[int], durations: list[float], buffer_s: float) -> bool:
    """The definition, checked pair by pair in exact arithmetic: started at any segment k,
    delivery at `bandwidth` has each later segment i in full by its presentation time."""
    d = [Fraction(x) for x in durations]
    for k in range(len(bits)):
        received, elapsed = 0, Fraction(0)
        for i in range(k, len(bits)):
            received += bits[i]
            if received > bandwidth * (Fraction(buffer_s) + elapsed):
                return False
            elapsed += d[i]
    return True


segment_lists = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 10**8), min_size=n, max_size=n),
        st.lists(
            st.floats(min_value=0.01, max_value=10.0, allow_nan=False, allow_infinity=False),
            min_size=n,
            max_size=n,
        ),
    )
)
buffer_times = st.floats(min_value=0.05, max_value=10.0, allow_nan=False, allow_infinity=False)


@given(segment_lists, buffer_times)
def test_dash_bandwidth_is_the_smallest_that_never_stalls(
    segments: tuple[list[int], list[float]], buffer_s: float
) -> None:
    bits, durations = segments
    bandwidth = dash_bandwidth(bits, durations, buffer_s)
    assert never_stalls(bandwidth, bits, durations, buffer_s)
    if bandwidth >= 1:
        assert not never_stalls(bandwidth - 1, bits, durations, buffer_s)
    assert (bandwidth == 0) == (sum(bits) == 0)


@given(segment_lists, buffer_times)
def test_dash_bandwidth_bounds(segments: tuple[list[int], list[float]], buffer_s: float) -> None:
    bits, durations = segments
    bandwidth = dash_bandwidth(bits, durations, buffer_s)
    d = [Fraction(x) for x in durations]
    buffer = Fraction(buffer_s)
    total_time = sum(d, Fraction(0))
    # Lower bound, from starting at the first segment and finishing the last one.
    assert bandwidth >= sum(bits) / (total_time + buffer - d[-1])
    if d[-1] >= buffer:
        assert bandwidth >= sum(bits) / total_time  # the average
    # Upper bound: the peak segment rate, stretched when segments outlast the buffer.
    peak = max(Fraction(b) / x for b, x in zip(bits, d, strict=True))
    stretch = max(Fraction(1), max(d) / buffer)
    assert bandwidth <= math.ceil(peak * stretch)
    if max(d) <= buffer:
        assert bandwidth <= math.ceil(peak)


@given(st.integers(1, 10**7), st.integers(1, 50), st.sampled_from([1.0, 2.0, 4.0]))
def test_dash_bandwidth_of_constant_bitrate_is_the_bitrate(
    rate: int, count: int, seconds: float
) -> None:
    bits = [rate * int(seconds)] * count
    assert dash_bandwidth(bits, [seconds] * count, seconds) == rate


def test_dash_bandwidth_examples_and_errors() -> None:
    assert dash_bandwidth([1_000_000], [2.0], 2.0) == 500_000
    assert dash_bandwidth([1_000_000], [4.0], 2.0) == 500_000  # one long segment: buffer bound
    # a big segment after small ones: starting right at it is the worst case
    assert dash_bandwidth([10, 10, 3_000_000], [2.0, 2.0, 2.0], 2.0) == 1_500_000
    assert dash_bandwidth([], [], 2.0) == 0
    assert dash_bandwidth([0, 0], [1.0, 1.0], 2.0) == 0
    with pytest.raises(ValueError):
        dash_bandwidth([1], [1.0, 2.0], 2.0)
    with pytest.raises(ValueError):
        dash_bandwidth([1], [1.0], 0.0)
    with pytest.raises(ValueError):
        dash_bandwidth([1], [0.0], 2.0)
    with pytest.raises(ValueError):
        dash_bandwidth([-1], [1.0], 2.0)


def test_dash_bandwidth_is_fast_for_a_long_title() -> None:
    # two hours of 2 s segments
    n = 3600
    bits = [(i * 7919) % 4_000_000 + 1_000_000 for i in range(n)]
    bandwidth = dash_bandwidth(bits, [2.0] * n, 2.0)
    assert max(bits) / 2 <= bandwidth <= max(bits) / 2 + 1


def test_mpd_min_buffer_time_defaults_to_the_longest_segment() -> None:
    title = make_title()
    root = ET.fromstring(dash_mpd(title))
    longest = max(seg.duration_s for seg in title.segments)
    assert root.attrib["minBufferTime"] == f"PT{longest:.3f}S"
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    by_id = {r.id: r for r in title.rungs}
    for rep in root.iterfind(".//d:Representation", ns):
        if rep.attrib["id"] in by_id:
            # with a buffer of one whole segment, the declared rate never exceeds the peak
            assert int(rep.attrib["bandwidth"]) <= by_id[rep.attrib["id"]].peak_bitrate_bps + 1
