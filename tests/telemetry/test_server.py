"""The lean heartbeat listener: keep-alive and pipelined requests answered in order, on the
standard event loop and on uvloop (which the control plane runs under uvicorn)."""

from __future__ import annotations

import asyncio
import inspect
import json
import resource
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from streamplane.telemetry.server import Answer, IngestServer


def _request(body: bytes, auth: bytes = b"Bearer t") -> bytes:
    return (
        b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\nauthorization: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (auth, len(body))
    ) + body


async def _exchange() -> list[bytes]:
    peers: set[str | None] = set()

    async def handler(auth: str, body: bytes, peer: str | None) -> Answer:
        peers.add(peer)  # the client's address reaches the handler (its events carry it)
        await asyncio.sleep(0.01 if body == b"1" else 0)  # the first answer is the slowest
        return 200, b'{"auth":"%s","body":"%s"}' % (auth.encode(), body), []

    server = IngestServer(handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_request(b"0"))  # one, then three pipelined in one write
        answers = [await asyncio.wait_for(reader.readuntil(b"}"), 5)]
        writer.write(_request(b"1") + _request(b"2") + _request(b"3", b"Bearer u"))
        answers += [await asyncio.wait_for(reader.readuntil(b"}"), 5) for _ in range(3)]
        writer.close()
        assert peers == {"127.0.0.1"}
        return answers
    finally:
        await asyncio.wait_for(server.stop(), 5)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_keep_alive_and_pipelining_answer_in_order(
    run: Callable[[Coroutine[Any, Any, list[bytes]]], list[bytes]],
) -> None:
    answers = run(_exchange())
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [
        b'{"auth":"Bearer t","body":"0"}',
        b'{"auth":"Bearer t","body":"1"}',
        b'{"auth":"Bearer t","body":"2"}',
        b'{"auth":"Bearer u","body":"3"}',
    ]
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)


async def _idle_and_stuck() -> tuple[float, float, bytes]:
    async def handler(auth: str, body: bytes, peer: str | None) -> Answer:
        await asyncio.sleep(0.6)  # an answer slower than the idle timeout
        return 200, b"{}", []

    server = IngestServer(handler, idle_timeout_s=0.3)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()  # before any connection opens: none may close before t0 + timeout
        silent_r, _silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        stuck_r, stuck_w = await asyncio.open_connection("127.0.0.1", server.port)
        stuck_w.write(_request(b"1")[:20])  # a request begun and never finished
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", server.port)
        slow_w.write(_request(b"1"))
        assert await asyncio.wait_for(silent_r.read(), 5) == b""  # closed
        silent = loop.time() - t0
        assert await asyncio.wait_for(stuck_r.read(), 5) == b""
        stuck = loop.time() - t0
        answer = await asyncio.wait_for(slow_r.readuntil(b"{}"), 5)  # not cut while answered
        return silent, stuck, answer
    finally:
        await asyncio.wait_for(server.stop(), 5)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_silent_and_stuck_connections_are_closed_and_a_slow_answer_is_not_cut(
    run: Callable[[Coroutine[Any, Any, tuple[float, float, bytes]]], tuple[float, float, bytes]],
) -> None:
    silent, stuck, answer = run(_idle_and_stuck())
    assert silent >= 0.3 and stuck >= 0.3  # not before the timeout (no upper bound: load)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


# -- what a hostile client sends ---------------------------------------------------------------


def _on_both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """``test`` run on the standard loop and on uvloop (the control plane runs uvloop under
    uvicorn; its transports pause, resume and half-close in code of their own)."""

    def run(loop: str, **kwargs: Any) -> None:
        (uvloop.run if loop == "uvloop" else asyncio.run)(test(**kwargs))

    params = [inspect.Parameter("loop", inspect.Parameter.KEYWORD_ONLY)]
    params += [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(test).parameters.values()
    ]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__name__ = test.__name__
    both: Callable[..., None] = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])(run)
    return both


class _Recorder:
    """A handler that answers each body with its length and records it; ``gate`` holds the
    answers back until it is set."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.finished: list[bytes] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.done = asyncio.Event()  # an answer was made

    async def __call__(self, auth: str, body: bytes, peer: str | None) -> Answer:
        self.bodies.append(body)
        self.entered.set()
        await self.gate.wait()
        self.finished.append(body)
        self.done.set()
        return 200, b'{"length":%d}' % len(body), []


async def _talk(port: int, data: bytes) -> bytes:
    """What the listener answers ``data`` with, read until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _answers(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """The (status, JSON body) of each answer in ``raw``, in order."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        out.append((status, json.loads(raw[:length])))
        raw = raw[length:]
    return out


@_on_both_loops
async def test_a_request_that_trickles_in_or_never_ends_is_refused_with_408() -> None:
    # the slowloris: a byte at a time, each well within the idle timeout
    handler = _Recorder()
    server = IngestServer(handler, idle_timeout_s=30, request_timeout_s=0.5)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = _request(b"{}", b"Bearer " + b"t" * 200)
        answered = asyncio.ensure_future(reader.read())  # all until the listener closes
        for byte in range(len(request) - 3):  # never the whole request
            if answered.done():
                break
            writer.write(request[byte : byte + 1])
            await asyncio.sleep(0.05)  # the attacker's pace, not a synchronisation
        raw = await asyncio.wait_for(answered, 10)
        writer.close()
        assert _answers(raw) == [(408, _answers(raw)[0][1])]
        assert _answers(raw)[0][1]["error"] == "request_timeout"
        # a connection that never sends a byte: its first request is due at once
        assert _answers(await _talk(server.port, b""))[0][0] == 408
        # a body announced and never sent, after a request answered on the same connection
        raw = await _talk(server.port, _request(b"{}") + _request(b"{}")[:-1])
        assert [s for s, _ in _answers(raw)] == [200, 408]
        assert handler.bodies == [b"{}"]
    finally:
        await asyncio.wait_for(server.stop(), 5)


@pytest.mark.parametrize(
    "request_",
    [
        _request(b"{}", b"Bearer " + b"t" * 1_000_000),  # one huge header
        _request(b"{}").replace(b"host: x\r\n", b"".join(b"x-%d: y\r\n" % i for i in range(200))),
        _request(b"{}").replace(b"/v1/heartbeat", b"/v1/heartbeat?" + b"q" * 100_000),
    ],
    ids=["huge-header", "many-headers", "huge-request-line"],
)
@_on_both_loops
async def test_an_oversized_head_is_refused_with_431_and_never_handled(request_: bytes) -> None:
    handler = _Recorder()
    server = IngestServer(handler)
    await server.start()
    try:
        (answer,) = _answers(await _talk(server.port, request_))
        assert answer[0] == 431 and answer[1]["error"] == "headers_too_large"
        assert handler.bodies == []
        # the listener is fine: the next client is answered
        assert _answers(await _talk(server.port, _request(b"{}", b"Bearer t\r\nconnection: close")))
    finally:
        await asyncio.wait_for(server.stop(), 5)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_refusal_is_answered_after_the_requests_before_it(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def exchange() -> None:
        handler = _Recorder()
        server = IngestServer(handler)
        await server.start()
        try:
            handler.gate.clear()  # the first answer is still being made when the bad one comes
            for bad, status in [
                (b"NONSENSE\r\n\r\n", 400),
                (_request(b"x" * 70_000), 413),
                (_request(b"{}", b"Bearer t\r\nconnection: upgrade\r\nupgrade: websocket"), 400),
            ]:
                talk = asyncio.ensure_future(_talk(server.port, _request(b"first") + bad))
                await asyncio.wait_for(handler.entered.wait(), 5)
                handler.entered.clear()
                handler.gate.set()
                answers = _answers(await talk)
                handler.gate.clear()
                assert [s for s, _ in answers] == [200, status], answers
                assert answers[0][1] == {"length": 5}
            assert handler.bodies == [b"first"] * 3  # nothing after a refusal is handled
        finally:
            await asyncio.wait_for(server.stop(), 5)

    run(exchange())


@_on_both_loops
async def test_a_body_declared_too_large_is_refused_before_it_is_sent() -> None:
    handler = _Recorder()
    server = IngestServer(handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = _request(b"").replace(b"content-length: 0", b"content-length: 1000000000")
        writer.write(head)  # and not a byte of the body
        (answer,) = _answers(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        assert answer[0] == 413 and answer[1]["error"] == "body_too_large"
        # Expect: 100-continue is answered, and the body then taken
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_request(b"{}", b"Bearer t\r\nexpect: 100-continue")[:-2])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        raw = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        writer.close()
        assert _answers(raw) == [(200, {"length": 2})]
    finally:
        await asyncio.wait_for(server.stop(), 5)


_CHUNKED = b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: %s\r\n\r\n"


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (
            (_CHUNKED % b"chunked").replace(b"host: x", b"connection: close")
            + b"1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
            200,
        ),
        (_CHUNKED % b"chunked" + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3 + b"0\r\n\r\n", 413),
        (_CHUNKED % b"gzip, chunked" + b"2\r\n{}\r\n0\r\n\r\n", 501),
        (
            (_CHUNKED % b"gzip").replace(b"host: x", b"transfer-encoding: chunked\r\nhost: x")
            + b"2\r\n{}\r\n0\r\n\r\n",
            400,
        ),
        # request smuggling: two framings, whichever comes first
        (_request(b"{}").replace(b"host: x", b"host: x\r\ntransfer-encoding: chunked"), 400),
        ((_CHUNKED % b"chunked").replace(b"host: x", b"content-length: 2\r\nhost: x"), 400),
        (_request(b"").replace(b"content-length: 0", b"content-length: -5"), 400),
        (_request(b"").replace(b"content-length: 0", b"content-length: 2x"), 400),
        (_request(b"{}").replace(b"host: x", b"content-length: 3"), 400),  # two lengths
        (_request(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0"), 200),
        (_request(b"{}", b"Bearer t\r\nconnection: close"), 200),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ],
    ids=[
        "chunked",
        "chunked-too-large",
        "other-coding",
        "other-coding-in-two-lines",
        "length-and-chunked",
        "chunked-and-length",
        "negative-length",
        "bad-length",
        "two-lengths",
        "http-1.0",
        "connection-close",
        "http2",
    ],
)
@_on_both_loops
async def test_framing_is_taken_or_refused_clearly_and_the_connection_closed(
    request_: bytes, status: int
) -> None:
    handler = _Recorder()
    server = IngestServer(handler)
    await server.start()
    try:
        (answer,) = _answers(await _talk(server.port, request_))
        assert answer[0] == status, answer
        assert handler.bodies == ([b"{}"] if status == 200 else [])
        if status != 200:
            assert "error" in answer[1]
    finally:
        await asyncio.wait_for(server.stop(), 5)


@_on_both_loops
async def test_a_client_that_reads_no_answers_is_read_no_more() -> None:
    # Pipelined requests are read ahead of their answers only so far: a client sending
    # without end (or reading no answers) fills its own socket, not the listener's memory.
    handler = _Recorder()
    handler.gate.clear()
    server = IngestServer(handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = b" " * 60_000
        n = 400  # 24 MB: past what the kernel buffers on both sides
        writer.write(_request(body) * n)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 3)
        handler.gate.set()  # answers go out: the rest is read, every request answered
        await asyncio.wait_for(writer.drain(), 30)
        answers = [await asyncio.wait_for(reader.readuntil(b"}"), 30) for _ in range(n)]
        writer.close()
        assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
        assert len(handler.finished) == n
    finally:
        await asyncio.wait_for(server.stop(), 5)


@_on_both_loops
async def test_a_heartbeat_being_handled_is_finished_when_its_client_goes() -> None:
    # cancelled halfway, its batch could be in the stream without ingest's record of it
    handler = _Recorder()
    handler.gate.clear()
    server = IngestServer(handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_request(b"{}"))
        await asyncio.wait_for(handler.entered.wait(), 5)
        writer.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        for _ in range(100):  # until the listener has seen the connection go
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        assert not server.connections
        handler.gate.set()
        await asyncio.wait_for(handler.done.wait(), 5)  # not cancelled: it finishes
        assert handler.finished == [b"{}"]
    finally:
        await asyncio.wait_for(server.stop(), 5)


@_on_both_loops
async def test_trailers_after_a_chunked_body_are_not_believed() -> None:
    # A proxy in front checks (or writes) the head; what the client puts in trailers must
    # not replace the token nor add a forwarded-for address.
    seen: list[tuple[str, str | None]] = []

    async def handler(auth: str, body: bytes, client: str | None) -> Answer:
        seen.append((auth, client))
        return 200, b"{}", []

    server = IngestServer(
        handler,
        client_header="x-forwarded-for",
        client_of=lambda peer, lines: ",".join(lines) or peer,
    )
    await server.start()
    try:
        request = (
            b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\nauthorization: Bearer mine\r\n"
            b"x-forwarded-for: 192.0.2.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
            b"\r\n2\r\n{}\r\n0\r\n"
            b"authorization: Bearer other\r\nx-forwarded-for: 198.51.100.6\r\n\r\n"
        )
        assert _answers(await _talk(server.port, request)) == [(200, {})]
        assert seen == [("Bearer mine", "192.0.2.1")]
    finally:
        await asyncio.wait_for(server.stop(), 5)


@_on_both_loops
async def test_past_its_connections_a_new_one_is_answered_503_and_closed() -> None:
    """Connections held open (idle players, or an attacker's) past the listener's cap: a new
    one is told to come back, at once, rather than the process running out of descriptors;
    once one closes, a player is served again."""
    handler = _Recorder()
    server = IngestServer(handler, max_connections=3)
    await server.start()
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    try:
        while len(server.connections) < 3:  # accepted
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = await asyncio.wait_for(reader.read(), 10)  # answered, then closed
        writer.close()
        [(status, body)] = _answers(raw)
        assert status == 503 and body["error"] == "busy", raw
        assert b"retry-after: 1\r\n" in raw.lower()
        assert server.refused_full == 1 and len(server.connections) == 3
        held.pop()[1].close()
        while len(server.connections) > 2:
            await asyncio.sleep(0.01)
        last = _request(b"{}").replace(b"host: x\r\n", b"host: x\r\nconnection: close\r\n")
        assert [s for s, _ in _answers(await _talk(server.port, last))] == [200]
        assert handler.bodies == [b"{}"]
    finally:
        for _, w in held:
            w.close()
        await asyncio.wait_for(server.stop(), 5)


def test_by_default_the_cap_is_what_the_open_file_limit_leaves() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = IngestServer(_Recorder())
    assert 0 < server.max_connections < soft or soft == resource.RLIM_INFINITY
