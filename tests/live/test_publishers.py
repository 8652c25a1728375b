"""Who may publish to a channel, with real ffmpeg feeds on loopback: RTMP beside SRT with the
stream key checked, and one publisher at a time (a second one refused, the first kept)."""

from __future__ import annotations

import httpx
import m3u8
import pytest

from tests.live.conftest import LiveChannel, status_problems, wait_for

pytestmark = pytest.mark.timeout(90)


def _newest(channel: LiveChannel) -> tuple[int, int] | None:
    newest = channel.status()["newest"]
    assert isinstance(newest, dict)
    where = newest["v144"]
    return None if where is None else (where[0], where[1])


def _segments(channel: LiveChannel) -> list[m3u8.Segment]:
    text = httpx.get(f"{channel.base}/v144/index.m3u8", timeout=5).text
    return [s for s in m3u8.loads(text).segments if s.uri is not None]


def test_an_rtmp_feed_with_the_key_goes_live_and_a_wrong_key_is_refused(start_channel) -> None:
    channel = start_channel("ch1", "--rungs", "144:150", rtmp=True)

    wrong = channel.feed(4, key="not-the-key-123", rtmp=True)
    wait_for(lambda: any("wrong stream key" in p for p in status_problems(channel)), 15, "refusal")
    wrong.wait(20)
    assert channel.status()["runs"] == 0
    assert not (channel.root / "ch1" / "master.m3u8").exists()

    feed = channel.feed(6, rtmp=True)
    wait_for(lambda: channel.status()["state"] == "live", 20, "the RTMP feed on air")
    wait_for(lambda: _segments(channel), 15, "a whole segment from the RTMP feed")
    master = m3u8.loads(httpx.get(f"{channel.base}/master.m3u8", timeout=5).text)
    assert [p.uri for p in master.playlists] == ["v144/index.m3u8"]
    assert channel.status()["runs"] == 1
    assert feed.wait(30) == 0


@pytest.mark.parametrize("second_over_rtmp", [False, True], ids=["srt-then-srt", "srt-then-rtmp"])
def test_a_second_publisher_is_refused_and_the_first_plays_on(
    start_channel, second_over_rtmp: bool
) -> None:
    channel = start_channel("ch1", "--rungs", "144:150", "--no-audio", rtmp=True)
    first = channel.feed(12)
    wait_for(lambda: channel.status()["state"] == "live", 20, "the first feed on air")
    wait_for(lambda: _newest(channel), 10, "a part")

    second = channel.feed(4, rtmp=second_over_rtmp)
    assert second.wait(20) != 0  # refused: it never publishes, and its publisher is told
    assert second.stderr is not None
    assert "the channel refused the feed" in second.stderr.read().decode()
    over = "RTMP" if second_over_rtmp else "SRT"
    wait_for(
        lambda: any("second publisher" in p and over in p for p in status_problems(channel)),
        5,
        "the refusal on the status",
    )
    # The first feed plays on: new parts keep landing, the channel stays live in one run.
    before = _newest(channel)
    wait_for(lambda: _newest(channel) != before, 5, "new parts from the first feed")
    status = channel.status()
    assert status["state"] == "live" and status["runs"] == 1
    assert channel.process.poll() is None
    assert first.wait(30) == 0
