"""Token propagation through a real edge: manifests asked for with a query token come back
with the token in every URI, each with its own length and validator; cookies still work."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import m3u8
import pytest

from streamplane.edge.tokens import token_from_request
from tests.edge.conftest import CountingOrigin, Edge, start_edge, token

MASTER = (
    "#EXTM3U\n"
    "#EXT-X-VERSION:7\n"
    '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="en",DEFAULT=YES,URI="a/en/playlist.m3u8"\n'
    '#EXT-X-STREAM-INF:BANDWIDTH=300000,CODECS="avc1.64000d,mp4a.40.2",AUDIO="aud"\n'
    "v/1/playlist.m3u8\n"
    '#EXT-X-STREAM-INF:BANDWIDTH=900000,CODECS="avc1.64000d,mp4a.40.2",AUDIO="aud"\n'
    "https://elsewhere.example/v/2/playlist.m3u8\n"
)
MPD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">\n'
    '  <Period id="0"><AdaptationSet id="0" contentType="video">\n'
    '    <SegmentTemplate timescale="1" initialization="v/$RepresentationID$/init.mp4"'
    ' media="v/$RepresentationID$/seg_$Number$.m4s" startNumber="1">\n'
    '      <SegmentTimeline><S t="0" d="4" r="2" /></SegmentTimeline></SegmentTemplate>\n'
    '    <Representation id="1" bandwidth="300000" />\n'
    "  </AdaptationSet></Period>\n"
    "</MPD>\n"
)


def _media_playlist(segments: int) -> str:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:4", '#EXT-X-MAP:URI="init.mp4"']
    for n in range(1, segments + 1):
        lines += ["#EXTINF:4.000000,", f"seg_{n}.m4s"]
    return "\n".join([*lines, "#EXT-X-ENDLIST"]) + "\n"


def _title(root: Path, segments: int = 3) -> Path:
    for rendition in ("v/1", "a/en"):
        (root / "t1" / rendition).mkdir(parents=True, exist_ok=True)
        (root / "t1" / rendition / "playlist.m3u8").write_text(_media_playlist(segments))
        (root / "t1" / rendition / "init.mp4").write_bytes(b"\0" * 100)
        for n in range(1, 4):
            (root / "t1" / rendition / f"seg_{n}.m4s").write_bytes(bytes([n]) * 1000)
    (root / "t1" / "master.m3u8").write_text(MASTER)
    (root / "t1" / "manifest.mpd").write_text(MPD)
    return root


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("propagation")
    e = start_edge(tmp, _title(tmp / "origin"))
    yield e
    e.stop(signal.SIGKILL)


def _token_in(uri: str) -> str | None:
    return token_from_request(urlsplit(uri).query, None)


def test_a_master_playlist_hands_its_token_to_every_uri_back_to_the_edge(edge: Edge) -> None:
    tok = token("/t1/*")
    r = edge.get("/t1/master.m3u8", tok)
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    playlist = m3u8.loads(r.text)
    assert [_token_in(p.uri) for p in playlist.playlists] == [tok, None]
    assert playlist.playlists[1].uri == "https://elsewhere.example/v/2/playlist.m3u8"
    assert [_token_in(m.uri) for m in playlist.media] == [tok]

    # Every child, followed as a player resolves it (the manifest URL's query dropped), is
    # granted; the media playlists pass the token on to their init and media segments.
    base = f"{edge.url}/t1/master.m3u8"
    children = [urljoin(base, playlist.playlists[0].uri), urljoin(base, playlist.media[0].uri)]
    for child in children:
        media = httpx.get(child, timeout=10)
        assert media.status_code == 200, child
        parsed = m3u8.loads(media.text)
        uris = [parsed.segment_map[0].uri, *(s.uri for s in parsed.segments)]
        assert [_token_in(u) for u in uris] == [tok] * 4
        for uri in uris:
            assert httpx.get(urljoin(child, uri), timeout=10).status_code == 200
    # The same children without the token are still refused.
    for child in children:
        assert httpx.get(child.partition("?")[0], timeout=10).status_code == 403


def test_an_mpd_hands_its_token_to_its_templates(edge: Edge) -> None:
    tok = token("/t1/*")
    r = edge.get("/t1/manifest.mpd", tok)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    assert r.headers["content-type"] == "application/dash+xml"
    assert 'initialization="v/$RepresentationID$/init.mp4?__token__=' in r.text
    assert 'media="v/$RepresentationID$/seg_$Number$.m4s?__token__=' in r.text
    media = r.text.split('media="')[1].split('"')[0].replace("$RepresentationID$", "1")
    segment = urljoin(f"{edge.url}/t1/manifest.mpd", media.replace("$Number$", "2"))
    assert _token_in(segment) == tok
    assert httpx.get(segment, timeout=10).content == b"\2" * 1000


def test_each_token_gets_its_own_body_and_validator_and_a_cookie_the_file(edge: Edge) -> None:
    first, second = token("/t1/*"), token("/t1/*", ttl=900)
    a1 = edge.get("/t1/master.m3u8", first)
    a2 = edge.get("/t1/master.m3u8", first)  # within the hot-object window
    b = edge.get("/t1/master.m3u8", second)
    cookie = httpx.get(
        f"{edge.url}/t1/master.m3u8", headers={"Cookie": f"__token__={first}"}, timeout=10
    )
    assert a1.content == a2.content and a1.headers["etag"] == a2.headers["etag"]
    assert first in a1.text and second not in a1.text
    assert second in b.text and first not in b.text
    assert b.headers["etag"] != a1.headers["etag"]
    # By cookie the browser sends the token with every request itself: the file as it is.
    assert cookie.status_code == 200 and cookie.text == MASTER
    assert cookie.headers["etag"] not in (a1.headers["etag"], b.headers["etag"])
    assert int(cookie.headers["content-length"]) == len(MASTER)
    # The cookie's answer did not leak into the token's, nor the other way round.
    assert edge.get("/t1/master.m3u8", first).content == a1.content
    # And its children travel on the cookie.
    child = httpx.get(
        f"{edge.url}/t1/v/1/playlist.m3u8", headers={"Cookie": f"__token__={first}"}, timeout=10
    )
    assert child.status_code == 200 and "?__token__" not in child.text


def test_conditionals_heads_and_ranges_are_of_the_rewritten_body(edge: Edge) -> None:
    tok = token("/t1/*")
    full = edge.get("/t1/v/1/playlist.m3u8", tok)
    etag = full.headers["etag"]
    assert edge.get("/t1/v/1/playlist.m3u8", tok, headers={"If-None-Match": etag}).status_code == (
        304
    )
    file_etag = httpx.get(
        f"{edge.url}/t1/v/1/playlist.m3u8", headers={"Cookie": f"__token__={tok}"}, timeout=10
    ).headers["etag"]
    stale = edge.get("/t1/v/1/playlist.m3u8", tok, headers={"If-None-Match": file_etag})
    assert stale.status_code == 200 and stale.content == full.content
    head = httpx.head(f"{edge.url}/t1/v/1/playlist.m3u8", params={"__token__": tok}, timeout=10)
    assert int(head.headers["content-length"]) == len(full.content)
    assert head.headers["etag"] == etag
    tail = edge.get("/t1/v/1/playlist.m3u8", tok, headers={"Range": "bytes=-40"})
    assert tail.status_code == 206 and tail.content == full.content[-40:]
    assert tail.headers["content-range"] == f"bytes {len(full.content) - 40}-" + (
        f"{len(full.content) - 1}/{len(full.content)}"
    )


def test_a_playlist_still_arriving_is_rewritten_whole(
    tmp_path: Path, http_origin: CountingOrigin
) -> None:
    # A VOD playlist of 4,000 segments (about 110 KB) arriving in 64 KB pieces 0.3 s apart:
    # a miss waits for all of it, rather than streaming the file's bytes as they land.
    _title(http_origin.root, segments=4000)
    http_origin.trickle_s = 0.3
    e = start_edge(tmp_path, http_origin.url)
    tok = token("/t1/*")
    try:
        started = time.monotonic()
        r = e.get("/t1/v/1/playlist.m3u8", tok)
        assert r.status_code == 200 and time.monotonic() - started >= 0.3
        assert int(r.headers["content-length"]) == len(r.content)
        segments = m3u8.loads(r.text).segments
        assert len(segments) == 4000
        assert {_token_in(s.uri) for s in segments} == {tok}
        assert http_origin.requests == {"/t1/v/1/playlist.m3u8": 1}
        again = e.get("/t1/v/1/playlist.m3u8", tok)  # a hit now, over 64 KB: read whole too
        assert again.content == r.content and again.headers["etag"] == r.headers["etag"]
    finally:
        e.stop(signal.SIGKILL)
