"""Live objects through a real edge (two workers) from a real live origin over HTTP.

The origin is `streamplane.live`'s own (blocking reloads, preload hints), run in a thread and
fed parts by the test (``SyntheticOrigin``), so each part lands exactly when the test says;
the edge is a real edge process. What a viewer relies on: a blocking reload is held until the
part exists and then answered, however many viewers wait, from one origin request per object
per edge; a plain playlist is fresh within its lifetime; tokens are checked as for VOD.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import m3u8
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.edge import live
from streamplane.live import SyntheticOrigin
from tests.edge.conftest import Edge, start_edge, token

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[SyntheticOrigin]:
    o = SyntheticOrigin(tmp_path / "origin")
    yield o
    o.stop()


@pytest.fixture
def edge(tmp_path: Path, origin: SyntheticOrigin) -> Iterator[Edge]:
    e = start_edge(tmp_path, f"http://127.0.0.1:{origin.port}", live_playlist_ttl_s=0.5)
    yield e
    e.stop()


def test_blocking_reload_keys() -> None:
    assert live.reload_key("ch/v/index.m3u8", "_HLS_msn=12&_HLS_part=3&__token__=x") == (
        "ch/v/index.m3u8~12.3"
    )
    assert live.reload_key("ch/v/index.m3u8", "_HLS_msn=7") == "ch/v/index.m3u8~7"
    assert live.reload_key("ch/v/index.m3u8", "__token__=x") is None
    assert live.reload_key("ch/v/seg_1.m4s", "_HLS_msn=1") is None
    for bad in ("_HLS_msn=x", "_HLS_part=1", "_HLS_msn=-1", "_HLS_msn=1&_HLS_part=9999999"):
        with pytest.raises(live.BadReload):
            live.reload_key("ch/v/index.m3u8", bad)
    assert live.origin_target("ch/v/index.m3u8~12.3") == (
        "ch/v/index.m3u8",
        "_HLS_msn=12&_HLS_part=3",
    )
    assert live.origin_target("ch/v/index.m3u8~7") == ("ch/v/index.m3u8", "_HLS_msn=7")
    assert live.origin_target("ch/v/seg_1.m4s") == ("ch/v/seg_1.m4s", "")


_QUERY_PIECES = st.sampled_from(
    ["_HLS_msn", "_HLS_part", "%5FHLS_msn", "_HLS_msn%3D", "_HLS_", "=", "&", "%", "+", "1", "07",
     "%31", "x", "__token__", "exp%3D1~acl%3D%2F*", ";", ""]
)  # fmt: skip


def _reload_by_parse_qsl(key: str, query: str) -> str | None:
    """The reading every query must get: parse_qsl's (what the edge used before)."""
    if "_HLS_" not in query:
        return None
    pairs = dict(parse_qsl(query, keep_blank_values=True))
    msn, part = pairs.get("_HLS_msn"), pairs.get("_HLS_part")
    if msn is None:
        if part is not None:
            raise live.BadReload("part without msn")
        return None
    if not msn.isdigit() or not msn.isascii() or len(msn) > 12:
        raise live.BadReload("msn")
    if part is not None and (not part.isdigit() or not part.isascii() or len(part) > 6):
        raise live.BadReload("part")
    return f"{key}~{int(msn)}" + (f".{int(part)}" if part is not None else "")


@given(st.lists(_QUERY_PIECES, max_size=12).map("".join))
def test_a_reload_is_read_from_any_query_as_parse_qsl_reads_it(query: str) -> None:
    """The fast split of the directives answers exactly what parse_qsl's reading would."""
    outcomes = []
    for read in (live.reload_key, _reload_by_parse_qsl):
        try:
            outcomes.append(read("ch/v/index.m3u8", query))
        except live.BadReload:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


def _land(origin: SyntheticOrigin, n: int) -> None:
    for _ in range(n):
        origin.land()


async def _many(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.get(url) for _ in range(n)))


def test_viewers_waiting_on_the_next_part_cost_the_origin_one_request(
    origin: SyntheticOrigin, edge: Edge
) -> None:
    _land(origin, 5)  # segment 0 whole, part 0 of segment 1
    tok = token("/ch1/*")
    viewers = 200
    url = f"{edge.url}/ch1/v240/index.m3u8?_HLS_msn=1&_HLS_part=1&__token__={tok}"

    result: list[list[httpx.Response]] = []
    waiting = threading.Thread(target=lambda: result.append(asyncio.run(_many(url, viewers))))
    waiting.start()
    deadline = time.monotonic() + 10
    while not origin.requests["/ch1/v240/index.m3u8?_HLS_msn=1&_HLS_part=1"]:
        assert time.monotonic() < deadline, "the edge never asked the origin"
        time.sleep(0.02)
    time.sleep(0.5)  # the viewers are held: nothing answers them before the part lands
    assert not result
    _land(origin, 1)  # part 1 of segment 1 lands
    waiting.join(20)
    responses = result[0]
    assert [r.status_code for r in responses] == [200] * viewers
    bodies = {r.text for r in responses}
    assert len(bodies) == 1  # every viewer got the same playlist, the one as of that part
    playlist = m3u8.loads(bodies.pop())
    listed = [p.uri.partition("?")[0] for s in playlist.segments for p in s.parts]
    assert "seg_1.1.m4s" in listed
    # token propagation applies to the live playlist too: its URIs carry the token on
    assert playlist.preload_hint.uri == f"seg_1.2.m4s?__token__={tok}"
    assert origin.requests["/ch1/v240/index.m3u8?_HLS_msn=1&_HLS_part=1"] == 1

    # The part the preload hint names: held at the origin, one request for all viewers.
    hint = "seg_1.2.m4s"
    part_url = f"{edge.url}/ch1/v240/{hint}?__token__={tok}"
    result.clear()
    waiting = threading.Thread(target=lambda: result.append(asyncio.run(_many(part_url, 100))))
    waiting.start()
    deadline = time.monotonic() + 10
    while not origin.requests[f"/ch1/v240/{hint}"]:
        assert time.monotonic() < deadline, "the edge never asked the origin for the part"
        time.sleep(0.02)
    _land(origin, 1)
    waiting.join(20)
    assert [r.status_code for r in result[0]] == [200] * 100
    assert {r.content for r in result[0]} == {(6).to_bytes(8, "big") * 2}
    assert origin.requests[f"/ch1/v240/{hint}"] == 1


def test_a_plain_live_playlist_is_fresh_within_its_lifetime(
    origin: SyntheticOrigin, edge: Edge
) -> None:
    _land(origin, 2)
    tok = token("/ch1/*")
    first = edge.get("/ch1/v240/index.m3u8", tok)
    assert first.status_code == 200 and "seg_0.1.m4s" in first.text
    _land(origin, 1)
    time.sleep(1.2)  # past the 0.5 s lifetime (and the workers' half-second memory)
    second = edge.get("/ch1/v240/index.m3u8", tok)
    assert second.status_code == 200 and "seg_0.2.m4s" in second.text
    assert origin.requests["/ch1/v240/index.m3u8"] == 2


def test_live_requests_are_checked_like_any_other(origin: SyntheticOrigin, edge: Edge) -> None:
    _land(origin, 2)
    unsigned = httpx.get(f"{edge.url}/ch1/v240/index.m3u8?_HLS_msn=0&_HLS_part=1", timeout=10)
    assert unsigned.status_code == 403
    base = f"{edge.url}/ch1/v240/index.m3u8"
    other = httpx.get(f"{base}?_HLS_msn=0&__token__={token('/ch2/*')}", timeout=10)
    assert other.status_code == 403
    bad = httpx.get(f"{base}?_HLS_msn=zero&__token__={token('/ch1/*')}", timeout=10)
    assert bad.status_code == 400 and "whole numbers" in bad.text
    assert not any("_HLS_msn=zero" in r for r in origin.requests)


def test_an_origin_error_marked_no_store_is_not_cached(origin: SyntheticOrigin, edge: Edge) -> None:
    tok = token("/ch1/*")
    # A part that is not there yet: the live origin answers 404 with Cache-Control: no-store.
    early = edge.get("/ch1/v240/seg_0.1.m4s", tok)
    assert early.status_code == 404
    assert origin.requests["/ch1/v240/seg_0.1.m4s"] == 1
    _land(origin, 2)
    # At once (well within the edge's error memory): the edge asks again and has it.
    landed = edge.get("/ch1/v240/seg_0.1.m4s", tok)
    assert landed.status_code == 200 and len(landed.content) == 16
    assert origin.requests["/ch1/v240/seg_0.1.m4s"] == 2
    # An error the origin lets be stored is still remembered: one origin request for both.
    for _ in range(2):
        assert edge.get("/ch1/v999/index.m3u8", tok).status_code == 404
    assert origin.requests["/ch1/v999/index.m3u8"] == 1
