"""`streamplane demo`'s live channel: started beside the stack, fed by the test feed, stopped
with it."""

from __future__ import annotations

from pathlib import Path

import httpx
import m3u8
import pytest

from streamplane.cli import _live_demo
from streamplane.stack import LocalStack
from tests.live.conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def test_the_demo_channel_goes_live_and_stops_with_the_stack(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "catalog", tmp_path / "stack")
    stack.work.mkdir(parents=True)
    try:
        _live_demo(stack)
        channel, feed = stack.others
        base = channel.url + "/demo-live"

        def playing() -> bool:
            r = httpx.get(f"{base}/v240/index.m3u8", timeout=5)
            return r.status_code == 200 and bool(m3u8.loads(r.text).segments)

        wait_for(playing, 30, "the demo channel's first parts")
        master = m3u8.loads(httpx.get(f"{base}/master.m3u8", timeout=5).text)
        assert len(master.playlists) == 2 and master.media[0].type == "AUDIO"
    finally:
        stack.stop()
    assert not channel.alive() and not feed.alive()
