"""The edge server over real sockets: what players, attackers and slow clients see."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from streamplane.edge.cache import DiskCache
from tests.edge.conftest import KEY_HEX, Edge, edge_workers, running, start_edge, token


def raw(edge: Edge, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- serving --------------------------------------------------------------------------------


def test_serves_the_origins_bytes_with_player_headers(edge: Edge, shared_origin: Path) -> None:
    r = edge.get("/t1/v/1/seg_1.m4s")
    assert r.status_code == 200
    assert r.content == (shared_origin / "t1/v/1/seg_1.m4s").read_bytes()
    assert r.headers["content-type"] == "video/iso.segment"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["access-control-allow-origin"] == "*"
    assert "immutable" in r.headers["cache-control"]
    again = edge.get("/t1/v/1/seg_1.m4s")  # now a hit: same bytes, same validators
    assert again.content == r.content
    assert again.headers["etag"] == r.headers["etag"]
    assert again.headers["last-modified"] == r.headers["last-modified"]
    playlist = edge.get("/t1/master.m3u8")
    assert playlist.headers["content-type"] == "application/vnd.apple.mpegurl"
    assert playlist.text.startswith("#EXTM3U")


def test_ranges_heads_and_conditionals(edge: Edge, shared_origin: Path) -> None:
    body = (shared_origin / "t1/v/1/seg_2.m4s").read_bytes()
    r = edge.get("/t1/v/1/seg_2.m4s", headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.content == body[1000:2000]
    assert r.headers["content-range"] == f"bytes 1000-1999/{len(body)}"
    tail = edge.get("/t1/v/1/seg_2.m4s", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == body[-10:]
    bad = edge.get("/t1/v/1/seg_2.m4s", headers={"Range": f"bytes={len(body)}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{len(body)}"
    head = httpx.head(edge.url + "/t1/v/1/seg_2.m4s", params={"__token__": token()}, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(body)
    etag, modified = head.headers["etag"], head.headers["last-modified"]
    assert edge.get("/t1/v/1/seg_2.m4s", headers={"If-None-Match": etag}).status_code == 304
    assert edge.get("/t1/v/1/seg_2.m4s", headers={"If-Modified-Since": modified}).status_code == 304
    assert edge.get("/t1/v/1/seg_2.m4s", headers={"If-None-Match": '"x"'}).status_code == 200


def test_cors_preflight(edge: Edge) -> None:
    r = httpx.options(
        edge.url + "/t1/v/1/seg_1.m4s",
        headers={"Origin": "https://player.example", "Access-Control-Request-Headers": "range"},
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://player.example"
    assert "Range" in r.headers["access-control-allow-headers"]


def test_keep_alive_and_pipelining_answer_in_order(edge: Edge, shared_origin: Path) -> None:
    tok = token()
    paths = ["/t1/master.m3u8", "/t1/v/1/init.mp4", "/t1/v/1/seg_2.m4s", "/t1/master.m3u8"]
    request = b"".join(
        f"GET {p}?__token__={tok} HTTP/1.1\r\nHost: e\r\n\r\n".encode() for p in paths
    )
    last = f"GET /t1/v/1/init.mp4?__token__={tok} HTTP/1.1\r\nConnection: close\r\n\r\n"
    request += last.encode()
    reply = raw(edge, request)
    assert reply.count(b"HTTP/1.1 200 OK") == 5
    # the bodies come back in the order they were asked for
    seg = (shared_origin / "t1/v/1/seg_2.m4s").read_bytes()
    init = (shared_origin / "t1/v/1/init.mp4").read_bytes()
    assert reply.index(init) < reply.index(seg[:64]) < reply.rindex(b"#EXTM3U") < reply.rindex(init)


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_checked_before_anything_is_served(edge: Edge) -> None:
    path = "/t1/v/1/seg_2.m4s"
    assert edge.get(path, tok=token(acl="/t1/*")).status_code == 200
    assert httpx.get(edge.url + path).status_code == 403  # missing
    assert edge.get(path, tok=token(key_hex="aa" * 32)).status_code == 403  # forged
    forged = token()[:-3] + ("000" if not token().endswith("000") else "111")
    assert edge.get(path, tok=forged).status_code == 403
    assert edge.get(path, tok=token(ttl=-5)).status_code == 410  # expired
    assert edge.get(path, tok=token(acl="/t2/*")).status_code == 403  # another title
    assert edge.get(path, tok=token(ip="203.0.113.9")).status_code == 403  # another client
    assert edge.get(path, tok=token(ip="127.0.0.1")).status_code == 200
    cookie = httpx.get(edge.url + path, headers={"Cookie": f"__token__={token()}"})
    assert cookie.status_code == 200
    refused = httpx.get(edge.url + path)
    assert "token" in refused.json()["error"]


def test_behind_trusted_proxies_the_client_is_the_first_untrusted_hop(
    tmp_path: Path, shared_origin: Path
) -> None:
    """A token bound to the viewer's address plays through the proxy in front of the edge, and
    an address the viewer writes into X-Forwarded-For itself is never believed (the edge read
    the leftmost entry, so a token bound to anyone's address played for everyone)."""
    edge = start_edge(tmp_path, shared_origin, workers=1, trusted_proxies=["127.0.0.0/8"])
    try:
        path = "/t1/v/1/seg_2.m4s"
        viewer, victim = "198.51.100.7", "203.0.113.9"
        bound = token(ip=viewer)
        assert edge.get(path, tok=bound, headers={"X-Forwarded-For": viewer}).status_code == 200
        # the viewer forges the victim's address; the proxy appends the address it saw
        forged = edge.get(
            path, tok=token(ip=victim), headers={"X-Forwarded-For": f"{victim}, {viewer}"}
        )
        assert forged.status_code == 403
        # the same when the proxy adds its own header line after the client's
        lines = [("X-Forwarded-For", victim), ("X-Forwarded-For", viewer)]
        assert edge.get(path, tok=token(ip=victim), headers=lines).status_code == 403
        assert edge.get(path, tok=bound, headers=lines).status_code == 200
        # without the header the proxy itself is the client
        assert edge.get(path, tok=bound).status_code == 403
    finally:
        edge.stop()


def test_trusted_proxies_that_are_no_networks_stop_the_edge_with_their_name(
    tmp_path: Path, shared_origin: Path
) -> None:
    edge = start_edge(tmp_path, shared_origin, wait=False, trusted_proxies=["10.0.0.0/33"])
    assert edge.process.wait(timeout=30) == 2
    assert "edge.trusted_proxies" in edge.log() and "10.0.0.0/33" in edge.log()


def test_a_url_granted_before_is_refused_once_its_token_expires(edge: Edge) -> None:
    # A player polls one playlist URL with one token; the edge remembers that URL as granted,
    # and must still refuse it (410) once the token expires, and a URL the token never covered.
    # The URL the token never covered is asked with a long-lived token of the same scope, so
    # a slow machine cannot turn its 403 into the expiry's 410.
    assert edge.get("/t2/master.m3u8", tok=token(acl="/t1/*")).status_code == 403
    short = token(acl="/t1/*", ttl=4)
    playlist = "/t1/master.m3u8"
    assert all(edge.get(playlist, tok=short).status_code == 200 for _ in range(5))
    time.sleep(max(0.0, int(short.split("exp=")[1].split("~")[0]) - time.time()) + 0.2)
    assert all(edge.get(playlist, tok=short).status_code == 410 for _ in range(3))
    # a cookie-borne token on the same URL is not mistaken for the query's
    cookie = httpx.get(edge.url + playlist, headers={"Cookie": f"__token__={token(acl='/t2/*')}"})
    assert cookie.status_code == 403


def test_a_refused_request_never_reaches_the_origin(tmp_path: Path, http_origin: object) -> None:
    from tests.edge.conftest import CountingOrigin

    assert isinstance(http_origin, CountingOrigin)
    e = start_edge(tmp_path, http_origin.url)
    try:
        assert e.get("/t1/v/1/seg_2.m4s", tok=token(acl="/t2/*")).status_code == 403
        assert e.get("/t1/v/1/seg_2.m4s", tok=token(ttl=-1)).status_code == 410
        assert http_origin.requests == {}
    finally:
        e.stop(signal.SIGKILL)


# -- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/../../../../etc/passwd",
        b"/t1/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        b"/t1/%252e%252e/x",
        b"/t1/..%2f..%2fetc%2fpasswd",
        b"/t1/v/1/seg_1.m4s%00.txt",
        b"/t1\\..\\..\\etc\\passwd",
        b"//etc/passwd",
        b"http://127.0.0.1/etc/passwd",
    ],
)
def test_traversal_attempts_get_400(edge: Edge, target: bytes) -> None:
    tok = token().encode()
    reply = raw(
        edge, b"GET " + target + b"?__token__=" + tok + b" HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 400
    assert b"root:" not in reply


def test_hidden_cache_files_and_symlinks_out_are_not_served(
    tmp_path: Path, edge: Edge, shared_origin: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (shared_origin / "t1" / "leak.m4s").symlink_to(secret)
    assert edge.get("/t1/leak.m4s").status_code == 404
    # a symlink planted inside the cache itself leads nowhere either
    (edge.cache / "t1").mkdir(exist_ok=True)
    (edge.cache / "t1" / "planted.m4s").symlink_to(secret)
    assert edge.get("/t1/planted.m4s").status_code in (404, 502)
    hidden = edge.get("/.run/metrics/worker-0.json")
    assert hidden.status_code == 404 and b"requests" not in hidden.content


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET\r\n\r\n", 400),
        (b"HELLO\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello on the plain port
        (b"GET / HTTP/9.9\r\n\r\n", 505),  # a version, but not one served here
        (b"GET /t1/master.m3u8 HTTP/1.1\r\n" + b"X-Junk: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW /t1/master.m3u8 HTTP/1.1\r\nHost: e\r\n\r\n", 501),
        (b"DELETE /t1/master.m3u8 HTTP/1.1\r\nHost: e\r\n\r\n", 405),
        (b"GET /t1/master.m3u8 HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n", 400),
        (b"GET /t1/master.m3u8 HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_a_clear_4xx(edge: Edge, request_bytes: bytes, status: int) -> None:
    reply = raw(edge, request_bytes)
    assert status_of(reply) == status
    assert b'"error"' in reply


def test_oversized_body_is_refused(edge: Edge) -> None:
    body = b"x" * (2 << 20)
    reply = raw(
        edge,
        b"POST /fill HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status_of(reply) == 413


# -- slow and vanishing clients -----------------------------------------------------------


def test_slowloris_does_not_starve_others_and_is_cut_off(edge: Edge) -> None:
    slow = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", edge.port))
        s.sendall(b"GET /t1/master.m3u8 HTTP/1.1\r\nHost: e\r\n")  # headers never finish
        slow.append(s)
    started = time.monotonic()
    assert edge.get("/t1/master.m3u8").status_code == 200
    assert time.monotonic() - started < 1.0
    time.sleep(1.6)  # header_timeout_s is 1 s in this edge
    closed = 0
    for s in slow:
        s.settimeout(2)
        try:
            data = s.recv(4096)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except OSError:
            closed += 1
        s.close()
    assert closed == len(slow)


def test_client_abort_mid_body_leaves_the_edge_serving(edge: Edge, shared_origin: Path) -> None:
    edge.get("/t1/v/1/seg_3.m4s")  # warm: 12 MB in the cache
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", edge.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /t1/v/1/seg_3.m4s?__token__={token()} HTTP/1.1\r\n\r\n".encode())
        s.recv(1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST in the middle of the body
    r = edge.get("/t1/v/1/seg_3.m4s")
    assert r.content == (shared_origin / "t1/v/1/seg_3.m4s").read_bytes()
    assert edge.process.poll() is None


def test_a_client_that_stops_reading_is_dropped(edge: Edge) -> None:
    edge.get("/t1/v/1/seg_3.m4s")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny window
    s.connect(("127.0.0.1", edge.port))
    s.sendall(f"GET /t1/v/1/seg_3.m4s?__token__={token()} HTTP/1.1\r\n\r\n".encode())
    time.sleep(6.5)  # send_timeout_s is 5 s in this edge
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.settimeout(5)
    received = 0
    started = time.monotonic()
    try:
        while chunk := s.recv(1 << 20):
            received += len(chunk)
    except OSError:
        pass
    s.close()
    assert received < 12_000_000  # cut off, not served forever
    assert time.monotonic() - started < 5


# -- origin trouble and collapsing ----------------------------------------------------------


def test_origin_down_gives_502_and_caches_nothing(tmp_path: Path) -> None:
    from tests.edge.conftest import free_port

    e = start_edge(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        r = e.get("/t1/v/1/seg_1.m4s")
        assert r.status_code == 502
        assert "origin" in r.json()["error"]
        assert not (e.cache / "t1").exists()
    finally:
        e.stop(signal.SIGKILL)


def test_origin_too_slow_gives_504(tmp_path: Path, http_origin: object) -> None:
    from tests.edge.conftest import CountingOrigin

    assert isinstance(http_origin, CountingOrigin)
    http_origin.hang = True
    e = start_edge(tmp_path, http_origin.url, stall_timeout_s=2.0)
    try:
        started = time.monotonic()
        r = e.get("/t1/v/1/seg_1.m4s")
        assert r.status_code == 504
        assert time.monotonic() - started < 15
        assert not (e.cache / "t1" / "v" / "1" / "seg_1.m4s").exists()
    finally:
        e.stop(signal.SIGKILL)


def test_missing_object_is_404_and_asked_once(tmp_path: Path, http_origin: object) -> None:
    from tests.edge.conftest import CountingOrigin

    assert isinstance(http_origin, CountingOrigin)
    e = start_edge(tmp_path, http_origin.url)
    try:
        for _ in range(5):
            assert e.get("/t1/v/1/seg_99.m4s").status_code == 404
        assert http_origin.requests == {"/t1/v/1/seg_99.m4s": 1}
    finally:
        e.stop(signal.SIGKILL)


def test_concurrent_misses_collapse_into_one_fetch_served_as_it_arrives(
    tmp_path: Path, http_origin: object, origin_dir: Path
) -> None:
    from tests.edge.conftest import CountingOrigin

    assert isinstance(http_origin, CountingOrigin)
    http_origin.trickle_s = 0.01  # 2 MB in 31 chunks: about 0.3 s at the origin
    e = start_edge(tmp_path, http_origin.url, workers=2)
    body = (origin_dir / "t1/v/1/seg_1.m4s").read_bytes()

    async def one(client: httpx.AsyncClient) -> tuple[bytes, float, float]:
        started = time.monotonic()
        first = 0.0
        parts = []
        async with client.stream(
            "GET", e.url + "/t1/v/1/seg_1.m4s", params={"__token__": token()}
        ) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                if not first:
                    first = time.monotonic() - started
                parts.append(chunk)
        return b"".join(parts), first, time.monotonic() - started

    async def many() -> list[tuple[bytes, float, float]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(30)))

    try:
        results = asyncio.run(many())
        assert http_origin.requests == {"/t1/v/1/seg_1.m4s": 1}
        assert all(data == body for data, _, _ in results)
        # waiters got bytes long before the whole object had arrived
        first_byte = sorted(first for _, first, _ in results)[len(results) // 2]
        whole = sorted(total for _, _, total in results)[len(results) // 2]
        assert first_byte < whole / 2
        assert _counters(e)["streamplane_edge_origin_fetches_total"] == 1
    finally:
        e.stop(signal.SIGKILL)


# -- restarts, draining, capacity -----------------------------------------------------------


def test_restart_keeps_the_warm_cache_and_drops_partials(tmp_path: Path, origin_dir: Path) -> None:
    e = start_edge(tmp_path, origin_dir)
    body = e.get("/t1/v/1/seg_2.m4s").content
    assert e.stop() == 0
    partial = Path(DiskCache(e.cache).body_path("t1/v/1/seg_1.m4s"))
    partial.write_bytes(b"half")  # as a crash mid-fetch leaves it
    empty = tmp_path / "empty-origin"
    empty.mkdir()
    again = start_edge(tmp_path, empty, cache_dir=e.cache)
    try:
        assert again.get("/t1/v/1/seg_2.m4s").content == body  # served with the origin gone
        assert again.get("/t1/v/1/seg_1.m4s").status_code == 404  # not the half object
        assert not partial.exists()
        assert "1 objects" in again.log() and "1 partial dropped" in again.log()
    finally:
        again.stop(signal.SIGKILL)


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, origin_dir: Path, when: str
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers: each
    sees it gone and stops by itself, even one still starting when it died."""
    e = start_edge(tmp_path, origin_dir, wait=when == "serving")
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = edge_workers(e)
            time.sleep(0.01)
        assert len(workers) == 2, e.log()
        e.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in workers), f"orphaned workers {workers}"
    finally:
        e.stop(signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_reports_draining_then_finishes_in_flight_responses(
    tmp_path: Path, origin_dir: Path
) -> None:
    import http.server
    import json
    import threading

    beats: list[dict[str, object]] = []

    class Control(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            beats.append(json.loads(self.rfile.read(length)))
            reply = b'{"interval_s": 0.5}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    control = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    e = start_edge(
        tmp_path,
        origin_dir,
        control_url=f"http://127.0.0.1:{control.server_address[1]}",
        drain_notice_s=0.5,
        edge_id="edge-drain",
    )
    try:
        e.get("/t1/v/1/seg_3.m4s")
        deadline = time.monotonic() + 10
        while not beats and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beats and beats[-1]["edge_id"] == "edge-drain" and beats[-1]["draining"] is False
        s = socket.create_connection(("127.0.0.1", e.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /t1/v/1/seg_3.m4s?__token__={token()} HTTP/1.1\r\n\r\n".encode())
        received = len(s.recv(65536))
        e.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert any(b["draining"] is True for b in beats)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", e.port), timeout=1).recv(1)
        while chunk := s.recv(1 << 20):  # the in-flight body still completes
            received += len(chunk)
        s.close()
        head_len = 0  # headers were in the first recv; the body is all 12 MB
        assert received - head_len >= 12_000_000
        assert e.process.wait(30) == 0
    finally:
        control.shutdown()
        e.stop(signal.SIGKILL)


def test_cache_stays_within_capacity(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    (root / "t").mkdir(parents=True)
    for n in range(12):
        (root / "t" / f"seg_{n}.m4s").write_bytes(os.urandom(1_000_000))
    e = start_edge(tmp_path, root, capacity_bytes=5_000_000)
    try:
        for n in range(12):
            assert e.get(f"/t/seg_{n}.m4s").status_code == 200
        time.sleep(0.5)
        held = sum(p.stat().st_size for p in (e.cache / "t").iterdir())
        assert 0 < held <= 5_000_000
        # evicted objects come back from the origin, byte for byte
        assert e.get("/t/seg_0.m4s").content == (root / "t" / "seg_0.m4s").read_bytes()
    finally:
        e.stop(signal.SIGKILL)


def _counters(edge: Edge) -> dict[str, float]:
    time.sleep(1.2)  # workers publish their counters every second
    found = {}
    for line in httpx.get(edge.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_metrics_and_health(edge: Edge) -> None:
    before = _counters(edge)
    edge.get("/t1/master.m3u8")
    edge.get("/t1/master.m3u8")
    httpx.get(edge.url + "/t1/master.m3u8")  # refused: no token
    after = _counters(edge)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('streamplane_edge_requests_total{code="200"}') >= 2
    assert grew('streamplane_edge_requests_total{code="403"}') == 1
    assert grew("streamplane_edge_token_rejections_total") == 1
    assert grew("streamplane_edge_cache_hits_total") >= 1
    assert grew('streamplane_edge_request_seconds_bucket{le="+Inf"}') >= 3
    assert 0 <= after["streamplane_edge_hit_ratio"] <= 1
    assert httpx.get(edge.url + "/healthz").json() == {"status": "ok"}


def test_settings_errors_are_clear(tmp_path: Path, origin_dir: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text(f'[edge]\norigin = "{origin_dir}"\nworkerz = 3\n')
    r = subprocess.run(
        [sys.executable, "-m", "streamplane", "edge", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "workerz" in r.stderr
    nokeys = tmp_path / "nokeys.toml"
    nokeys.write_text(f'[edge]\norigin = "{origin_dir}"\nport = 0\n')
    r = subprocess.run(
        [sys.executable, "-m", "streamplane", "edge", "--config", str(nokeys)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "keys" in r.stderr
    assert KEY_HEX  # the keyed edges above use tests.edge.conftest's key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_serves_the_same_bytes_and_says_whether_sendfile_stays_zero_copy(
    tmp_path: Path, origin_dir: Path
) -> None:
    from streamplane.edge.supervisor import kernel_tls_status

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    e = start_edge(tmp_path, origin_dir, tls_cert=cert, tls_key=key, wait=False)
    try:
        url = f"https://127.0.0.1:{e.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(
                    url + "/t1/v/1/seg_1.m4s", params={"__token__": token()}, verify=False
                )
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or e.process.poll() is not None:
                    raise
                time.sleep(0.2)
        assert r.status_code == 200
        assert r.content == (origin_dir / "t1/v/1/seg_1.m4s").read_bytes()
        assert kernel_tls_status()[1] in e.log()  # the start-up says what TLS costs here
    finally:
        e.stop(signal.SIGKILL)


# -- the protocol's deadlines and refusals, from outside ---------------------------------


def test_a_body_over_the_limit_is_refused_from_its_head(edge: Edge) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"POST /fill HTTP/1.1\r\nHost: e\r\nContent-Length: 2000000000\r\n\r\n")
        reply = s.recv(65536)  # at once, without a byte of the body
    assert status_of(reply) == 413 and b'"error"' in reply


def test_silent_bodies_are_cut_off_and_cannot_exhaust_a_worker(
    tmp_path: Path, origin_dir: Path
) -> None:
    """Heads announcing a body that never comes, more than the worker has descriptors for
    (it was held for ever, and 1,100 made a 1,024-descriptor worker unreachable): each gets
    408 at the body deadline, and then a new client is served."""
    import resource

    e = start_edge(tmp_path, origin_dir, workers=1, body_timeout_s=1.0)
    silent: list[socket.socket] = []
    try:
        [worker] = edge_workers(e)
        limit = len(os.listdir(f"/proc/{worker}/fd")) + 40
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", e.port))
            s.sendall(b"POST /fill HTTP/1.1\r\nHost: e\r\nContent-Length: 10\r\n\r\n")
            silent.append(s)
        started = time.monotonic()
        for s in silent:  # those past the limit wait in the backlog for the first to go
            s.settimeout(10)
            assert status_of(s.recv(4096)) == 408
            s.close()
        assert time.monotonic() - started < 10
        assert e.get("/t1/master.m3u8").status_code == 200
    finally:
        for s in silent:
            s.close()
        e.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("version", "status"), [(b" HTTP/2.0", 505), (b" HTTP/3.0", 505), (b"", 400)]
)
def test_a_request_line_in_another_version_or_none_is_refused(
    edge: Edge, version: bytes, status: int
) -> None:
    target = f"/t1/master.m3u8?__token__={token()}".encode()
    reply = raw(edge, b"GET " + target + version + b"\r\nHost: e\r\n\r\n")
    assert status_of(reply) == status
    assert b"#EXTM3U" not in reply and reply.count(b"\r\n\r\n") == 1  # one answer, no playlist


def test_an_upgrade_request_gets_one_answer_and_the_connection_stays_http(edge: Edge) -> None:
    tok = token()
    upgrade = (
        f"GET /t1/master.m3u8?__token__={tok} HTTP/1.1\r\nHost: e\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    after = f"GET /t1/v/1/init.mp4?__token__={tok} HTTP/1.1\r\nConnection: close\r\n\r\n"
    reply = raw(edge, (upgrade + after).encode())
    statuses = [int(part[:3]) for part in reply.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 200]
    assert b"#EXTM3U" in reply


def test_health_reports_draining_from_the_drain_notice(tmp_path: Path, origin_dir: Path) -> None:
    e = start_edge(tmp_path, origin_dir, drain_notice_s=3.0)
    try:
        assert httpx.get(e.url + "/healthz").json() == {"status": "ok"}
        e.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.5
        seen = None
        while time.monotonic() < deadline:
            r = httpx.get(e.url + "/healthz")
            if r.status_code == 503:
                seen = r
                break
            time.sleep(0.05)
        assert seen is not None, "no 503 during the drain notice"
        assert seen.json() == {"status": "draining"}
        assert seen.headers["connection"] == "close"
        assert e.process.wait(30) == 0
    finally:
        e.stop(signal.SIGKILL)
