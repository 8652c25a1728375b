"""A signed title plays in players that know nothing of streamplane: hls.js, dash.js and Shaka
Player in Chromium, and ffmpeg, each given only the master playlist's or the MPD's URL as the
control plane signs it (the URL ``streamplane demo`` prints), against a real control plane and
real edges. Nothing adds the token to their requests: the edges' manifests hand it on.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import imageio_ffmpeg
import pytest
from playwright.sync_api import Page, Response

from streamplane.stack import LocalStack
from streamplane.web import VENDOR_DIR
from tests.e2e.browser import TITLE, skip_reason

_WHY = skip_reason() or (
    None
    if (VENDOR_DIR / "shaka-player.compiled.js").is_file()
    else "Shaka Player is not vendored: make install"
)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

RATE = 4  # playback speed: the 12 s title plays in about 3 s

_HARNESS = """
const video = document.getElementById("v");
const result = (window.result = { errors: [], ended: false, duration: null, position: 0 });
const fail = (what) => result.errors.push(String(what));
video.defaultPlaybackRate = video.playbackRate = RATE;
video.addEventListener("playing", () => { video.playbackRate = RATE; });
video.addEventListener("timeupdate", () => { result.position = video.currentTime; });
video.addEventListener("ended", () => {
  result.ended = true;
  result.duration = video.duration;
  result.position = video.currentTime;
});
video.addEventListener("error", () => fail(`video: ${video.error && video.error.message}`));
"""

_PLAYERS = {
    "hls.js": (
        '<script type="module">\n{harness}\n'
        'import Hls from "/vendor/hls.min.mjs";\n'
        "const hls = new Hls();\n"
        "hls.on(Hls.Events.ERROR, (_, d) => fail(`${d.type} ${d.details} "
        "${d.response ? d.response.code : ''} ${d.url || (d.frag && d.frag.url) || ''}`));\n"
        "hls.loadSource(SRC);\n"
        "hls.attachMedia(video);\n"
        "video.play().catch(fail);\n"
        "</script>"
    ),
    "dash.js": (
        '<script type="module">\n{harness}\n'
        'import dashjs from "/vendor/dash.all.min.js";\n'
        "const player = dashjs.MediaPlayer().create();\n"
        "player.on(dashjs.MediaPlayer.events.ERROR, (e) => "
        "fail(`dash.js ${e.error ? e.error.code + ' ' + e.error.message : ''}`));\n"
        "player.initialize(video, SRC, true);\n"
        "</script>"
    ),
    "Shaka": (
        '<script src="/vendor/shaka-player.compiled.js"></script>\n'
        "<script>\n{harness}\n"
        "shaka.polyfill.installAll();\n"
        "const player = new shaka.Player();\n"
        "player.addEventListener('error', (e) => "
        "fail(`shaka ${e.detail.code} ${e.detail.data}`));\n"
        "player.attach(video).then(() => player.load(SRC)).then(() => video.play()).catch("
        "(e) => fail(`shaka ${e.code} ${e.data}`));\n"
        "</script>"
    ),
}


def _page_html(player: str) -> str:
    """A page that plays the URL in its ``src`` query parameter with ``player``."""
    harness = (
        _HARNESS.replace("RATE", str(RATE))
        + 'const SRC = new URLSearchParams(location.search).get("src");\n'
    )
    return (
        '<!doctype html><meta charset="utf-8"><video id="v" muted playsinline></video>\n'
        + _PLAYERS[player].replace("{harness}", harness)
    )


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """A web site on this machine serving a page per player and the vendored libraries: the
    edges are another origin, as for any site embedding a player (they answer with CORS)."""
    pages = {f"/{name}.html": _page_html(name).encode() for name in _PLAYERS}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path in pages:
                body, kind = pages[path], "text/html; charset=utf-8"
            elif path.startswith("/vendor/") and (VENDOR_DIR / path[8:]).is_file():
                body, kind = (VENDOR_DIR / path[8:]).read_bytes(), "text/javascript"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def signed(stack: LocalStack) -> dict[str, Any]:
    """A playback of the tiny title, as the demo asks for it: its URLs carry the token."""
    return stack.playback(TITLE, device="any-player")


@pytest.fixture(scope="module")
def duration(stack: LocalStack) -> float:
    doc: dict[str, Any] = json.loads((stack.catalog / TITLE / "title.json").read_text())
    return float(doc["duration_s"])


class EdgeTraffic:
    """What the page asked the edges for, and what they answered."""

    def __init__(self, page: Page, stack: LocalStack) -> None:
        self.origins = tuple(e.url + "/" for e in stack.edges)
        self.answers: list[tuple[str, int]] = []
        page.on("response", self._response)

    def _response(self, response: Response) -> None:
        if response.url.startswith(self.origins) and response.request.method != "OPTIONS":
            self.answers.append((response.url, response.status))

    def paths(self) -> list[str]:
        return [urlsplit(url).path for url, _ in self.answers]


def _play_to_the_end(
    page: Page, stack: LocalStack, site: str, player: str, url: str
) -> EdgeTraffic:
    traffic = EdgeTraffic(page, stack)
    page.goto(f"{site}/{player}.html?" + urlencode({"src": url}))
    page.wait_for_function(
        "window.result && (window.result.ended || window.result.errors.length > 0)",
        timeout=60_000,
    )
    result = page.evaluate("window.result")
    refused = [(u, s) for u, s in traffic.answers if s >= 400]
    assert not result["errors"], f"{player} failed: {result['errors']}; refused: {refused[:3]}"
    assert result["ended"], result
    assert not refused
    return traffic


def _check_whole_title(traffic: EdgeTraffic, duration: float, position: float) -> None:
    paths = traffic.paths()
    video = [p for p in paths if re.fullmatch(rf"/{TITLE}/v/[^/]+/seg_\d+\.m4s", p)]
    audio = [p for p in paths if re.fullmatch(rf"/{TITLE}/a/[^/]+/seg_\d+\.m4s", p)]
    assert video and audio
    assert any(p.endswith("/init.mp4") for p in paths)
    last = max(int(p.rpartition("_")[2].removesuffix(".m4s")) for p in video)
    assert last >= 3  # to the title's last segment (4 s segments)
    assert position >= duration - 0.5


@pytest.mark.parametrize(
    ("player", "kind"),
    [("hls.js", "hls"), ("dash.js", "dash"), ("Shaka", "dash"), ("Shaka", "hls")],
)
def test_a_player_given_only_the_signed_manifest_url_plays_the_whole_title(
    page: Page,
    stack: LocalStack,
    site: str,
    signed: dict[str, Any],
    duration: float,
    player: str,
    kind: str,
) -> None:
    url = signed[kind]
    assert parse_qs(urlsplit(url).query)["__token__"]
    traffic = _play_to_the_end(page, stack, site, player, url)
    result = page.evaluate("window.result")
    _check_whole_title(traffic, duration, result["position"])
    assert {urlsplit(u).netloc for u, _ in traffic.answers} == {urlsplit(url).netloc}


@pytest.mark.parametrize("kind", ["hls", "dash"])
def test_ffmpeg_given_only_the_signed_manifest_url_reads_the_whole_title(
    signed: dict[str, Any], duration: float, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "copy.mp4"
    run = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", signed[kind]]
        + ["-map", "0:v:0", "-map", "0:a:0", "-c", "copy", "-y", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "403" not in run.stderr and "Forbidden" not in run.stderr
    # The copy lasts as long as the title: every segment of both streams was read.
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", probe.stderr)
    assert found is not None, probe.stderr
    h, m, s = found.groups()
    assert abs(int(h) * 3600 + int(m) * 60 + float(s) - duration) < 0.5


def test_a_child_without_the_token_is_still_refused(
    stack: LocalStack, signed: dict[str, Any]
) -> None:
    master = httpx.get(signed["hls"], timeout=10)
    assert master.status_code == 200
    variant = next(line for line in master.text.splitlines() if line and line[0] != "#")
    assert "__token__=" in variant
    child = signed["hls"].rpartition("/")[0] + "/" + variant.partition("?")[0]
    assert httpx.get(child, timeout=10).status_code == 403
    assert httpx.get(signed["hls"].partition("?")[0], timeout=10).status_code == 403
    # And a token for another title does not open this one's children.
    other = signed["hls"].replace(f"/{TITLE}/", "/not-the-title/", 1)
    assert httpx.get(other, timeout=10).status_code == 403
