"""The asyncio shell in this process, on a real socket and a real cache, with one fault injected."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from streamplane.config import EdgeSettings
from streamplane.edge.cache import CachedObject, DiskCache
from streamplane.edge.origin import make_origin
from streamplane.edge.server import EdgeConnection, Worker


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    reply = await asyncio.wait_for(reader.read(), 10)  # to the server's end of the stream
    writer.close()
    return reply


def _statuses(reply: bytes) -> list[int]:
    return [int(part[:3]) for part in reply.split(b"HTTP/1.1 ")[1:]]


async def test_an_unexpected_error_in_one_request_is_a_500_and_everything_else_is_served(
    tmp_path: Path, origin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EdgeSettings(
        origin=str(origin_dir), cache_dir=str(tmp_path / "cache"), require_token=False
    )
    cache = DiskCache(tmp_path / "cache")
    keeper, supervisor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    worker = Worker(config, {}, 0, cache, make_origin(config.origin), keeper)
    really_open = cache.open_complete

    def open_complete(key: str) -> CachedObject | None:
        if key == "t1/v/1/init.mp4":
            raise RuntimeError("a bug the cache has for this one key")
        return really_open(key)

    monkeypatch.setattr(cache, "open_complete", open_complete)
    server = await asyncio.get_running_loop().create_server(
        lambda: EdgeConnection(worker), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        # on one connection: the failing request, then one pipelined behind it
        reply = await _exchange(
            port,
            b"GET /t1/v/1/init.mp4 HTTP/1.1\r\nHost: e\r\n\r\n"
            b"GET /t1/master.m3u8 HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        )
        assert _statuses(reply) == [500, 200]
        assert b'"error"' in reply and b"#EXTM3U" in reply
        # and on others, at the same time
        replies = await asyncio.gather(
            *(
                _exchange(port, b"GET /t1/v/1/seg_2.m4s HTTP/1.1\r\nConnection: close\r\n\r\n")
                for _ in range(3)
            )
        )
        body = (origin_dir / "t1/v/1/seg_2.m4s").read_bytes()
        assert all(_statuses(r) == [200] and r.endswith(body) for r in replies)
    finally:
        server.close()
        await server.wait_closed()
        await worker.origin.aclose()
        keeper.close()
        supervisor_end.close()
