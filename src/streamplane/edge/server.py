"""One edge worker process: HTTP/1.1 on asyncio's default loop, bodies by ``sendfile(2)``.

Why these parts:

- asyncio's default selector loop, not uvloop: uvloop implements no ``sendfile`` and would
  copy every body through user space. The hot path sends with ``os.sendfile`` straight from
  ``data_received`` when the socket has room, and only falls back to ``loop.sendfile`` (a
  task) for what the socket did not take at once, so a cache hit costs no task and no copy.
- httptools (the llhttp parser) parses requests; the HTTP decisions themselves are the pure
  functions of :mod:`streamplane.edge.http`.
- Several such processes share the port with ``SO_REUSEPORT`` (see ``supervisor``), and the
  disk cache (see ``cache``) is what they share: a miss in any worker joins a fetch under way
  in any other.

Requests are answered in order on each connection (pipelining), the token is verified before
any file is opened, and every connection has deadlines: a client that sends its headers too
slowly (slowloris), idles too long, or stops reading a body is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from asyncio.trsock import TransportSocket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import httptools

from streamplane.config import EdgeSettings
from streamplane.edge import http, propagation, tokens
from streamplane.edge.cache import Complete, DiskCache, Failed, FetchError, error_text
from streamplane.edge.fetch import Fetches, Follower
from streamplane.edge.metrics import WorkerMetrics
from streamplane.edge.origin import Origin, make_origin
from streamplane.edge.throttle import LogThrottle

__all__ = ["Job", "listening_socket", "run_worker"]

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 1 << 20
MAX_PIPELINED: Final = 32
# Text that players parse goes through memory (a few KB, answered in one write);
# media bytes always go by sendfile, however small.
_MEDIA_SUFFIXES: Final = (".m4s", ".mp4", ".m4a", ".ts")
_SMALL_TEXT: Final = 64 * 1024
# Bytes per loop.sendfile call: send_timeout_s applies to each, so a client must take at least
# this much per timeout to keep its connection (512 KB in 30 s is ~140 kbit/s).
_SEND_CHUNK: Final = 512 << 10
# After answering a request we cannot continue (or Connection: close), keep reading and
# discarding for this long before closing: closing with unread bytes makes the kernel send a
# RST, and the client may lose our answer with it (nginx's lingering_close).
_LINGER_S: Final = 2.0
_GRANT_CACHE: Final = 16384
_HOT_OBJECTS: Final = 1024
_READ_BUFFER: Final = 256 << 10
_HOT_TTL_S: Final = 0.5  # a live playlist is at most this stale
_METHOD_LIKE: Final = re.compile(rb"[A-Z]{2,20} /")
_NEEDED_HEADERS: Final = frozenset(
    {
        b"range",
        b"if-none-match",
        b"if-modified-since",
        b"cookie",
        b"origin",
        b"authorization",
        b"x-forwarded-for",
        b"host",
    }
)


# What answering a request leaves to do: nothing (answered at once) or a coroutine to await.
Job = Callable[[], Awaitable[None]] | None


class _Request:
    __slots__ = ("body", "header_bytes", "headers", "keep_alive", "method", "started", "url")

    def __init__(self, started: float) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body = bytearray()
        self.method = b""
        self.keep_alive = True
        self.started = started


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Worker:
    """State one worker shares among its connections."""

    def __init__(
        self,
        config: EdgeSettings,
        keyring: dict[str, str],
        index: int,
        cache: DiskCache,
        origin: Origin,
        keeper: socket.socket,
    ) -> None:
        self.config = config
        self.index = index
        self.cache = cache
        self.origin = origin
        self.metrics = WorkerMetrics()
        self.warn = LogThrottle(lambda text: print(f"edge worker {index}: {text}", file=sys.stderr))
        self.keyring = {kid: tokens.key_from_hex(h) for kid, h in keyring.items()}
        self.connections: set[EdgeConnection] = set()
        # Misses start or join origin fetches here (see fetch); what landed, and a full disk,
        # are told to the supervisor, which keeps the cache within its disk.
        self.fetches = Fetches(
            cache,
            origin,
            stall_s=config.stall_timeout_s,
            stored=lambda key, size: self.tell_keeper({"admit": key, "size": size}),
            warn=self.warn,
            counters=self.metrics.s,
        )
        cache.ask_room = lambda need: self.tell_keeper({"room": need})
        cache.warn = self.warn
        self.tasks: set[asyncio.Task[None]] = set()
        self.grants: dict[tuple[str, str], tokens.Grant] = {}  # (token, client) -> verified
        # (request target, client) -> (its path, the grant that allowed it)
        self.verified: dict[tuple[bytes, str], tuple[str, tokens.Grant]] = {}
        # Playlists and manifests held in memory for _HOT_TTL_S, as nginx's open_file_cache
        # holds descriptors: a player polls them, and each poll would otherwise cost five
        # syscalls. key, or (key, carry) for a manifest rewritten for a token (see
        # EdgeConnection._carry) -> (valid until, headers, body)
        self.hot: dict[str | tuple[str, propagation.Carry], tuple[float, bytes, bytes]] = {}
        # One receive buffer for every connection of the worker (see EdgeConnection.get_buffer).
        self.read_buffer = memoryview(bytearray(_READ_BUFFER))
        self.draining = False
        self.date = http.http_date(time.time())
        self.run_dir = cache.root / ".run"
        # The supervisor's end of a socketpair it made and handed down: no other process
        # can send to it (an abstract socket name took datagrams from any local process).
        self._keeper = keeper
        keeper.setblocking(False)
        self._hits: dict[str, int] = {}
        self._log: list[bytes] = []

    # -- housekeeping, once a second --------------------------------------------------

    def tick(self) -> None:
        self.date = http.http_date(time.time())
        self.metrics.s.connections = len(self.connections)
        with contextlib.suppress(OSError):
            self.metrics.dump(self.run_dir / "metrics" / f"worker-{self.index}.json")
        self.flush_hits()
        if self._log:
            sys.stdout.buffer.write(b"".join(self._log))
            sys.stdout.buffer.flush()
            self._log.clear()

    def tell_keeper(self, message: dict[str, Any]) -> None:
        # Advice to the eviction policy; a full socket loses advice, never data.
        with contextlib.suppress(OSError):
            self._keeper.send(json.dumps(message).encode())

    def hit(self, key: str) -> None:
        # Counted per key, in the order of each key's last request (what LRU needs), and told
        # once a second: a popular segment's thousand hits are one entry, not a thousand.
        hits = self._hits
        hits[key] = hits.pop(key, 0) + 1
        if len(hits) >= 256:
            self.flush_hits()

    def flush_hits(self) -> None:
        if self._hits:
            self.tell_keeper({"hits": list(self._hits.items())})
            self._hits = {}

    def log(self, conn: EdgeConnection, req: _Request, status: int, sent: int) -> None:
        elapsed = time.monotonic() - req.started
        self.metrics.request(status, elapsed)
        if self.config.access_log:
            entry = {
                "t": round(time.time(), 3),
                "client": conn.client_ip,
                "method": req.method.decode("latin-1"),
                "path": req.url[:256].decode("latin-1").partition("?")[0],
                "status": status,
                "bytes": sent,
                "ms": round(elapsed * 1000, 3),
                "worker": self.index,
            }
            self._log.append(json.dumps(entry).encode() + b"\n")

    # -- misses ------------------------------------------------------------------------

    def ensure_fetch(self, key: str) -> bool:
        """Start the origin fetch of ``key`` unless one runs somewhere; True if this joins one."""
        return self.fetches.ensure(key)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class EdgeConnection(asyncio.BufferedProtocol):
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.sock_fd = -1  # -1 over TLS: bodies cannot go by sendfile
        self.tsock: TransportSocket | None = None  # for TCP_CORK
        self.client_ip = ""
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
        self.queue: deque[_Request] = deque()
        self.busy = False  # a task is answering the head of the queue
        self.closing = False
        self.in_flight = False
        # One float per connection, swept by the worker every quarter second: cheaper than a
        # timer handle created and cancelled for every request.
        self.deadline_at = 0.0
        self.deadline_status = 0
        self.wfd = -1  # our own descriptor of the socket, for sendfile (see _sendfile)
        self.reading_paused = False
        self.closing_after_queue = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.sock_fd = sock.fileno()
                self.tsock = sock
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.w.connections.add(self)
        self._arm(self.w.config.idle_timeout_s, 408)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.w.connections.discard(self)
        self._disarm()
        self._release_wfd()

    # A buffered protocol, reading into the worker's one buffer: a plain protocol's transport
    # allocates a fresh 256 KB bytes object per read, which glibc serves with mmap, mremap and
    # munmap (three syscalls and a page fault per request, seen under strace). Sharing is safe:
    # the transport fills the buffer and calls buffer_updated before any other connection
    # reads, and the parser copies what it hands to the callbacks.
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.w.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.w.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served here")
        except httptools.HttpParserInvalidMethodError:
            if _METHOD_LIKE.match(data):
                self._refuse(501, "unknown method")
            else:
                self._refuse(400, "malformed request line")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own refusals carry their status
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.status, str(cause))
            else:
                self._refuse(400, f"malformed request: {exc}")
        except _Reject as exc:
            self._refuse(exc.status, str(exc))

    def eof_received(self) -> bool | None:
        # The client finished sending; answer what is queued, then close.
        if self.closing or (not self.queue and not self.busy):
            return False
        self.closing_after_queue = True
        return True

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request(time.monotonic())
        self._arm(self.w.config.header_timeout_s, 408)

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        if len(self.current.url) > http.MAX_PATH_BYTES:
            raise _Reject(414, "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > MAX_HEADER_BYTES:
            raise _Reject(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
        lower = name.lower()
        if lower in _NEEDED_HEADERS:
            if lower in req.headers and lower != b"cookie":
                if lower == b"range":
                    raise _Reject(400, "more than one Range header")
            else:
                req.headers[lower] = value

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        self._disarm()

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        if len(req.body) + len(body) > MAX_BODY_BYTES:
            raise _Reject(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        req.body += body

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        self.current = None
        self.queue.append(req)
        if len(self.queue) > MAX_PIPELINED and self.transport and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        if not self.busy:
            self._answer_queue()

    # -- answering -------------------------------------------------------------------

    def _answer_queue(self) -> None:
        while self.queue and not self.closing:
            req = self.queue.popleft()
            self.in_flight = True
            job = self._answer(req)
            if job is not None:
                self.busy = True
                self.w.spawn(self._finish(req, job))
                return
            self.in_flight = False
            if not req.keep_alive or self.w.draining:
                self._close()
                return
        if self.reading_paused and self.transport and not self.closing:
            self.transport.resume_reading()
            self.reading_paused = False
        if not self.queue and not self.closing:
            if self.closing_after_queue:
                self._close()
            else:
                self._arm(self.w.config.idle_timeout_s, 0)

    async def _finish(self, req: _Request, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except (TimeoutError, ConnectionError, OSError):
            self._abort()
        except Exception as exc:  # a bug: answer 500 if nothing was sent, and keep serving
            print(f"edge worker {self.w.index}: {exc!r}", file=sys.stderr)
            self._abort()
        finally:
            self.busy = False
            self.in_flight = False
        if self.closing:
            return
        if not req.keep_alive or self.w.draining:
            self._close()
            return
        self._answer_queue()

    def _answer(self, req: _Request) -> Job:
        """Answer at once, or return the coroutine function that will."""
        method = req.method
        if method == b"OPTIONS":
            return self._send_simple(req, 204, b"", extra=_PREFLIGHT)
        # A player polls its playlist with one URL and one token: a request target this
        # client was granted before skips parsing and the ACL match, keeping only the clock.
        seen = self.w.verified.get((req.url, self._client_address(req)))
        if seen is not None and method in (b"GET", b"HEAD") and seen[1].live(int(time.time())):
            path = seen[0]
        else:
            try:
                path, query = http.request_path(req.url)
            except http.BadPath as exc:
                return self._send_error(req, 400, str(exc))
            if path.startswith("/_edge/") or path in ("/healthz", "/metrics", "/fill"):
                return self._answer_operations(req, path)
            if method not in (b"GET", b"HEAD"):
                return self._send_error(req, 405, "only GET and HEAD", allow=b"GET, HEAD, OPTIONS")
            grant = None
            if self.w.config.require_token:
                try:
                    grant = self._check_token(req, path, query)
                except tokens.TokenError as exc:
                    self.w.metrics.s.token_rejections += 1
                    return self._send_error(req, exc.http_status, str(exc))
            if not path[1:] or "/." in path:  # the path is normalised: a segment starting "."
                return self._send_error(req, 404, "no such object")
            if grant is not None:
                verified = self.w.verified
                if len(verified) >= _GRANT_CACHE:
                    verified.clear()
                verified[(req.url, self._client_address(req))] = (path, grant)
        key = path[1:]
        carry = self._carry(req, path)
        hot = self.w.hot.get(key if carry is None else (key, carry))
        if hot is not None and hot[0] > req.started and not _conditional_or_ranged(req):
            self.w.metrics.s.hits += 1
            self.w.hit(key)
            head = self._head(req, 200, hot[1])
            self._write(head if req.method == b"HEAD" else head + hot[2])
            self.w.metrics.s.bytes_sent += len(hot[2])
            self.w.log(self, req, 200, len(hot[2]))
            return None
        obj = self.w.cache.open_complete(key)
        if obj is not None:
            self.w.metrics.s.hits += 1
            self.w.hit(key)
            return self._send_object(req, path, obj.fd, obj.size, obj.mtime_ns, carry)
        status = self.w.cache.recent_error(key)
        if status is not None:
            return self._send_error(req, status, error_text(status))
        return lambda: self._send_miss(req, path, key, carry)

    def _carry(self, req: _Request, path: str) -> propagation.Carry | None:
        """The token a manifest served to this request hands on to the URIs inside it.

        Players resolve a manifest's relative URIs without the manifest's query, so a title
        signed in the query string would play no further than its master playlist (token
        propagation, see ``propagation``). Only a token that came in the query and was
        verified is carried; one from a cookie travels by itself.
        """
        if not self.w.config.require_token or not propagation.rewrites(path):
            return None
        query = req.url.partition(b"?")[2]
        return propagation.carry_from_query(
            self.w.config.token_name, query, req.headers.get(b"host")
        )

    def _check_token(self, req: _Request, path: str, query: str) -> tokens.Grant | None:
        """Verify the token, once per token and client: a session asks for hundreds of paths.

        The first request pays the HMAC; later ones only match their path against the
        grant's ACL and check its expiry. Returns the grant when the token came in the
        target's own query string, so that the target can be remembered as granted
        (``Worker.verified``); not when it leans on a cookie, which the target does not carry.
        """
        name = self.w.config.token_name
        token = tokens.token_from_request(query, None, name)
        in_query = token is not None
        if not in_query:
            token = tokens.token_from_request("", _cookie(req), name)
        client = self._client_address(req)
        now = int(time.time())
        grants = self.w.grants
        grant = grants.get((token, client)) if token else None
        if grant is None:
            grant = tokens.verify(
                token, path=path, now=now, client_ip=client, keyring=self.w.keyring
            )
            if len(grants) >= _GRANT_CACHE:
                grants.clear()
            grants[(token or "", client)] = grant
        else:
            if now >= grant.expiry:
                raise tokens.ExpiredToken(f"expired at {grant.expiry}, now is {now}")
            if grant.start is not None and now < grant.start:
                raise tokens.NotYetValid(f"valid from {grant.start}, now is {now}")
            if not tokens.grant_allows(grant, path):
                raise tokens.PathNotAllowed(f"{path!r} is outside the token's acl")
        return grant if in_query else None

    def _client_address(self, req: _Request) -> str:
        if self.w.config.trust_forwarded_for:
            forwarded = req.headers.get(b"x-forwarded-for")
            if forwarded:
                return forwarded.split(b",")[0].strip().decode("latin-1")
        return self.client_ip

    # -- the body of a complete object --------------------------------------------------

    def _send_object(
        self,
        req: _Request,
        path: str,
        fd: int,
        size: int,
        mtime_ns: int,
        carry: propagation.Carry | None = None,
    ) -> Job:
        etag = http.etag_for(mtime_ns, size)
        if carry is not None:  # a manifest rewritten for a token is another representation
            etag = propagation.etag(etag, carry)
        mtime = mtime_ns / 1e9
        headers = [
            (b"Content-Type", http.content_type(path)),
            (b"Last-Modified", http.http_date(mtime)),
            (b"ETag", etag),
            (b"Cache-Control", http.cache_control(path)),
            (b"Accept-Ranges", b"bytes"),
        ]
        h = req.headers
        if http.is_not_modified(etag, mtime, h.get(b"if-none-match"), h.get(b"if-modified-since")):
            os.close(fd)
            return self._send_simple(req, 304, b"", extra=headers)
        body: bytes | None = None
        if carry is not None:  # its length, and the range asked of it, are the rewritten body's
            try:
                body = propagation.propagate(path, os.pread(fd, size, 0), carry)
            except BaseException:
                os.close(fd)
                raise
            size = len(body)
        try:
            wanted = http.parse_range(h.get(b"range"), size)
        except http.Unsatisfiable as exc:
            os.close(fd)
            return self._send_error(
                req, 416, str(exc), extra=[(b"Content-Range", b"bytes */%d" % size)]
            )
        status, offset, count = 200, 0, size
        if wanted is not None:
            status, offset, count = 206, wanted.start, wanted.length
            headers.append((b"Content-Range", b"bytes %d-%d/%d" % (wanted.start, wanted.end, size)))
        headers.append((b"Content-Length", str(count).encode()))
        head = self._head(req, status, headers)
        if req.method == b"HEAD" or count == 0:
            os.close(fd)
            self._write(head)
            self.w.log(self, req, status, 0)
            return None
        if (
            body is not None
            or self.sock_fd < 0
            or (count <= _SMALL_TEXT and not path.endswith(_MEDIA_SUFFIXES))
        ):
            try:
                body = (
                    os.pread(fd, count, offset) if body is None else body[offset : offset + count]
                )
            finally:
                os.close(fd)
            if status == 200 and len(body) == size and size <= _SMALL_TEXT:
                if len(self.w.hot) >= _HOT_OBJECTS:
                    self.w.hot.clear()
                hot = (req.started + _HOT_TTL_S, http.header_block(headers), body)
                self.w.hot[path[1:] if carry is None else (path[1:], carry)] = hot
            self._write(head + body)
            self.w.metrics.s.bytes_sent += len(body)
            self.w.log(self, req, status, len(body))
            return None
        # Corked, as nginx's tcp_nopush: the head leaves with the body's first bytes, and the
        # body leaves in full frames pushed from this call. Uncorked, the head went alone and
        # most of the body went later, transmitted on the client's ACKs in the client's own
        # time slice: on one machine that moved the kernel's work to wrk and cost 30 % of the
        # throughput against nginx (docs/benchmarks.md).
        assert self.tsock is not None
        self.tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        self._write(head)
        sent = 0
        assert self.transport is not None
        if self.transport.get_write_buffer_size() == 0:
            sent = self._sendfile_now(fd, offset, count)
        self.tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        if sent < 0:
            os.close(fd)
            self._abort()
            return None
        if sent == count:
            os.close(fd)
            self.w.metrics.s.bytes_sent += sent
            self.w.log(self, req, status, sent)
            return None
        return lambda: self._sendfile_rest(req, status, fd, offset + sent, count - sent, sent)

    def _sendfile_now(self, fd: int, offset: int, count: int) -> int:
        """As much as the socket takes without waiting; -1 if the client is gone."""
        sent = 0
        while sent < count:
            try:
                n = os.sendfile(self.sock_fd, fd, offset + sent, count - sent)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                return -1
            if n == 0:
                break
            sent += n
        return sent

    async def _sendfile_rest(
        self, req: _Request, status: int, fd: int, offset: int, count: int, already: int
    ) -> None:
        try:
            await self._sendfile(fd, offset, count)
            self.w.metrics.s.bytes_sent += count + already
            self.w.log(self, req, status, count + already)
        finally:
            os.close(fd)

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset``: zero-copy unless over TLS.

        On a plain socket this is a loop of ``os.sendfile`` on our own duplicate of the socket
        (so a descriptor number the transport closed and the kernel reused can never be
        written to), waiting for writability when the socket is full. It is asyncio's
        ``loop.sendfile`` without its per-call setup, which measured as the largest cost on
        2 MB segments. A client that takes no byte for ``send_timeout_s`` is dropped.
        """
        assert self.transport is not None
        if self.sock_fd < 0 or self.transport.get_write_buffer_size():
            await self._sendfile_via_loop(fd, offset, count)
            return
        if self.wfd < 0:
            self.wfd = os.dup(self.sock_fd)
        while count > 0:
            if self.closing:
                raise ConnectionAbortedError("the client went away")
            try:
                n = os.sendfile(self.wfd, fd, offset, count)
            except BlockingIOError:
                await self._writable()
                continue
            if n == 0:
                raise ConnectionAbortedError("the file ended before its length")
            offset += n
            count -= n

    async def _writable(self) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.loop.add_writer(self.wfd, ready)
        try:
            await asyncio.wait_for(waiter, self.w.config.send_timeout_s)
        finally:
            if self.wfd >= 0:
                self.loop.remove_writer(self.wfd)

    async def _sendfile_via_loop(self, fd: int, offset: int, count: int) -> None:
        """TLS, or a response queued behind buffered bytes: asyncio's own sendfile."""
        assert self.transport is not None
        # closefd=False: the caller owns fd. Over TLS loop.sendfile reads through memory.
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while count > 0:
                chunk = min(count, _SEND_CHUNK)
                await asyncio.wait_for(
                    self.loop.sendfile(self.transport, f, offset, chunk),
                    self.w.config.send_timeout_s,
                )
                offset += chunk
                count -= chunk

    # -- misses: join or start the fetch, send the bytes as they land ------------------

    async def _send_miss(
        self, req: _Request, path: str, key: str, carry: propagation.Carry | None
    ) -> None:
        w = self.w
        w.metrics.s.misses += 1
        found = await w.fetches.outcome(key)
        if isinstance(found, Failed):
            self._send_error(req, found.status, found.message)
        elif isinstance(found, Complete):
            obj = found.obj
            response = self._send_object(req, path, obj.fd, obj.size, obj.mtime_ns, carry)
            if response is not None:
                await response()
        else:
            follower = Follower(w.fetches, key, found)
            try:
                if carry is None:
                    await self._stream_partial(req, path, follower)
                else:
                    await self._send_whole_manifest(req, path, follower, carry)
            finally:
                follower.close()

    async def _send_whole_manifest(
        self, req: _Request, path: str, follower: Follower, carry: propagation.Carry
    ) -> None:
        """A manifest to rewrite cannot be streamed as it lands: wait for all of it (a few KB)."""
        length, pos = follower.meta.length, 0
        try:
            while pos < length:
                pos = await follower.available(pos)
        except FetchError as exc:
            self._send_error(req, exc.status, str(exc))
            return
        # whole seconds, as the committed file's mtime will give: the same validators
        mtime_ns = int(follower.meta.mtime) * 1_000_000_000
        response = self._send_object(req, path, os.dup(follower.fd), length, mtime_ns, carry)
        if response is not None:
            await response()

    async def _stream_partial(self, req: _Request, path: str, follower: Follower) -> None:
        length, mtime = follower.meta.length, follower.meta.mtime
        # whole seconds, as the committed file's mtime will give: the same validators
        headers = http.object_headers(path, int(mtime) * 1_000_000_000, length)
        try:
            wanted = http.parse_range(req.headers.get(b"range"), length)
        except http.Unsatisfiable as exc:
            self._send_error(req, 416, str(exc), extra=[(b"Content-Range", b"bytes */%d" % length)])
            return
        status, pos, end = 200, 0, length
        if wanted is not None:
            status, pos, end = 206, wanted.start, wanted.end + 1
            headers.append(
                (b"Content-Range", b"bytes %d-%d/%d" % (wanted.start, wanted.end, length))
            )
        headers.append((b"Content-Length", str(end - pos).encode()))
        self._write(self._head(req, status, headers))
        if req.method == b"HEAD":
            self.w.log(self, req, status, 0)
            return
        start = pos
        while pos < end:
            try:
                available = min(await follower.available(pos), end)
            except FetchError as exc:  # the rest will not come: never end a short body as whole
                raise ConnectionAbortedError(str(exc)) from None
            await self._sendfile(follower.fd, pos, available - pos)
            pos = available
        self.w.metrics.s.bytes_sent += pos - start
        self.w.log(self, req, status, pos - start)

    # -- operations endpoints -------------------------------------------------------

    def _answer_operations(self, req: _Request, path: str) -> Job:
        from streamplane.edge import operations

        return operations.answer(self, req, path)

    # -- writing ---------------------------------------------------------------------

    def _head(
        self, req: _Request, status: int, headers: list[tuple[bytes, bytes]] | bytes
    ) -> bytes:
        keep = req.keep_alive and not self.w.draining
        origin = req.headers.get(b"origin")
        return http.response_head(
            status, headers, date=self.w.date, keep_alive=keep, cors_origin=origin or b"*"
        )

    def _send_simple(
        self,
        req: _Request,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = (),
    ) -> Job:
        headers = list(extra)
        if status not in (204, 304):
            headers.append((b"Content-Type", content_type))
            headers.append((b"Content-Length", str(len(body)).encode()))
        head = self._head(req, status, headers)
        self._write(head if req.method == b"HEAD" or status in (204, 304) else head + body)
        self.w.log(self, req, status, len(body))
        return None

    def _send_error(
        self,
        req: _Request,
        status: int,
        message: str,
        *,
        allow: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> Job:
        headers = list(extra or [])
        if allow:
            headers.append((b"Allow", allow))
        body = json.dumps({"error": message, "status": status}).encode() + b"\n"
        return self._send_simple(req, status, body, content_type=b"application/json", extra=headers)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def _refuse(self, status: int, message: str) -> None:
        """A request we cannot parse: answer it and close, since the stream is lost."""
        req = self.current or _Request(time.monotonic())
        req.keep_alive = False
        if not req.method:
            req.method = b"GET"
        self.queue.clear()
        if not self.busy:
            self._send_error(req, status, message)
            self._close()
        else:
            self._abort()

    def _arm(self, seconds: float, status: int) -> None:
        self.deadline_at = time.monotonic() + seconds
        self.deadline_status = status

    def _disarm(self) -> None:
        self.deadline_at = 0.0

    def check_deadline(self, now: float) -> None:
        """Called by the worker's sweep: act on a deadline that passed."""
        if not self.deadline_at or now < self.deadline_at:
            return
        self.deadline_at = 0.0
        if self.closing:
            if self.transport is not None:
                self.transport.close()  # the linger after a refusal is over
            return
        if self.busy:
            return
        if self.deadline_status and self.current is not None:
            self._refuse(self.deadline_status, "the request headers took too long")
        else:
            self._close()

    def _close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self._disarm()
            if self.transport.can_write_eof():
                self.transport.write_eof()  # FIN once the response is flushed
                self.deadline_at = time.monotonic() + _LINGER_S
            else:
                self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.closing = True
            self._disarm()
            self.transport.abort()
        self._release_wfd()

    def _release_wfd(self) -> None:
        if self.wfd >= 0:
            self.loop.remove_writer(self.wfd)
            os.close(self.wfd)
            self.wfd = -1

    def close_if_idle(self) -> None:
        """Draining: idle keep-alive connections go now, busy ones after their response."""
        if not self.busy and not self.queue and self.current is None:
            self._close()


_PREFLIGHT: Final = (
    (b"Access-Control-Allow-Methods", b"GET, HEAD, OPTIONS"),
    (b"Access-Control-Allow-Headers", b"Range, If-None-Match, If-Modified-Since"),
    (b"Access-Control-Max-Age", b"86400"),
)


def _conditional_or_ranged(req: _Request) -> bool:
    h = req.headers
    return b"range" in h or b"if-none-match" in h or b"if-modified-since" in h


def _cookie(req: _Request) -> str | None:
    value = req.headers.get(b"cookie")
    return value.decode("latin-1") if value is not None else None


# -- the worker process ----------------------------------------------------------------


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT: each worker owns one, the kernel spreads accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def tls_context(config: EdgeSettings) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key or None)
    context.set_alpn_protocols(["http/1.1"])
    return context


def run_worker(
    config: EdgeSettings,
    keyring: dict[str, str],
    index: int,
    supervisor: int,
    keeper: socket.socket,
) -> None:
    """Entry point of one worker process, started by the supervisor (its pid), which hands
    it its end of the control channel (``keeper``)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, keyring, index, supervisor, keeper))


async def _serve(
    config: EdgeSettings,
    keyring: dict[str, str],
    index: int,
    supervisor: int,
    keeper: socket.socket,
) -> None:
    loop = asyncio.get_running_loop()
    cache = DiskCache(Path(config.cache_dir))
    origin = make_origin(config.origin)
    worker = Worker(config, keyring, index, cache, origin, keeper)
    (worker.run_dir / "metrics").mkdir(exist_ok=True)
    sock = listening_socket(config.host, config.port)
    server = await loop.create_server(
        lambda: EdgeConnection(worker), sock=sock, ssl=tls_context(config), backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    # The supervisor's pid comes from the supervisor itself: read here with os.getppid(), it
    # would already be init's if the supervisor died while this worker was starting (a
    # second of imports), and the worker would then serve on, orphaned, for ever.
    async def ticker() -> None:
        n = 0
        while True:
            if os.getppid() != supervisor:  # the supervisor died: do not serve on, orphaned
                stop.set()
            try:
                now = time.monotonic()
                for conn in list(worker.connections):
                    conn.check_deadline(now)
                if n % 4 == 0:
                    worker.tick()
            except Exception as exc:  # a bug; the ticker must live on to see the supervisor go
                print(f"edge worker {index}: tick failed: {exc!r}", file=sys.stderr)
            n += 1
            await asyncio.sleep(0.25)

    tick_task = loop.create_task(ticker())
    await stop.wait()
    # Drain: stop accepting, close idle keep-alive connections, let responses finish.
    worker.draining = True
    server.close()
    deadline = time.monotonic() + config.drain_timeout_s
    while worker.connections and time.monotonic() < deadline:
        for conn in list(worker.connections):
            conn.close_if_idle()
        await asyncio.sleep(0.05)
    for conn in list(worker.connections):
        conn._abort()
    tick_task.cancel()
    worker.tick()
    await origin.aclose()
