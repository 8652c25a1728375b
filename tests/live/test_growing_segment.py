"""Low-latency DASH's segment being written, over HTTP: from the origin chunk by chunk as its
parts land, and through a real edge (one origin request, passed on to every waiter chunk by
chunk as it lands, then cached whole)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streamplane.live import SyntheticOrigin
from tests.edge.conftest import start_edge, token

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[SyntheticOrigin]:
    o = SyntheticOrigin(tmp_path / "origin")
    yield o
    o.stop()


def test_the_segment_being_written_streams_as_its_parts_land(origin: SyntheticOrigin) -> None:
    origin.land()  # segment 0, part 0 (a keyframe)
    url = f"{origin.url}/ch1/v240/seg_0.m4s"
    got: list[tuple[float, bytes]] = []
    with httpx.stream("GET", url, timeout=20) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # chunked: its length is not known
        assert "immutable" in response.headers["cache-control"]  # the bytes are final

        def land_later() -> None:
            for _ in range(4):  # parts 1-3, then a keyframe that begins segment 1
                time.sleep(0.3)
                origin.land()

        lander = threading.Thread(target=land_later)
        started = time.monotonic()
        lander.start()
        for chunk in response.iter_raw():
            got.append((time.monotonic() - started, chunk))
        lander.join()
    body = b"".join(chunk for _, chunk in got)
    # the first part came before the others were made, the rest as they landed
    assert got[0][0] < 0.25 and body[:16] == (0).to_bytes(8, "big") * 2
    # what it sent is the segment's file, whole, once the segment closed
    assert body == (origin.settings.directory / "v240" / "seg_0.m4s").read_bytes()
    assert len(body) == 4 * 16


def test_an_edge_fetches_the_segment_being_written_once_and_keeps_it_whole(
    origin: SyntheticOrigin, tmp_path: Path
) -> None:
    edge = start_edge(tmp_path, origin.url, workers=1, live_playlist_ttl_s=0.5)
    try:
        origin.land()
        tok = token("/ch1/*")
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(edge.get("/ch1/v240/seg_0.m4s", tok))

        askers = [threading.Thread(target=ask) for _ in range(5)]
        for t in askers:
            t.start()
        for _ in range(4):
            time.sleep(0.3)
            origin.land()
        for t in askers:
            t.join(20)
        whole = (origin.settings.directory / "v240" / "seg_0.m4s").read_bytes()
        assert [a.status_code for a in answers] == [200] * 5
        assert all(a.content == whole for a in answers)
        assert origin.requests["/ch1/v240/seg_0.m4s"] == 1
        again = edge.get("/ch1/v240/seg_0.m4s", tok)
        assert again.content == whole and origin.requests["/ch1/v240/seg_0.m4s"] == 1
    finally:
        edge.stop()


def test_an_edge_passes_each_part_of_a_growing_segment_on_as_it_lands(
    origin: SyntheticOrigin, tmp_path: Path
) -> None:
    """Every waiter, in either worker, has the first part (the moof+mdat the origin sent)
    while the origin is still writing the segment; a range waits for it whole; the origin
    sees one request however many waiters there are."""
    edge = start_edge(tmp_path, origin.url, workers=2, live_playlist_ttl_s=0.5)
    waiters = 12
    try:
        origin.land()  # segment 0, part 0
        tok = token("/ch1/*")
        url = f"{edge.url}/ch1/v240/seg_0.m4s"
        first_part = [threading.Event() for _ in range(waiters)]
        bodies: list[bytes | None] = [None] * waiters
        heads: list[httpx.Headers | None] = [None] * waiters
        ranged: list[httpx.Response] = []
        part_0 = (origin.settings.directory / "v240" / "seg_0.0.m4s").read_bytes()

        def watch(i: int) -> None:
            body = b""
            with httpx.stream("GET", url, params={"__token__": tok}, timeout=30) as response:
                heads[i] = response.headers
                for chunk in response.iter_raw():
                    body += chunk
                    if response.status_code == 200 and body[:16] == part_0:
                        first_part[i].set()
            bodies[i] = body

        def ask_range() -> None:
            ranged.append(edge.get("/ch1/v240/seg_0.m4s", tok, headers={"Range": "bytes=16-31"}))

        threads = [threading.Thread(target=watch, args=(i,)) for i in range(waiters)]
        threads.append(threading.Thread(target=ask_range))
        for t in threads:
            t.start()
        # No further part is made until every waiter has the first: held whole, none would.
        assert all(e.wait(20) for e in first_part), "a waiter got nothing before the segment ended"
        assert origin.requests["/ch1/v240/seg_0.m4s"] == 1
        for _ in range(4):  # parts 1-3, then a keyframe that closes segment 0
            origin.land()
        for t in threads:
            t.join(30)
        whole = (origin.settings.directory / "v240" / "seg_0.m4s").read_bytes()
        assert len(whole) == 4 * 16
        assert bodies == [whole] * waiters
        assert all(h is not None and "content-length" not in h for h in heads)
        assert [r.status_code for r in ranged] == [206] and ranged[0].content == whole[16:32]
        assert origin.requests["/ch1/v240/seg_0.m4s"] == 1
        again = edge.get("/ch1/v240/seg_0.m4s", tok)  # cached whole, with its length
        assert again.content == whole and again.headers["content-length"] == str(len(whole))
        assert origin.requests["/ch1/v240/seg_0.m4s"] == 1
    finally:
        edge.stop()


def test_a_growing_segment_the_origin_cuts_off_is_never_sent_or_cached_as_whole(
    origin: SyntheticOrigin, tmp_path: Path
) -> None:
    """The origin stops a segment that stopped growing without the chunked ending: the
    edge's waiters see a cut body (a player retries), and nothing is cached."""
    edge = start_edge(tmp_path, origin.url, workers=1, live_playlist_ttl_s=0.5)
    try:
        origin.land()  # part 0, and then nothing: the feed stalls
        tok = token("/ch1/*")
        got = b""
        url = f"{edge.url}/ch1/v240/seg_0.m4s"
        with (
            pytest.raises(httpx.RemoteProtocolError),  # an incomplete chunked read
            httpx.stream("GET", url, params={"__token__": tok}, timeout=30) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw():
                got += chunk
        assert got == (origin.settings.directory / "v240" / "seg_0.0.m4s").read_bytes()
        assert not (edge.cache / "ch1" / "v240" / "seg_0.m4s").exists()
    finally:
        edge.stop()
