"""The lean heartbeat listener: keep-alive and pipelined requests answered in order, on the
standard event loop and on uvloop (which the control plane runs under uvicorn)."""

from __future__ import annotations

import asyncio
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
