"""`streamplane swarm` on a live channel: a real feed over SRT on loopback, the channel's ffmpeg
ladder, a real control plane and a real edge in front of the channel's origin; the headless
viewers play it as LL-HLS (blocking reloads, parts) near the target latency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamplane.player import SwarmConfig, run_swarm
from streamplane.player.live import parse_live_playlist
from streamplane.player.swarm import report_tables
from streamplane.stack import LocalStack
from tests.live.conftest import LiveChannel, start_channel, wait_for

__all__ = ["start_channel"]  # the fixture, used here by name

pytestmark = pytest.mark.timeout(180)


def test_a_swarm_plays_a_live_channel_through_an_edge_near_the_target_latency(
    start_channel, tmp_path: Path
) -> None:
    channel: LiveChannel = start_channel("ch1", "--no-audio", "--rungs", "240:300,144:150")
    feed = channel.feed(60)
    (tmp_path / "catalog").mkdir()
    cheap = {"password_time_cost": 1, "password_memory_kib": 8192, "live_channels": ["ch1"]}
    stack = LocalStack(
        tmp_path / "catalog",
        tmp_path / "stack",
        edges=1,
        control_settings=cheap,
        edge_settings={
            "origin": f"http://127.0.0.1:{channel.http_port}",
            "live_playlist_ttl_s": 0.5,
        },
    )
    try:
        with stack:
            playlist = channel.root / "ch1" / "v240" / "index.m3u8"
            wait_for(lambda: (channel.root / "ch1" / "v240" / "seg_1.m4s").exists(), 30, "parts")
            report = asyncio.run(
                run_swarm(
                    SwarmConfig(
                        control_url=stack.control_url,
                        title="ch1",
                        viewers=4,
                        duration_s=8.0,
                        metrics_wait_s=0.0,
                    )
                )
            )
            listed = parse_live_playlist(playlist.read_text())
    finally:
        feed.kill()
        feed.wait()
    s = report.summary
    assert s.failed == 0, s.failures
    for viewer in report.viewers:
        assert viewer.live and viewer.ok
        # it played the channel for most of its eight seconds, part after part
        assert viewer.media_s > 5.0, viewer
        assert viewer.segments >= 12, viewer
        # near the target (PART-HOLD-BACK, 1.5 s): joined at most a segment further back,
        # then caught up with the play-out rate
        assert viewer.latency_p50_s is not None and viewer.latency_p50_s < 3.5, viewer
        assert viewer.edge == "edge-1"
    assert listed.part_hold_back == 1.5
    # the report says it
    texts = [str(getattr(t, "title", "")) for t in report_tables(report)]
    assert any("ch1" in t for t in texts)
    assert s.latency_p50_s.count == 4
