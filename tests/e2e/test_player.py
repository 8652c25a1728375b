"""The browser player in Chromium against a real control plane and two real edges.

It plays and reports to the control plane, resumes where it stopped, steps down when DevTools
throttles the network, and fails over to the next ranked edge when its edge is killed. The
title is 12 s long, so the page loops it; the tests run in file order on one stack (the last one
kills an edge).
"""

from __future__ import annotations

import signal

import pytest
from playwright.sync_api import Page

from streamplane.stack import LocalStack
from tests.e2e.browser import (
    assert_resumable,
    new_account,
    no_cache,
    play,
    play_again,
    skip_reason,
    state,
    throttle,
    wait_for,
)

_WHY = skip_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def test_the_page_plays_reports_and_resumes(page: Page, stack: LocalStack) -> None:
    email, password = new_account(stack)
    play(page, stack, email, password)
    s = wait_for(page, lambda s: s["playedS"] >= 4 and s["heartbeats"] >= 2, "playing 4 s")
    assert s["startupS"] is not None and s["startupS"] < 10
    assert s["rungs"] == 3 and s["loadedRung"] is not None
    assert s["edge"] == "edge-1"  # the first of the ranked edges
    assert page.locator("#edges tr").count() >= 2  # the ranked edges, with their reasons
    assert "longest prefix" in page.locator("#edges tr").first.inner_text()

    # The control plane saw the heartbeats: the screen is alive and the position recorded.
    assert_resumable(stack, email, password, s["sessionId"])
    # Closing the page sends a last heartbeat; a new page resumes near that position.
    play_again(page, stack, email, password)


def test_throttling_the_network_steps_the_player_down(page: Page, stack: LocalStack) -> None:
    cdp = no_cache(page)
    email, password = new_account(stack)
    play(page, stack, email, password)
    s = wait_for(
        page,
        lambda s: s["rungs"] > 1 and s["loadedRung"] == s["rungs"] - 1 and s["playedS"] > 0.2,
        "at the top rung",
    )
    top = s["rungs"] - 1
    # 250 kbps for audio (130 kbps) and video: the top rung (190 kbps, segments up to 275 kbps)
    # no longer fits; the lowest (18 kbps) does.
    throttle(cdp, kbps=250)
    s = wait_for(page, lambda s: s["loadedRung"] < top, "at a lower rung", timeout_s=40)
    assert any(e.startswith(("bitrate", "abandon")) for e in s["events"]), s["events"]
    played = s["playedS"]
    wait_for(page, lambda s: s["playedS"] > played + 1, "still playing")


def test_without_vendored_hls_the_page_says_to_run_make_install(
    page: Page, stack: LocalStack
) -> None:
    page.route("**/static/vendor/**", lambda route: route.fulfill(status=404))
    page.goto(f"{stack.control_url}/watch")
    notice = page.locator("#setup")
    notice.wait_for(state="visible")
    assert "make install" in notice.inner_text()
    assert page.locator("#play").is_disabled()
    assert page.locator("#watch").is_hidden()


def test_killing_its_edge_fails_over_and_keeps_playing(page: Page, stack: LocalStack) -> None:
    no_cache(page)
    email, password = new_account(stack)
    play(page, stack, email, password)
    s = wait_for(page, lambda s: s["playedS"] >= 0.5 and s["loadedRung"] is not None, "playing")
    dead = s["edge"]
    (edge,) = [e for e in stack.edges if e.name == dead]
    edge.stop(signal.SIGKILL)  # the edge and its workers at once, as a crashed machine

    s = wait_for(page, lambda s: s["failovers"] >= 1, "failed over", timeout_s=30)
    assert s["edge"] != dead
    assert s["failoverLog"][0]["from"] == dead
    played = s["playedS"]
    s = wait_for(page, lambda s: s["playedS"] >= played + 4, "playing on", timeout_s=30)
    assert s["edge"] != dead and not s["paused"]
    assert f"failover {dead} →" in page.locator("#log li.failover").first.inner_text()
    dead_row = page.locator("#edges tr", has_text=dead)
    assert "failed" in dead_row.inner_text()
    assert state(page) is not None
