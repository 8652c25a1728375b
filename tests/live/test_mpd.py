"""The live MPD core, read back with the mpegdash library."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from mpegdash.parser import MPEGDASHParser

from streamplane.live import Fragment, TrackPackager
from streamplane.live.mpd import DashRendition, live_mpd

WALL = 1_800_000_000.0


def _run(video: TrackPackager, audio: TrackPackager, start: float, parts: int) -> None:
    video.begin(b"v")
    audio.begin(b"a")
    for i in range(parts):
        t = start + i * 0.5
        video.push(Fragment(t, 0.5, i % 4 == 0, b"v"), WALL + t)
        # audio is cut elsewhere: 0.512 s fragments from 0.2 s earlier
        audio.push(Fragment(t - 0.2 + i * 0.012, 0.512, True, b"a"), WALL + t)


def test_each_encoder_run_is_a_period_over_the_same_segments() -> None:
    video, audio = TrackPackager(0.5, 2.0, 3600), TrackPackager(0.5, 2.0, 3600)
    _run(video, audio, 10.0, 13)  # three whole video segments and a part
    video.interrupt()
    audio.interrupt()
    _run(video, audio, 500.0, 9)  # the slate: two whole segments and a part
    text = live_mpd(
        [
            DashRendition("v240", "avc1.42c015", 400_000, video.window(), 426, 240),
            DashRendition("audio", "mp4a.40.2", 64_000, audio.window(), audio=True),
        ],
        now=WALL + 600,
        dvr_seconds=3600,
    )
    mpd = MPEGDASHParser.parse(text)
    assert mpd.type == "dynamic"
    assert [p.id for p in mpd.periods] == ["init_0", "init_1"]
    first, second = mpd.periods
    video_set = first.adaptation_sets[0]
    template = video_set.segment_templates[0]
    assert template.media == "$RepresentationID$/seg_$Number$.m4s"
    assert template.initialization == "$RepresentationID$/init_0.mp4"
    assert template.start_number == 0
    assert template.presentation_time_offset == 10_000
    timeline = template.segment_timelines[0].Ss
    assert timeline[0].t == 10_000
    # the interrupted run's last segment holds the one part it had
    assert [s.d for s in timeline] == [2000, 2000, 2000, 500]
    second_template = second.adaptation_sets[0].segment_templates[0]
    assert second_template.start_number == 4
    assert second_template.initialization == "$RepresentationID$/init_1.mp4"
    # a Period starts at the program date of its first video segment
    assert second.start == f"PT{WALL + 500 - 0.5:.3f}S"
    audio_set = first.adaptation_sets[1]
    assert audio_set.content_type == "audio"
    assert audio_set.representations[0].id == "audio"
    assert video_set.representations[0].height == 240
    # the segment being written is listed last, at its nominal length (low latency): a player
    # may ask for it now and gets its parts as they land
    second_timeline = second.adaptation_sets[0].segment_templates[0].segment_timelines[0].Ss
    open_msn = video.window().segments[-1].msn
    assert video.window().segments[-1].duration is None
    assert 4 + len(second_timeline) - 1 == open_msn
    assert second_timeline[-1].d == 2000


def test_the_mpd_says_low_latency() -> None:
    video = TrackPackager(0.5, 2.0, 3600)
    audio = TrackPackager(0.5, 2.0, 3600)
    _run(video, audio, 10.0, 5)  # one whole segment, one part of the next
    text = live_mpd(
        [
            DashRendition("v240", "avc1.42c015", 400_000, video.window(), 426, 240),
            DashRendition("audio", "mp4a.40.2", 64_000, audio.window(), audio=True),
        ],
        now=WALL + 20,
        dvr_seconds=7200,
    )
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    root = ET.fromstring(text)
    assert root.get("type") == "dynamic"
    assert root.get("timeShiftBufferDepth") == "PT7200.000S"  # the DVR window
    assert root.get("minimumUpdatePeriod") == "PT0.500S"
    latency = root.find("d:ServiceDescription/d:Latency", ns)
    assert latency is not None and latency.get("target") == "2000"
    timing = [t.get("schemeIdUri") for t in root.findall("d:UTCTiming", ns)]
    assert timing[0] == "urn:mpeg:dash:utc:http-iso:2014"
    for template in root.iter("{urn:mpeg:dash:schema:mpd:2011}SegmentTemplate"):
        assert template.get("availabilityTimeOffset") == "1.5"
        assert template.get("availabilityTimeComplete") == "false"
    # an ended channel lists only whole segments
    video.end()
    audio.end()
    ended = live_mpd(
        [
            DashRendition("v240", "avc1.42c015", 400_000, video.window(), 426, 240),
            DashRendition("audio", "mp4a.40.2", 64_000, audio.window(), audio=True),
        ],
        now=WALL + 30,
        dvr_seconds=7200,
    )
    timeline = MPEGDASHParser.parse(ended).periods[0].adaptation_sets[0]
    assert [s.d for s in timeline.segment_templates[0].segment_timelines[0].Ss] == [2000, 500]


def test_an_mpd_needs_video() -> None:
    audio = TrackPackager(0.5, 2.0, 3600)
    with pytest.raises(ValueError):
        live_mpd([DashRendition("audio", "mp4a.40.2", 1, audio.window(), audio=True)], WALL, 60)
