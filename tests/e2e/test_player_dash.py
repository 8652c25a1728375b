"""The browser player playing the DASH MPD with dash.js, in Chromium, against a real control
plane and two real edges.

The same page and the same StreamplanePlayer as the HLS tests (test_player.py), with
``format=dash``: dash.js fetches the MPD and its CMAF segments, streamplane's ABR decides, every
request is signed, heartbeats name the format, a resume starts where the viewer stopped,
throttling steps it down, and an edge that hangs or dies is left for the next ranked one. The
tests run in file order on one stack (the last one kills an edge).
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, Request, Response, Route

from streamplane.stack import LocalStack
from tests.e2e.browser import (
    TITLE,
    assert_resumable,
    new_account,
    no_cache,
    play,
    play_again,
    skip_reason,
    throttle,
    wait_for,
)

_WHY = skip_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


class Traffic:
    """What the page asked for: every request's URL, and each heartbeat with its answer."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.heartbeats: list[tuple[dict[str, Any], int]] = []
        page.on("request", self._request)
        page.on("response", self._response)

    def _request(self, request: Request) -> None:
        self.urls.append(request.url)

    def _response(self, response: Response) -> None:
        request = response.request
        if request.method == "POST" and urlsplit(request.url).path == "/v1/heartbeat":
            self.heartbeats.append((json.loads(request.post_data or "{}"), response.status))

    def to_edges(self, stack: LocalStack) -> list[str]:
        origins = tuple(e.url + "/" for e in stack.edges)
        return [u for u in self.urls if u.startswith(origins)]


def title_doc(stack: LocalStack) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((stack.catalog / TITLE / "title.json").read_text())
    return doc


def test_the_page_plays_the_mpd_with_dashjs_and_reports(page: Page, stack: LocalStack) -> None:
    traffic = Traffic(page)
    email, password = new_account(stack)
    play(page, stack, email, password, pick="dash")  # the page's format selector
    s = wait_for(page, lambda s: s["playedS"] >= 4 and s["heartbeats"] >= 2, "playing 4 s")
    assert s["format"] == "dash" and s["library"] == "dash.js"
    assert s["startupS"] is not None and s["startupS"] < 10
    assert s["rungs"] == 3 and s["loadedRung"] is not None
    assert s["edge"] == "edge-1"  # the first of the ranked edges
    assert page.locator("#s-format").inner_text() == "DASH · dash.js"

    # dash.js played the MPD: the MPD and its CMAF segments, no HLS playlist, each request signed.
    doc = title_doc(stack)
    paths = [urlsplit(u).path for u in traffic.to_edges(stack)]
    assert f"/{TITLE}/{doc['dash']}" in paths
    assert not [p for p in paths if p.endswith(".m3u8")]
    unsigned = [
        u for u in traffic.to_edges(stack) if not parse_qs(urlsplit(u).query).get("__token__")
    ]
    assert not unsigned
    video = [p for p in paths if re.fullmatch(rf"/{TITLE}/v/[^/]+/seg_\d+\.m4s", p)]
    audio = [p for p in paths if re.fullmatch(rf"/{TITLE}/a/[^/]+/seg_\d+\.m4s", p)]
    assert video and audio
    # It starts at the lowest rung (nothing measured yet) and then lets the ABR climb.
    lowest = min(doc["rungs"], key=lambda r: r["average_bitrate_bps"])["id"]
    assert video[0] == f"/{TITLE}/v/{lowest}/seg_1.m4s"

    # Heartbeats name the format and the control plane took them: the screen is alive and the
    # position recorded.
    taken = [body for body, status in traffic.heartbeats if status == 200]
    assert len(taken) >= 2
    assert {e["format"] for body in taken for e in body["events"]} == {"dash"}
    assert {body["session_id"] for body in taken} == {s["sessionId"]}
    assert_resumable(stack, email, password, s["sessionId"])

    # Closing the page sends a last heartbeat; a new page resumes near that position in dash.js.
    again, s = play_again(page, stack, email, password, fmt="dash")
    assert s["format"] == "dash"

    # Looping (the page's *loop*), it plays through the end of the 12 s title and on from 0.
    rest = 12 - s["resumedAt"]
    s = wait_for(again, lambda s: s["playedS"] >= rest + 1.5, "past the end", timeout_s=30)
    assert s["currentTime"] < s["resumedAt"] and not s["paused"]
    assert "seek: seeked to 0." in "\n".join(s["events"])


def test_throttling_the_network_steps_the_dash_player_down(page: Page, stack: LocalStack) -> None:
    cdp = no_cache(page)
    email, password = new_account(stack)
    play(page, stack, email, password, fmt="dash")
    s = wait_for(
        page,
        lambda s: s["rungs"] > 1 and s["loadedRung"] == s["rungs"] - 1 and s["playedS"] > 0.2,
        "at the top rung",
    )
    assert s["format"] == "dash"
    top = s["rungs"] - 1
    # 250 kbps for audio (130 kbps) and video: the top rung (190 kbps, segments up to 275 kbps)
    # no longer fits; the lowest (18 kbps) does.
    throttle(cdp, kbps=250)
    s = wait_for(page, lambda s: s["loadedRung"] < top, "at a lower rung", timeout_s=40)
    assert any(e.startswith(("bitrate", "abandon")) for e in s["events"]), s["events"]
    played = s["playedS"]
    wait_for(page, lambda s: s["playedS"] > played + 1, "still playing")


def test_without_vendored_dashjs_choosing_dash_says_to_run_make_install(
    page: Page, stack: LocalStack
) -> None:
    page.route("**/static/vendor/dash.all.min.js", lambda route: route.fulfill(status=404))
    email, password = new_account(stack)
    page.goto(f"{stack.control_url}/watch?format=dash")
    notice = page.locator("#setup")
    notice.wait_for(state="visible")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#sign-in")
    page.wait_for_selector("#pick:not([hidden])")
    assert "make install" in notice.inner_text() and "dash.js" in notice.inner_text()
    assert page.locator("#play").is_disabled()
    # HLS does not need dash.js: choosing it lets the viewer play again.
    page.select_option("#format", "hls")
    notice.wait_for(state="hidden")
    assert page.locator("#play").is_enabled()


def test_an_edge_that_stops_answering_is_left_and_play_goes_on_from_there(
    page: Page, stack: LocalStack
) -> None:
    no_cache(page)
    # The first-ranked edge (edge-1, by longest prefix) answers for the start of the title, then
    # leaves the requests for the later segments (video from 5 s, audio from 8 s) unanswered.
    edge = stack.edges[0]
    held: list[Route] = []
    hang = re.compile(rf"^{re.escape(edge.url)}/.*/seg_[34]\.m4s")
    page.route(hang, lambda route: held.append(route))
    email, password = new_account(stack)
    play(page, stack, email, password, fmt="dash")
    s = wait_for(page, lambda s: s["playedS"] >= 0.5, "playing")
    assert s["edge"] == edge.name

    s = wait_for(page, lambda s: s["failovers"] >= 1, "failed over", timeout_s=30)
    assert s["edge"] != edge.name
    assert s["failoverLog"][0]["from"] == edge.name
    assert "stall" in s["failoverLog"][0]["reason"]
    assert held  # it did ask the hung edge, and waited
    stalled_at = s["failoverLog"][0]["position_s"]
    # It played what it had: video to 5 s, audio to 8 s (Chromium plays on while audio lasts).
    assert 4.5 <= stalled_at <= 8.1
    played = s["playedS"]
    s = wait_for(page, lambda s: s["playedS"] >= played + 0.5, "playing again", timeout_s=30)
    # From where it stalled (the MPD reloaded from the next edge at the playhead), not from 0.
    assert stalled_at - 0.5 <= s["currentTime"] <= stalled_at + 3
    s = wait_for(page, lambda s: s["playedS"] >= played + 2, "playing on", timeout_s=30)
    assert s["edge"] != edge.name and not s["paused"]


def test_killing_its_edge_fails_over_and_keeps_playing_dash(page: Page, stack: LocalStack) -> None:
    traffic = Traffic(page)
    no_cache(page)
    email, password = new_account(stack)
    play(page, stack, email, password, fmt="dash")
    s = wait_for(page, lambda s: s["playedS"] >= 0.5 and s["loadedRung"] is not None, "playing")
    dead = s["edge"]
    (edge,) = [e for e in stack.edges if e.name == dead]
    (other,) = [e for e in stack.edges if e.name != dead]
    edge.stop(signal.SIGKILL)  # the edge and its workers at once, as a crashed machine

    s = wait_for(page, lambda s: s["failovers"] >= 1, "failed over", timeout_s=30)
    assert s["edge"] == other.name
    assert s["failoverLog"][0]["from"] == dead
    played = s["playedS"]
    s = wait_for(page, lambda s: s["playedS"] >= played + 4, "playing on", timeout_s=30)
    assert s["edge"] == other.name and not s["paused"]
    # Once it asked the surviving edge, every segment came from there, signed.
    segments = [u for u in traffic.to_edges(stack) if urlsplit(u).path.endswith(".m4s")]
    moved = next(i for i, u in enumerate(segments) if u.startswith(other.url + "/"))
    assert segments[:moved] and all(u.startswith(edge.url + "/") for u in segments[:moved])
    later = segments[moved:]
    assert later and all(u.startswith(other.url + "/") and "__token__=" in u for u in later)
    assert f"failover {dead} →" in page.locator("#log li.failover").first.inner_text()
    assert "failed" in page.locator("#edges tr", has_text=dead).inner_text()
