"""A live channel end to end with real ffmpeg over SRT on loopback: `streamplane live start`
and `streamplane live feed` as a user runs them, read over HTTP as a player would."""

from __future__ import annotations

import io
import os
import signal
import socket
import time

import av
import httpx
import m3u8
import pytest
from mpegdash.parser import MPEGDASHParser

from tests.live.conftest import LiveChannel, status_problems, wait_for

pytestmark = pytest.mark.timeout(120)


def _playlist(channel: LiveChannel, rendition: str = "v240", query: str = "") -> m3u8.M3U8:
    response = httpx.get(f"{channel.base}/{rendition}/index.m3u8{query}", timeout=10)
    assert response.status_code == 200, response.text
    return m3u8.loads(response.text)


def _segments(playlist: m3u8.M3U8) -> list[m3u8.Segment]:
    return [s for s in playlist.segments if s.uri is not None]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def test_a_channel_goes_live_blocks_reloads_survives_a_lost_feed_and_slides_its_window(
    start_channel,
) -> None:
    channel = start_channel("ch1", "--dvr", "4")

    # A publisher with the wrong key never gets in, and the channel says so.
    wrong = channel.feed(3, key="not-the-key-123")
    assert wrong.wait(20) != 0
    wait_for(lambda: any("wrong stream key" in p for p in status_problems(channel)), 10, "refusal")
    assert channel.status()["runs"] == 0

    feed = channel.feed(9)
    wait_for(
        lambda: httpx.get(f"{channel.base}/master.m3u8", timeout=5).status_code == 200,
        20,
        "the master playlist",
    )
    master = m3u8.loads(httpx.get(f"{channel.base}/master.m3u8", timeout=5).text)
    assert [p.uri for p in master.playlists] == ["v240/index.m3u8", "v144/index.m3u8"]
    assert master.playlists[0].stream_info.resolution[1] == 240
    assert master.media[0].uri == "audio/index.m3u8"

    # Blocking reload: ask for the part the preload hint names; the origin holds the
    # request until it exists and then answers with it listed.
    playlist = _playlist(channel)
    hinted = playlist.preload_hint.uri
    msn, part = (int(x) for x in hinted.removeprefix("seg_").removesuffix(".m4s").split("."))
    started = time.monotonic()
    held = _playlist(channel, query=f"?_HLS_msn={msn}&_HLS_part={part}")
    waited = time.monotonic() - started
    listed = {p.uri for s in held.segments for p in s.parts}
    assert hinted in listed
    assert held.preload_hint.uri != hinted
    assert waited < 3.0
    # The hinted part itself, asked for before it exists, is held until it lands.
    hint = held.preload_hint.uri
    part_response = httpx.get(f"{channel.base}/v240/{hint}", timeout=10)
    assert part_response.status_code == 200 and part_response.content[4:8] in (b"moof", b"styp")
    assert "immutable" in part_response.headers["cache-control"]
    # A reload far beyond the live edge is refused at once; nonsense too.
    far = httpx.get(f"{channel.base}/v240/index.m3u8?_HLS_msn={msn + 50}", timeout=5)
    assert far.status_code == 400 and "too far ahead" in far.text
    bad = httpx.get(f"{channel.base}/v240/index.m3u8?_HLS_msn=x", timeout=5)
    assert bad.status_code == 400
    escape = httpx.get(f"{channel.base}/v240/%2e%2e/%2e%2e/ch1/status.json", timeout=5)
    assert escape.status_code == 400

    # The DASH MPD addresses the same segment files, once a segment is whole.
    mpd_url = f"{channel.base}/manifest.mpd"
    wait_for(lambda: httpx.get(mpd_url, timeout=5).status_code == 200, 10, "the MPD")
    mpd = MPEGDASHParser.parse(httpx.get(mpd_url, timeout=5).text)
    assert mpd.type == "dynamic"
    sets = mpd.periods[0].adaptation_sets
    assert [[r.id for r in a.representations] for a in sets] == [["v240", "v144"], ["audio"]]
    template = sets[0].segment_templates[0]
    assert template.media == "$RepresentationID$/seg_$Number$.m4s"
    number = template.start_number
    assert httpx.get(f"{channel.base}/v240/seg_{number}.m4s", timeout=5).status_code == 200

    # The segments decode: init + segment is a playable CMAF track of the rung's size.
    wait_for(lambda: _segments(_playlist(channel)), 10, "a complete segment")
    first = _segments(_playlist(channel))[0]
    init = httpx.get(f"{channel.base}/v240/{first.init_section.uri}", timeout=5).content
    body = httpx.get(f"{channel.base}/v240/{first.uri}", timeout=5).content
    with av.open(io.BytesIO(init + body)) as container:
        frames = list(container.decode(video=0))
    assert frames and frames[0].height == 240
    assert len(frames) == round(first.duration * 24)

    assert feed.wait(30) == 0

    def first_of(init: str) -> m3u8.Segment | None:
        return next((s for s in _segments(_playlist(channel)) if s.init_section.uri == init), None)

    # The feed is lost: a slate goes on air after a discontinuity; the playlist never ends.
    wait_for(lambda: "slate" in str(channel.status()["state"]), 20, "the slate")
    slate = wait_for(lambda: first_of("init_1.mp4"), 15, "a slate segment")
    assert isinstance(slate, m3u8.Segment) and slate.discontinuity
    assert not _playlist(channel).is_endlist
    slate_init = httpx.get(f"{channel.base}/v240/init_1.mp4", timeout=5).content
    slate_body = httpx.get(f"{channel.base}/v240/{slate.uri}", timeout=5).content
    with av.open(io.BytesIO(slate_init + slate_body)) as container:
        assert next(container.decode(video=0)).height == 240

    # The feed comes back: it replaces the slate after another discontinuity, with its own
    # init segment, and the segment numbers go on.
    again = channel.feed(6)
    back = wait_for(lambda: first_of("init_2.mp4"), 20, "the feed's return")
    assert isinstance(back, m3u8.Segment) and back.discontinuity
    numbers = [int(s.uri[4:-4]) for s in _segments(_playlist(channel))]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    wait_for(lambda: channel.status()["state"] == "live", 10, "the channel live again")
    assert channel.status()["runs"] == 2
    assert again.wait(30) == 0

    # The DVR window (4 s) slid: the first segments left the playlist and the disk.
    late = _playlist(channel)
    assert late.media_sequence >= 2
    assert httpx.get(f"{channel.base}/v240/seg_0.m4s", timeout=5).status_code == 404
    assert not (channel.root / "ch1" / "v240" / "seg_0.0.m4s").exists()
    assert sum(s.duration for s in _segments(late)) >= 4.0

    # Stopping ends the playlists and leaves no encoder behind.
    # The encoder is between runs for a moment after the feed ends: wait until it is up.
    encoders = wait_for(lambda: _children(channel.process.pid), 15, "the channel's encoder")
    assert isinstance(encoders, set)
    channel.process.send_signal(signal.SIGTERM)
    assert channel.process.wait(15) == 0
    ended = m3u8.loads((channel.root / "ch1" / "v240" / "index.m3u8").read_text())
    assert ended.is_endlist
    assert encoders
    for pid in encoders:
        assert not os.path.exists(f"/proc/{pid}")


def test_a_killed_channel_leaves_no_encoder_holding_its_port(start_channel) -> None:
    channel = start_channel("ch2")
    encoders = wait_for(lambda: _children(channel.process.pid), 10, "the listener")
    assert isinstance(encoders, set)
    channel.process.send_signal(signal.SIGKILL)
    channel.process.wait(10)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in encoders), 5, "no orphans")
    # the SRT port is free again
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", channel.srt_port))
