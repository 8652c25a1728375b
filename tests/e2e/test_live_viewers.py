"""The live page's viewer count in Chromium: a live channel's playback answer carries a realtime
token, the page subscribes to the channel's event channel on the stack's gateway and shows the
count it sends, which follows a second viewer joining and leaving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page, expect

from streamplane.stack import LocalStack
from tests.e2e.browser import skip_reason

_WHY = skip_reason()
pytestmark = [pytest.mark.skipif(_WHY is not None, reason=_WHY or ""), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    catalog = tmp_path_factory.mktemp("catalog")
    with LocalStack(
        catalog,
        tmp_path_factory.mktemp("stack"),
        edges=1,
        control_settings={"live_channels": ["ch1"]},
    ) as s:
        yield s


def _live_page(stack: LocalStack) -> str:
    """The live page for ch1 as a viewer opens it: the signed playlist and the realtime grant
    of a playback start."""
    answer = stack.playback("ch1")
    assert answer["realtime"] is not None, answer
    src = quote(answer["hls"], safe="")
    realtime = quote(json.dumps(answer["realtime"]), safe="")
    return f"{stack.control_url}/static/live.html?src={src}&realtime={realtime}"


def test_the_live_page_shows_the_viewer_count_and_follows_a_second_viewer(
    page: Page, browser: Browser, live_stack: LocalStack
) -> None:
    page.goto(_live_page(live_stack))
    viewers = page.locator("#viewers")
    expect(viewers).to_have_text("1", timeout=20_000)

    second = browser.new_context()
    try:
        other = second.new_page()
        other.goto(_live_page(live_stack))
        expect(other.locator("#viewers")).to_have_text("2", timeout=20_000)
        expect(viewers).to_have_text("2", timeout=20_000)
    finally:
        second.close()
    expect(viewers).to_have_text("1", timeout=20_000)  # the second viewer left


def test_a_malformed_realtime_parameter_is_said_where_the_count_would_be(
    page: Page, live_stack: LocalStack
) -> None:
    page.goto(f"{live_stack.control_url}/static/live.html?src=x.m3u8&realtime=%7Bnot")
    expect(page.locator("#viewers")).to_contain_text("?realtime= is not JSON")
    info = {"url": live_stack.gateway_url + "/connect", "token": "forged", "channels": {}}
    page.goto(
        f"{live_stack.control_url}/static/live.html?src=x.m3u8&realtime="
        + quote(json.dumps(info), safe="")
    )
    expect(page.locator("#viewers")).to_contain_text("needs the gateway's url, a token")
