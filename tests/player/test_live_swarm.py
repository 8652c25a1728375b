"""`streamplane swarm` on a live channel: a real feed over SRT on loopback, the channel's ffmpeg
ladder, a real control plane and a real edge in front of the channel's origin; the headless
viewers play it as LL-HLS (blocking reloads, parts) near the target latency, with its audio
rendition, through the edge: a counting proxy between the edge and the origin sees each
object once."""

from __future__ import annotations

import asyncio
import http.server
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from streamplane.player import SwarmConfig, run_swarm
from streamplane.player.live import parse_live_playlist
from streamplane.player.swarm import report_tables
from streamplane.stack import LocalStack
from tests.live.conftest import LiveChannel, start_channel, wait_for

__all__ = ["start_channel"]  # the fixture, used here by name

pytestmark = pytest.mark.timeout(180)

_KEPT = ("content-type", "cache-control")


@contextmanager
def counting_proxy(origin: str) -> Iterator[tuple[str, Counter[str]]]:
    """An HTTP proxy in front of ``origin`` that counts the requests for each path."""
    requests: Counter[str] = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            requests[self.path.partition("?")[0]] += 1
            # a blocking reload or a preload hint is held at the origin until its part lands
            r = httpx.get(origin + self.path, timeout=30)
            self.send_response(r.status_code)
            for name in _KEPT:
                if name in r.headers:
                    self.send_header(name, r.headers[name])
            self.send_header("content-length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_swarm_plays_a_live_channel_through_an_edge_near_the_target_latency(
    start_channel, tmp_path: Path
) -> None:
    channel: LiveChannel = start_channel("ch1", "--rungs", "240:300,144:150")
    feed = channel.feed(60)
    (tmp_path / "catalog").mkdir()
    cheap = {"password_time_cost": 1, "password_memory_kib": 8192, "live_channels": ["ch1"]}
    try:
        with counting_proxy(f"http://127.0.0.1:{channel.http_port}") as (origin, requests):
            stack = LocalStack(
                tmp_path / "catalog",
                tmp_path / "stack",
                edges=1,
                control_settings=cheap,
                edge_settings={"origin": origin, "live_playlist_ttl_s": 0.5},
            )
            with stack:
                playlist = channel.root / "ch1" / "v240" / "index.m3u8"
                first = channel.root / "ch1" / "v240" / "seg_1.m4s"
                wait_for(first.exists, 30, "parts")
                # a viewer told not to play the audio fetches none of it
                swarm = SwarmConfig(
                    control_url=stack.control_url,
                    title="ch1",
                    viewers=1,
                    duration_s=2.0,
                    metrics_wait_s=0.0,
                    audio=False,
                )
                mute = asyncio.run(run_swarm(swarm))
                assert mute.summary.failed == 0, mute.summary.failures
                assert requests["/ch1/v144/index.m3u8"] > 0
                assert not [p for p in requests if "/audio/" in p]
                swarm = msgspec.structs.replace(swarm, viewers=4, duration_s=8.0, audio=True)
                report = asyncio.run(run_swarm(swarm))
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
    # the audio rendition came through the edge beside the video, part after part for the
    # eight seconds (its parts are 0.512 s), its init segment once
    audio_parts = [p for p in requests if re.fullmatch(r"/ch1/audio/seg_\d+\.\d+\.m4s", p)]
    assert len(audio_parts) >= 12, sorted(requests)
    assert requests["/ch1/audio/init_0.mp4"] == 1
    assert requests["/ch1/audio/index.m3u8"] > 0
    # one origin request per object, audio and video alike, however many viewers asked
    objects = {p: n for p, n in requests.items() if not p.endswith(".m3u8")}
    assert set(objects.values()) == {1}, objects
    # the report says it
    texts = [str(getattr(t, "title", "")) for t in report_tables(report)]
    assert any("ch1" in t for t in texts)
    assert s.latency_p50_s.count == 4
