"""The /watch page's live panel in Chromium: the title's chat, viewer count and live state from
the stack's realtime gateway, with a value past its max age shown as stale."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from streamplane.realtime.client import RealtimeClient
from streamplane.realtime.tokens import sign_realtime_token
from streamplane.stack import LocalStack
from tests.e2e.browser import TITLE, new_account, play, skip_reason

_WHY = skip_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def _in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Playwright's sync API holds this thread's event loop: run the client beside it."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if failure:
        raise failure[0]


def test_the_live_panel_shows_chat_viewers_and_marks_stale_state(
    page: Page, stack: LocalStack
) -> None:
    email, password = new_account(stack)
    play(page, stack, email, password)
    expect(page.locator("#live")).to_be_visible(timeout=20_000)
    expect(page.locator("#live-status")).to_have_text("live", timeout=20_000)
    expect(page.locator("#live-viewers")).to_have_text("1", timeout=20_000)

    page.fill("#live-text", "what a goal")
    page.click("#live-form button")
    expect(page.locator("#live-chat li").last).to_contain_text("what a goal", timeout=10_000)

    key = bytes.fromhex(stack.realtime_key_hex)
    source = sign_realtime_token(
        key,
        user="score-feed",
        channels={f"state:{TITLE}": ["read", "publish"], f"chat:{TITLE}": ["read", "publish"]},
        now=int(time.time()),
        ttl_s=300,
    )

    async def feed() -> None:
        client = RealtimeClient(stack.gateway_url, source)
        client.start()
        try:
            await client.publish(f"chat:{TITLE}", {"text": "kick-off in 5"})
            now_ms = int(time.time() * 1000)
            await client.set_state(
                f"state:{TITLE}", "score", "1-0", seq=1, source_time_ms=now_ms, max_age_ms=3000
            )
        finally:
            await client.stop()

    _in_thread(feed())
    expect(page.locator("#live-chat li").last).to_contain_text("kick-off in 5", timeout=10_000)
    score = page.locator("#live-state li")
    expect(score).to_have_class("current", timeout=5_000)
    expect(score).to_have_text('score: "1-0"')
    expect(score).to_have_class("stale", timeout=10_000)  # no update within its 3 s
    expect(score).to_contain_text("(stale)")
