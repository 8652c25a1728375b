"""A lean HTTP/1.1 listener for ``POST /v1/heartbeat`` alone.

Heartbeats are most of a streaming service's requests. Through the web framework each one pays
for routing, dependency injection, validation models and middleware; here a connection is an
``asyncio.Protocol`` parsing with httptools (as the edge does) and handing ``(authorization,
body)`` to one coroutine, whose answer is written back. Keep-alive and pipelining are kept in
order (one request at a time per connection); bodies over ``max_body`` are refused with 413
before they are read; a connection silent for ``idle_timeout_s`` (or stuck mid-request, the
slowloris) is closed. Silence is found by one sweep over the connections a few times per
timeout, not by a timer cancelled and re-armed on every read (a few per cent of a heartbeat).

The handler decides everything else (``control/heartbeats.py`` gives the same one to the
framework route, so both answer alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

import httptools

__all__ = ["Answer", "ClientOf", "Handler", "IngestServer"]

log = logging.getLogger(__name__)

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers
# (Authorization header, body, the client's address) -> answer
Handler = Callable[[str, bytes, str | None], Awaitable[Answer]]
# (the TCP peer, the lines of the forwarding header) -> the client's address (None: unknown)
ClientOf = Callable[[str | None, list[str]], str | None]

_PATH: Final = b"/v1/heartbeat"
_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    410: b"Gone",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _error(status: int, code: str, detail: str) -> Answer:
    body = b'{"error":"%s","detail":"%s"}' % (code.encode(), detail.encode())
    return status, body, []


class _Connection(asyncio.Protocol):
    def __init__(self, server: IngestServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._auth = b""
        self._forwarded: list[str] = []
        self._body: list[bytes] = []
        self._size = 0
        self._refused: Answer | None = None
        self._queue: deque[tuple[bytes, list[str], bytes, Answer | None, bool]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._heard_at = self._loop.time()

    # -- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer: str | None = peer[0] if isinstance(peer, tuple) and peer else None
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._worker is not None:
            self._worker.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._heard_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._answer_and_close(_error(400, "bad_request", "no upgrades here"))
        except httptools.HttpParserError:
            self._answer_and_close(_error(400, "bad_request", "malformed HTTP request"))

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._auth = b""
        self._forwarded = []
        self._body = []
        self._size = 0
        self._refused = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"authorization":
            self._auth = value
        elif lower == self._server.client_header:  # only when proxies are trusted
            self._forwarded.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        if path != _PATH:
            self._refused = _error(404, "not_found", "only POST /v1/heartbeat is served here")
        elif method != b"POST":
            self._refused = _error(405, "method_not_allowed", "send POST")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._server.max_body:
            self._refused = _error(
                413, "body_too_large", f"the body is over {self._server.max_body} bytes"
            )
            # nothing more is read from a client sending too much
            self._answer_and_close(self._refused)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        keep = self._parser.should_keep_alive()
        self._queue.append((self._auth, self._forwarded, b"".join(self._body), self._refused, keep))
        if self._worker is None or self._worker.done():
            self._worker = self._loop.create_task(self._work())

    # -- answering -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while self._queue and self._transport is not None:
            auth, forwarded, body, refused, keep = self._queue.popleft()
            if refused is not None:
                answer = refused
            else:
                client = self._peer
                if self._server.client_of is not None:
                    client = self._server.client_of(self._peer, forwarded)
                try:
                    answer = await self._server.handler(auth.decode("latin-1"), body, client)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ingest: a heartbeat failed")
                    answer = _error(500, "internal", "the heartbeat could not be taken")
            self._write(answer, keep)
            if not keep:
                self._close()
                return

    def _write(self, answer: Answer, keep: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        status, body, extra = answer
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        ]
        if not keep:
            head.append(b"connection: close\r\n")
        head += [b"%s: %s\r\n" % (k, v) for k, v in extra]
        head.append(b"\r\n")
        self._transport.write(b"".join(head) + body)

    def _answer_and_close(self, answer: Answer) -> None:
        self._write(answer, keep=False)
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def sweep(self, now: float) -> None:
        """Close the connection if nothing was heard on it for the idle timeout."""
        if now - self._heard_at < self._server.idle_timeout_s:
            return
        if self._worker is not None and not self._worker.done():
            self._heard_at = now  # answering: the handler has its own bounds
            return
        self._close()


class IngestServer:
    """Serves ``handler`` on ``host:port`` (port 0: any free one; see :attr:`port`).

    The client the handler is given is the TCP peer, unless ``client_of`` is given: it then
    decides from the peer and the lines of header ``client_header`` (lower case), which are
    read only then. Behind trusted proxies that is their forwarding header; anyone else's
    is never parsed, so a client cannot name itself another address.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body: int = 64 * 1024,
        idle_timeout_s: float = 30.0,
        backlog: int = 4096,
        client_header: str = "",
        client_of: ClientOf | None = None,
    ) -> None:
        self.handler = handler
        # b"\0" matches no header name: nothing is collected
        self.client_header = client_header.lower().encode() if client_of else b"\0"
        self.client_of = client_of
        self.host = host
        self.port = port
        self.max_body = max_body
        self.idle_timeout_s = idle_timeout_s
        self._backlog = backlog
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=self._backlog
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close silent connections: a connection is closed between ``idle_timeout_s`` and a
        quarter (at most a second) more after it was last heard from."""
        loop = asyncio.get_running_loop()
        every = min(self.idle_timeout_s / 4, 1.0)
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for connection in list(self.connections):
                connection.sweep(now)

    async def stop(self) -> None:
        if self._server is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._server.close()
        for connection in list(self.connections):
            connection._close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None
