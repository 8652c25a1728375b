"""A live channel in Chromium: fed over SRT on loopback by `streamplane live feed`, encoded by
`streamplane live start`, pulled through a real edge (signed, blocking reloads) or from the
origin, and played by the live page near its target latency: hls.js in low-latency mode, and
dash.js in low-latency mode (the segment being written read chunk by chunk)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Page

from streamplane.web import STATIC_DIR
from tests.e2e.browser import skip_reason
from tests.edge.conftest import start_edge, token
from tests.live.conftest import LiveChannel, start_channel, wait_for

__all__ = ["start_channel"]  # the fixture, used here by name

_WHY = skip_reason()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.timeout(120),
]


@pytest.fixture
def pages() -> Iterator[str]:
    """The player's static files, as the control plane serves them under /static."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(STATIC_DIR.parent)
    )
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("manifest", "target", "slack", "via_edge"),
    [
        ("master.m3u8", 1.5, 1.0, True),
        # chunked from the origin: dash.js holds the MPD's 2 s target like hls.js its own
        ("manifest.mpd", 2.0, 1.0, False),
        # an edge holds the segment being written until it is whole (its cache knows an
        # object's length before it sends a byte): a segment target more
        ("manifest.mpd", 2.0, 3.0, True),
    ],
    ids=["hls.js-edge", "dash.js-origin", "dash.js-edge"],
)
def test_a_channel_plays_near_the_target_latency(
    start_channel,
    pages: str,
    page: Page,
    tmp_path: Path,
    manifest: str,
    target: float,
    slack: float,
    via_edge: bool,
) -> None:
    channel: LiveChannel = start_channel("ch1", "--no-audio")
    feed = channel.feed(40)
    edge = start_edge(
        tmp_path,
        f"http://127.0.0.1:{channel.http_port}",
        workers=1,
        live_playlist_ttl_s=0.5,
    )
    try:
        wait_for(lambda: (channel.root / "ch1" / "master.m3u8").exists(), 20, "the channel")
        wait_for(lambda: (channel.root / "ch1" / "v240" / "seg_1.m4s").exists(), 20, "segments")
        src = f"{edge.url}/ch1/{manifest}?__token__={token('/ch1/*')}"
        if not via_edge:
            src = f"http://127.0.0.1:{channel.http_port}/ch1/{manifest}"
        page.goto(f"{pages}/static/live.html?src={quote(src, safe='')}")
        page.wait_for_function("window.live && window.live.playing", timeout=30_000)
        # A player joins at a keyframe, up to a segment further back than its target, and
        # catches up with small rate changes: it reaches the target within a few seconds...
        page.wait_for_function(
            f"window.live.latency !== null && window.live.latency < {target + slack}",
            timeout=15_000,
        )
        samples = []
        for _ in range(12):  # ...and holds it while it plays on, three seconds
            time.sleep(0.25)
            samples.append(page.evaluate("({...window.live})"))
        state = samples[-1]
        assert not [e for e in state["errors"] if "fatal" in e], state["errors"]
        assert samples[-1]["currentTime"] > samples[0]["currentTime"] + 2.0  # it plays on
        # near the target latency: hls.js, PART-HOLD-BACK (three half-second parts); dash.js,
        # the MPD's ServiceDescription (four parts), in its low-latency mode
        assert state["target"] == pytest.approx(target, abs=0.01)
        if manifest.endswith(".mpd"):
            assert state["lowLatency"] is True
        latencies = [s["latency"] for s in samples if s["latency"] is not None]
        assert latencies and max(latencies) < target + slack, latencies
        if manifest.endswith(".m3u8"):
            # and the picture is that far behind the packager's clock (program dates)
            glass = [s["glass"] for s in samples if s["glass"] is not None]
            assert glass and max(glass) < target + slack + 1.0, glass
        assert page.inner_text("#latency").endswith(" s")
        where = "edge" if via_edge else "origin"
        print(f"{manifest} via {where}: latency {latencies[-1]:.2f} s, rate {state['rate']}")
    finally:
        feed.kill()
        feed.wait()
        edge.stop()


@pytest.mark.parametrize("manifest", ["master.m3u8", "manifest.mpd"], ids=["hls.js", "dash.js"])
def test_a_viewer_seeks_back_within_the_dvr_window_and_stays_there(
    start_channel, pages: str, page: Page, tmp_path: Path, manifest: str
) -> None:
    # A viewer who goes back six seconds to see a moment again watches from there: the player
    # neither yanks them back to the live edge nor stalls, and the rate control leaves them be.
    channel: LiveChannel = start_channel("ch1", "--no-audio")
    feed = channel.feed(40)
    edge = start_edge(
        tmp_path, f"http://127.0.0.1:{channel.http_port}", workers=1, live_playlist_ttl_s=0.5
    )
    try:
        wait_for(lambda: (channel.root / "ch1" / "v240" / "seg_5.m4s").exists(), 40, "12 s")
        src = f"{edge.url}/ch1/{manifest}?__token__={token('/ch1/*')}"
        page.goto(f"{pages}/static/live.html?src={quote(src, safe='')}")
        page.wait_for_function("window.live && window.live.playing", timeout=30_000)
        page.wait_for_function(
            "window.live.latency !== null && window.live.latency < 5", timeout=30_000
        )
        before = page.evaluate("({...window.live})")
        back_to = before["currentTime"] - 6.0
        page.evaluate(f"document.getElementById('video').currentTime = {back_to}")
        page.wait_for_function(
            f"Math.abs(document.getElementById('video').currentTime - {back_to}) < 1.5"
            " && !document.getElementById('video').seeking",
            timeout=15_000,
        )
        time.sleep(4.0)
        after = page.evaluate(
            "({...window.live, now: document.getElementById('video').currentTime,"
            " paused: document.getElementById('video').paused})"
        )
        assert not [e for e in after["errors"] if "fatal" in e], after["errors"]
        assert not after["paused"]
        assert after["now"] > back_to + 2.0  # it plays on from where the viewer went
        assert after["now"] < back_to + 6.0  # at about real time, not racing back to live
        assert after["latency"] > before["latency"] + 4.0, (before, after)
        print(
            f"{manifest}: latency {before['latency']:.1f} s,"
            f" after seeking back {after['latency']:.1f} s"
        )
    finally:
        feed.kill()
        feed.wait()
        edge.stop()
