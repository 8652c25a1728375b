"""Driving the /watch page in Debian's Chromium: launch flags, sign-in, the player's state."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import CDPSession, Page

from streamplane.stack import LocalStack
from streamplane.web import vendor_missing

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying hosts it cannot reach.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
TITLE = "tiny"
STOP_AT_S = 3.0  # where play_again stops the first page: past 2 s, well before the end

State = dict[str, Any]


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    missing = vendor_missing()
    if missing:
        return f"the player's vendored JavaScript is missing ({', '.join(missing)}): make install"
    return None


def new_account(stack: LocalStack) -> tuple[str, str]:
    email = f"e2e-{secrets.token_hex(4)}@streamplane.test"
    password = secrets.token_urlsafe(12)
    r = httpx.post(
        f"{stack.control_url}/v1/accounts",
        json={"email": email, "password": password, "plan": "premium"},
        timeout=30,
    )
    r.raise_for_status()
    return email, password


def access_header(stack: LocalStack, email: str, password: str) -> dict[str, str]:
    r = httpx.post(
        f"{stack.control_url}/v1/auth/login",
        json={"email": email, "password": password},
        timeout=30,
    )
    r.raise_for_status()
    return {"authorization": f"Bearer {r.json()['access_token']}"}


def no_cache(page: Page) -> CDPSession:
    """A DevTools session with the HTTP cache off: a looping title is fetched again each time
    round (from the cache it would neither feel a throttled network nor a dead edge)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    return cdp


def throttle(cdp: CDPSession, kbps: float, latency_ms: float = 20) -> None:
    bytes_per_s = kbps * 1000 / 8
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": latency_ms,
            "downloadThroughput": bytes_per_s,
            "uploadThroughput": bytes_per_s,
        },
    )


def play(
    page: Page,
    stack: LocalStack,
    email: str,
    password: str,
    buffer_s: int = 4,
    *,
    fmt: str | None = None,
    pick: str | None = None,
    loop: bool = True,
) -> None:
    """Open /watch, sign in through the form, and press Play on the tiny title (looping, so
    that a 12 s title keeps the player fetching; a 4 s buffer, so that it fetches often).

    ``fmt`` preselects the format by the query (``&format=dash``), ``pick`` chooses it in the
    page's selector; by default the page's default (HLS) plays.
    """
    query = f"title={TITLE}&loop={int(loop)}&buffer={buffer_s}"
    if fmt is not None:
        query += f"&format={fmt}"
    page.goto(f"{stack.control_url}/watch?{query}")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#sign-in")
    page.wait_for_selector("#pick:not([hidden])")
    if pick is not None:
        page.select_option("#format", pick)
    page.click("#play")


_STATE_JS = """() => {
  const p = window.streamplanePlayer;
  if (!p) return null;
  const { samples, events, failoverLog, ...s } = p.state;
  return {
    ...s,
    events: events.map((e) => `${e.kind}: ${e.message}`),
    failoverLog,
    currentTime: p.video.currentTime,
    paused: p.video.paused,
  };
}"""


def state(page: Page) -> State | None:
    result: State | None = page.evaluate(_STATE_JS)
    return result


def wait_for(page: Page, ok: Callable[[State], bool], what: str, timeout_s: float = 30) -> State:
    """Poll the player's state until ``ok``; fail on a fatal player error or the deadline."""
    deadline = time.monotonic() + timeout_s
    last: State | None = None
    while time.monotonic() < deadline:
        last = state(page)
        if last is not None:
            assert last["fatal"] is None, f"the player failed: {last['fatal']}\n{last['events']}"
            if ok(last):
                return last
        page.wait_for_timeout(250)
    raise AssertionError(f"not {what} after {timeout_s:.0f} s; the player's state: {last}")


def assert_resumable(stack: LocalStack, email: str, password: str, session_id: str) -> None:
    """The control plane took the session's heartbeats: its screen is alive and a new
    playback of the title resumes past the start."""
    auth = access_header(stack, email, password)
    account = httpx.get(f"{stack.control_url}/v1/account", headers=auth, timeout=10).json()
    (screen,) = [x for x in account["screens"]["sessions"] if x["session_id"] == session_id]
    assert screen["last_seen"] > screen["started_at"]
    probe = httpx.post(
        f"{stack.control_url}/v1/playback",
        json={"title": TITLE, "device": "probe"},
        headers=auth,
        timeout=10,
    ).json()
    assert probe["resume_position_s"] >= 2.0


def play_again(
    page: Page, stack: LocalStack, email: str, password: str, *, fmt: str | None = None
) -> tuple[Page, State]:
    """Close ``page`` (it sends a last heartbeat) and play again in a new one, which must
    resume near where the first stopped; the new page and its state once it plays.

    The title is short and loops, so where the first page happens to be at the close depends on
    how fast the machine is; it is paused at a known position first (its last heartbeat then
    carries that position, far from the title's end where a resume starts over)."""
    page.evaluate(
        "(at) => { const v = window.streamplanePlayer.video; v.pause(); v.currentTime = at; }",
        STOP_AT_S,
    )
    wait_for(
        page, lambda s: abs(s["currentTime"] - STOP_AT_S) < 0.05, "paused at the stop position"
    )
    page.close(run_before_unload=True)
    again = page.context.new_page()
    play(again, stack, email, password, fmt=fmt)
    s = wait_for(again, lambda s: s["playedS"] >= 1, "playing again")
    assert s["resumedAt"] == pytest.approx(STOP_AT_S, abs=0.05)
    assert s["currentTime"] >= s["resumedAt"] - 0.5
    return again, s
