"""A lean HTTP/1.1 listener for ``POST /v1/heartbeat`` alone.

Heartbeats are most of a streaming service's requests. Through the web framework each one pays
for routing, dependency injection, validation models and middleware; here a connection is an
``asyncio.Protocol`` parsing with httptools (as the edge does) and handing ``(authorization,
body)`` to one coroutine, whose answer is written back. Keep-alive and pipelining are kept in
order (one request at a time per connection, at most ``_PIPELINED`` read ahead of their
answers; a client that reads no answers is read no more). What a hostile client can send is
bounded: a request line and headers over ``max_head`` bytes or ``max_headers`` headers (431),
a body over ``max_body`` (413, before it is read when Content-Length says so), a request not
whole ``request_timeout_s`` after its first byte however slowly it trickles in, or after the
connection opened for its first (408, the slowloris), a transfer coding but chunked (501);
trailers are not believed. Each refusal is answered after the requests before it and the
connection closed, since what follows on it cannot be trusted. Past ``max_connections`` open
at once (by default what the open-file limit leaves), a new connection is answered 503 with
Retry-After and closed, rather than left to exhaust the descriptors. A connection silent for
``idle_timeout_s`` between requests is closed. Timeouts are found by one sweep over the
connections a few times per timeout, not by a timer cancelled and re-armed on every read (a
few per cent of a heartbeat). A request the handler has is finished even if its client goes
(cancelled halfway, its batch could be in the stream without ingest's record of it).

The handler decides everything else (``control/heartbeats.py`` gives the same one to the
framework route, so both answer alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

import httptools
import msgspec

__all__ = ["Answer", "ClientOf", "Handler", "IngestServer"]

log = logging.getLogger(__name__)

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers
# (Authorization header, body, the client's address) -> answer
Handler = Callable[[str, bytes, str | None], Awaitable[Answer]]
# (the TCP peer, the lines of the forwarding header) -> the client's address (None: unknown)
ClientOf = Callable[[str | None, list[str]], str | None]

_PATH: Final = b"/v1/heartbeat"
# requests read ahead of their answers on one connection: past it, reading waits
_PIPELINED: Final = 16
_LINGER_S: Final = 2.0  # after a refusal, how long what the client still sends is dropped
_FD_RESERVE: Final = 256  # descriptors kept for the stream, the store and the process's files
_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    410: b"Gone",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


def _error(status: int, code: str, detail: str) -> Answer:
    # encoded, not formatted: a detail may quote the parser's reason
    return status, msgspec.json.encode({"error": code, "detail": detail}), []


class _Refused(Exception):
    """Raised from a parser callback: the request is answered ``answer`` and the connection
    closed (what follows it on the connection cannot be trusted)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer


# a request in the queue: (Authorization, forwarding lines, body, its refusal, keep-alive)
_Request = tuple[bytes, list[str], bytes, Answer | None, bool]


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
        self._head = 0  # bytes of the request line and the headers whole so far
        self._head_read = 0  # bytes read since the read the head began in
        self._headers = 0
        self._in_head = False
        self._length = -1  # the request's Content-Length (-1: none)
        self._coding = b""  # its Transfer-Encoding
        self._expect = b""
        self._queue: deque[_Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._answering = False  # the handler has the request: it has bounds of its own
        self._finished = False  # no more requests are read: the last one queued closes
        self._writable = asyncio.Event()
        self._writable.set()
        self._loop = asyncio.get_running_loop()
        self._heard_at = self._loop.time()
        # when the request being read began; a new connection's first is due at once (a
        # player opens one to send it), so it has request_timeout_s, not idle_timeout_s
        self._began_at: float | None = self._heard_at
        self._linger_until: float | None = None  # closing after a refusal: see _linger

    # -- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer: str | None = peer[0] if isinstance(peer, tuple) and peer else None
        if len(self._server.connections) >= self._server.max_connections:
            # Full: answered at once and closed, before the descriptors run out (then accept
            # itself fails, and every client, players included, waits in the backlog). Closed
            # without the linger a refusal gets: a flood of them must hold no descriptor (a
            # client whose request was already sent may see a reset instead: also "retry").
            self._server.refused_full += 1
            self._write(
                (
                    503,
                    msgspec.json.encode(
                        {
                            "error": "busy",
                            "detail": "this heartbeat listener holds all the connections it"
                            " can; try again in 1 s",
                        }
                    ),
                    [(b"retry-after", b"1")],
                ),
                False,
            )
            self._close()
            return
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        self._writable.set()  # a worker waiting to write ends
        if self._worker is not None and not self._answering:
            self._worker.cancel()
        # a request the handler has is finished, its answer dropped: cancelled halfway, its
        # batch could be in the stream without ingest's own record of it

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        self._heard_at = self._loop.time()
        continued = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            refused = err.__context__
            if isinstance(refused, _Refused):
                self._finish(refused.answer)
            else:
                self._finish(_error(400, "bad_request", "malformed HTTP request"))
            return
        except httptools.HttpParserUpgrade:
            self._finish(_error(400, "bad_request", "no upgrades here"))
            return
        except httptools.HttpParserError as err:
            self._finish(_error(400, "bad_request", f"malformed HTTP request: {err}"))
            return
        if self._in_head:
            # httptools keeps a header until it is whole: a head that never ends is stopped
            # here (counted from the read after the one it began in, which a read bounds)
            self._head_read += len(data) if continued else 0
            if self._head_read > self._server.max_head:
                self._finish(self._head_too_large())

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._auth = b""
        self._forwarded = []
        self._body = []
        self._size = 0
        self._refused = None
        self._head = 0
        self._head_read = 0
        self._headers = 0
        self._in_head = True
        self._length = -1
        self._coding = b""
        self._expect = b""
        self._began_at = self._heard_at

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head += len(url)
        if self._head > self._server.max_head:
            raise _Refused(self._head_too_large())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._head += len(name) + len(value) + 4
        if self._headers > self._server.max_headers or self._head > self._server.max_head:
            raise _Refused(self._head_too_large())
        if not self._in_head:
            # a trailer (after a chunked body): not believed, or a client could name another
            # token or forwarded-for address than the proxy in front of it saw
            return
        lower = name.lower()
        if lower == b"authorization":
            self._auth = value
        elif lower == b"content-length":
            self._length = int(value) if value.isdigit() else -1  # the parser checked it
        elif lower == b"transfer-encoding":
            self._coding = value.lower()  # the parser refuses it in two lines
        elif lower == b"expect":
            self._expect = value.lower()
        elif lower == self._server.client_header:  # only when proxies are trusted
            self._forwarded.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._parser.should_upgrade():
            raise _Refused(_error(400, "bad_request", "no upgrades here"))
        if self._coding and self._coding != b"chunked":
            raise _Refused(
                _error(501, "not_implemented", "no transfer coding is taken but chunked")
            )
        if self._length > self._server.max_body:
            # refused before a byte of it is read (a client that sent Expect waits for this)
            raise _Refused(self._too_large())
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        if path != _PATH:
            self._refused = _error(404, "not_found", "only POST /v1/heartbeat is served here")
        elif method != b"POST":
            self._refused = _error(405, "method_not_allowed", "send POST")
        if (
            self._expect == b"100-continue"
            and self._refused is None
            and not self._queue
            and not self._answering
            and self._transport is not None
        ):
            # only when nothing is being answered: an interim answer must not overtake one
            # (a client that hears none sends its body after a wait of its own)
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._server.max_body:
            # nothing more is read from a client sending too much
            raise _Refused(self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._began_at = None
        keep = self._parser.should_keep_alive()
        self._queue.append((self._auth, self._forwarded, b"".join(self._body), self._refused, keep))
        if len(self._queue) >= _PIPELINED and self._transport is not None:
            self._transport.pause_reading()  # resumed as the queue is answered
        self._start_worker()

    def _head_too_large(self) -> Answer:
        s = self._server
        return _error(
            431,
            "headers_too_large",
            f"the request line and headers are over {s.max_head} bytes or {s.max_headers} headers",
        )

    def _too_large(self) -> Answer:
        return _error(413, "body_too_large", f"the body is over {self._server.max_body} bytes")

    # -- answering -----------------------------------------------------------------------------

    def _finish(self, answer: Answer) -> None:
        """Answer ``answer`` after the requests before it, then close: nothing more is read."""
        if self._finished:
            return
        self._finished = True
        self._began_at = None
        if self._transport is not None:
            self._transport.pause_reading()
        self._queue.append((b"", [], b"", answer, False))
        self._start_worker()

    def _start_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = self._loop.create_task(self._work())

    async def _work(self) -> None:
        while self._queue and self._transport is not None:
            await self._writable.wait()  # a client that reads no answers is sent no more
            if self._transport is None:
                return
            auth, forwarded, body, refused, keep = self._queue.popleft()
            if len(self._queue) == _PIPELINED - 1 and not self._finished:
                self._transport.resume_reading()
            if refused is not None:
                answer = refused
            else:
                client = self._peer
                if self._server.client_of is not None:
                    client = self._server.client_of(self._peer, forwarded)
                self._answering = True
                try:
                    answer = await self._server.handler(auth.decode("latin-1"), body, client)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ingest: a heartbeat failed")
                    answer = _error(500, "internal", "the heartbeat could not be taken")
                finally:
                    self._answering = False
            self._write(answer, keep)
            if not keep:
                if self._finished:
                    self._linger()
                else:
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

    def _linger(self) -> None:
        """Close after a refusal: the client may still be sending (a large head or body), and
        closing with its bytes unread would reset the connection, losing the answer before it
        is read. So the sending side is shut, what arrives is dropped, and the connection
        closed when the client closes it or after ``_LINGER_S``."""
        if self._transport is None or self._transport.is_closing():
            return
        if not self._transport.can_write_eof():
            self._close()
            return
        self._transport.write_eof()
        self._linger_until = self._loop.time() + _LINGER_S
        self._transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the client is done sending: the connection closes

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def sweep(self, now: float) -> None:
        """Refuse a request not whole ``request_timeout_s`` after it began (408), and close the
        connection if nothing was heard on it for the idle timeout."""
        if self._linger_until is not None:
            if now >= self._linger_until:
                self._close()
            return
        if self._answering:  # the handler has its own bounds
            self._heard_at = now
            if self._began_at is not None:
                self._began_at = now  # reading waits for the answer: not the client's time
            return
        if self._began_at is not None and now - self._began_at >= self._server.request_timeout_s:
            self._finish(
                _error(
                    408,
                    "request_timeout",
                    f"the request was not whole within {self._server.request_timeout_s:g} s",
                )
            )
        elif now - self._heard_at >= self._server.idle_timeout_s:
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
        request_timeout_s: float = 10.0,
        max_head: int = 16 * 1024,
        max_headers: int = 64,
        backlog: int = 4096,
        client_header: str = "",
        client_of: ClientOf | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.handler = handler
        # b"\0" matches no header name: nothing is collected
        self.client_header = client_header.lower().encode() if client_of else b"\0"
        self.client_of = client_of
        self.host = host
        self.port = port
        self.max_body = max_body
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_head = max_head
        self.max_headers = max_headers
        self._backlog = backlog
        if max_connections is None:
            # what the open-file limit leaves after the process's own files and sockets
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            max_connections = 1_000_000 if soft == resource.RLIM_INFINITY else soft - _FD_RESERVE
        self.max_connections = max(1, max_connections)
        self.refused_full = 0  # connections answered 503 because the listener was full
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
        every = min(self.idle_timeout_s / 4, self.request_timeout_s / 4, 1.0)
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
        # a heartbeat the handler has is finished (its client may be gone), then the rest
        working = [c._worker for c in self.connections if c._worker and not c._worker.done()]
        for connection in list(self.connections):
            connection._close()
        if working:
            _, late = await asyncio.wait(working, timeout=5)
            for worker in late:
                worker.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None
