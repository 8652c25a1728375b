"""One edge worker process: the asyncio shell around each connection's protocol core.

What a connection does is decided by :class:`~streamplane.edge.protocol.EdgeProtocol`, a
state machine without I/O (see ``protocol``); :class:`EdgeConnection` feeds it what the socket
and the cache say and carries out the actions it answers with. Why these parts:

- asyncio's default selector loop, not uvloop: uvloop implements no ``sendfile`` and would
  copy every body through user space. The hot path sends with ``os.sendfile`` straight from
  the callback that received the request when the socket has room, and only falls back to a
  task for what the socket did not take at once, so a cache hit costs no task and no copy.
- httptools (the llhttp parser) parses requests, inside the core; the HTTP decisions
  themselves are the pure functions of :mod:`streamplane.edge.http`.
- Several such processes share the port with ``SO_REUSEPORT`` (see ``supervisor``), and the
  disk cache (see ``cache``) is what they share: a miss in any worker joins a fetch under way
  in any other.

An error nobody expected while carrying out one request's action is told to the core, which
answers that request 500 (or aborts its connection if part of the answer went); the worker
and its other connections serve on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import ssl
import sys
import time
from asyncio.trsock import TransportSocket
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

from streamplane.config import EdgeSettings
from streamplane.edge import live, operations, protocol, tokens
from streamplane.edge.cache import Complete, DiskCache, Failed, FetchError, error_text
from streamplane.edge.fetch import Fetches, Follower
from streamplane.edge.origin import Origin, make_origin
from streamplane.edge.protocol import (
    Abort,
    Action,
    Close,
    CloseFile,
    EdgeProtocol,
    Fetch,
    Open,
    Operate,
    PauseReading,
    ReadText,
    ResumeReading,
    SendFile,
    Shutdown,
    WorkerState,
    Write,
)
from streamplane.edge.throttle import LogThrottle

__all__ = ["EdgeConnection", "Worker", "check_port", "listening_socket", "run_worker"]

# Bytes per loop.sendfile call over TLS (or behind buffered bytes): progress is told to the
# core after each, so a client must take at least this much per send_timeout_s.
_SEND_CHUNK: Final = 512 << 10
_READ_BUFFER: Final = 256 << 10
_HITS_BATCH: Final = 256


class Worker:
    """State one worker shares among its connections: the core's part, and the I/O's."""

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
        self.warn = LogThrottle(lambda text: print(f"edge worker {index}: {text}", file=sys.stderr))
        self.state = WorkerState(
            config, {kid: tokens.key_from_hex(h) for kid, h in keyring.items()}, index
        )
        self.state.set_clock(time.monotonic(), time.time())
        self.metrics = self.state.metrics
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
        # One receive buffer for every connection of the worker (see EdgeConnection.get_buffer).
        self.read_buffer = memoryview(bytearray(_READ_BUFFER))
        self.run_dir = cache.root / ".run"
        # The supervisor's end of a socketpair it made and handed down: no other process
        # can send to it (an abstract socket name took datagrams from any local process).
        self._keeper = keeper
        keeper.setblocking(False)

    @property
    def draining(self) -> bool:
        return self.state.draining

    # -- housekeeping ---------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Every quarter second: the clock for the cores, and the deadlines that passed."""
        self.state.set_clock(now, time.time())
        for conn in list(self.connections):
            deadline = conn.core.deadline
            if now >= deadline:
                conn.tick(now)

    def tick(self) -> None:
        """Once a second: counters to disk, advice to the supervisor, the access log out."""
        self.metrics.s.connections = len(self.connections)
        with contextlib.suppress(OSError):
            self.metrics.dump(self.run_dir / "metrics" / f"worker-{self.index}.json")
        self.flush_hits()
        log = self.state.log_lines
        if log:
            sys.stdout.buffer.write(b"".join(log))
            sys.stdout.buffer.flush()
            log.clear()

    def tell_keeper(self, message: dict[str, Any]) -> None:
        # Advice to the eviction policy; a full socket loses advice, never data.
        with contextlib.suppress(OSError):
            self._keeper.send(json.dumps(message).encode())

    def flush_hits(self) -> None:
        # Counted per key, in the order of each key's last request (what LRU needs), and told
        # once a second or per 256 keys: a popular segment's thousand hits are one entry.
        hits = self.state.hits
        if hits:
            self.tell_keeper({"hits": list(hits.items())})
            hits.clear()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class EdgeConnection(asyncio.BufferedProtocol):
    """The shell of one connection: the socket and the cache on one side, the core on the other."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core: EdgeProtocol  # made in connection_made, which asyncio calls first
        self.sock_fd = -1  # -1 over TLS: bodies cannot go by sendfile
        self.tsock: TransportSocket | None = None  # for TCP_CORK
        self.wfd = -1  # our own descriptor of the socket, for sendfile (see _sendfile)
        self.sender: asyncio.Task[None] | None = None  # what the socket did not take at once
        self.follower: asyncio.Task[None] | None = None  # reports on a fetch to the core
        self._applying = False
        self._later: deque[Action] = deque()

    # -- asyncio.Protocol: notices for the core -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.core = EdgeProtocol(self.w.state, peer[0] if peer else "", time.monotonic())
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.sock_fd = sock.fileno()
                self.tsock = sock
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.w.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.w.connections.discard(self)
        self._stop_tasks()
        self._notify(self.core.connection_lost)  # the core gives back the files it held
        self._release_wfd()

    # A buffered protocol, reading into the worker's one buffer: a plain protocol's transport
    # allocates a fresh 256 KB bytes object per read, which glibc serves with mmap, mremap and
    # munmap (three syscalls and a page fault per request, seen under strace). Sharing is safe:
    # the transport fills the buffer and calls buffer_updated before any other connection
    # reads, and the parser copies what it hands to the core.
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.w.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        try:
            actions = self.core.receive_data(self.w.read_buffer[:nbytes], time.monotonic())
        except Exception as exc:
            self._core_failed(exc)
            return
        self._apply(actions)
        if len(self.w.state.hits) >= _HITS_BATCH:
            self.w.flush_hits()

    def eof_received(self) -> bool:
        # Half-open: the core answers what is queued and then closes. (Over TLS the transport
        # closes regardless, and warns if asked not to.)
        self._notify(self.core.eof)
        return self.sock_fd >= 0

    def pause_writing(self) -> None:
        self._notify(self.core.writing_paused)

    def resume_writing(self) -> None:
        self._notify(self.core.writing_resumed)

    def tick(self, now: float) -> None:
        try:
            actions = self.core.tick(now)
        except Exception as exc:
            self._core_failed(exc)
            return
        self._apply(actions)

    def drain(self) -> None:
        self._notify(self.core.drain)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _notify(self, notice: Any, *args: Any) -> None:
        try:
            actions = notice(*args, time.monotonic())
        except Exception as exc:
            self._core_failed(exc)
            return
        self._apply(actions)

    def _core_failed(self, exc: BaseException) -> None:
        # A bug in the core: its state cannot be trusted, so this connection goes. Only this one.
        self.w.warn("core", f"a connection's core failed: {exc!r}")
        self._stop_tasks()
        if self.transport is not None:
            self.transport.abort()

    # -- carrying out the core's actions ------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        """Carry out actions in order; those that notices return meanwhile come after."""
        if self._applying:
            self._later.extend(actions)
            return
        if len(actions) == 1 and type(actions[0]) is Write:  # most answers: one write
            assert self.transport is not None
            self.transport.write(actions[0].data)
            return
        self._applying = True
        try:
            for action in actions:
                self._do(action)
            later = self._later
            while later:
                self._do(later.popleft())
        finally:
            self._applying = False

    def _do(self, action: Action) -> None:
        try:
            self._carry_out(action)
        except Exception as exc:  # a bug, or an error nobody expected: this request only
            self.w.warn("action", f"{action!r} failed: {exc!r}")
            self._notify(self.core.failed)

    def _carry_out(self, action: Action) -> None:
        # The core emits nothing after Close or Abort, nor once told the connection was lost.
        transport = self.transport
        assert transport is not None
        if type(action) is Write:
            transport.write(action.data)
        elif type(action) is Open:
            self._open(action.key)
        elif type(action) is SendFile:
            self._send_file(action)
        elif type(action) is CloseFile:
            os.close(action.fd)
        elif type(action) is ReadText:
            body = os.pread(action.fd, action.count, action.offset)
            self._notify(self.core.text_read, body)
        elif type(action) is Fetch:
            self.follower = self._spawn(self._follow(action.key, action.serial))
        elif type(action) is Operate:
            reply = operations.answer(self.w, action.request, action.path, self.core.client_ip)
            self._apply(
                self.core.reply(
                    reply.status,
                    reply.body,
                    time.monotonic(),
                    content_type=reply.content_type,
                    extra=reply.extra,
                )
            )
        elif type(action) is Shutdown:
            if transport.can_write_eof():
                transport.write_eof()  # FIN once the response is flushed; reading goes on
            else:
                transport.close()
        elif type(action) is Close:
            transport.close()
        elif type(action) is Abort:
            self._stop_tasks()
            transport.abort()
            self._release_wfd()
        elif type(action) is PauseReading:
            transport.pause_reading()
        elif type(action) is ResumeReading:
            if not transport.is_reading() and not transport.is_closing():
                transport.resume_reading()
        else:
            raise TypeError(f"unknown action {action!r}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.w.tasks.add(task)
        task.add_done_callback(self.w.tasks.discard)
        return task

    def _stop_tasks(self) -> None:
        for task in (self.sender, self.follower):
            if task is not None and not task.done():
                task.cancel()
        self.sender = self.follower = None

    # -- the cache ------------------------------------------------------------------------

    def _open(self, key: str) -> None:
        cache = self.w.cache
        obj = cache.open_complete(key)
        now = time.monotonic()
        ttl = self.w.config.live_playlist_ttl_s
        # A live playlist stored (renamed into place) longer ago than its lifetime is
        # fetched again.
        if (
            obj is not None
            and live.is_live_playlist(key, ttl)
            and time.time() - os.fstat(obj.fd).st_ctime > ttl
        ):
            os.close(obj.fd)
            cache.remove(key)
            obj = None
        if obj is not None:
            self._apply(self.core.opened(obj.fd, obj.size, obj.mtime_ns, now))
            return
        status = cache.recent_error(key)
        failed = None if status is None else (status, error_text(status))
        self._apply(self.core.missing(failed, now))

    async def _follow(self, key: str, serial: int) -> None:
        """Start or join the fetch of ``key``; report what lands to the core while it follows.

        ``Fetches`` holds the rules (one origin request per object, a dead fetcher's partial
        taken over); this only tells the core. The core gets descriptors of its own: the
        follower keeps one to watch the body grow, and moves to another partial when a fetch
        is taken over, which the core is then told.
        """
        w = self.w
        core = self.core
        found = await w.fetches.outcome(key)
        if isinstance(found, Failed):
            if core.following == serial:
                now = time.monotonic()
                self._apply(core.fetch_failed(serial, found.status, found.message, now))
            return
        if isinstance(found, Complete):
            obj = found.obj
            self._apply(core.opened(obj.fd, obj.size, obj.mtime_ns, time.monotonic()))
            return
        follower = Follower(w.fetches, key, found)
        try:
            length = follower.meta.length
            fd = follower.fd
            self._apply(
                core.fetch_ready(serial, os.dup(fd), length, follower.meta.mtime, time.monotonic())
            )
            pos = 0
            while core.following == serial and (length < 0 or pos < length):
                try:
                    pos = await follower.available(pos)
                except FetchError as exc:
                    if core.following == serial:
                        now = time.monotonic()
                        self._apply(core.fetch_failed(serial, exc.status, str(exc), now))
                    return
                if core.following != serial:
                    return
                if follower.fd != fd:  # taken over: the same object, arriving elsewhere
                    fd = follower.fd
                    self._apply(core.fetch_moved(serial, os.dup(fd), time.monotonic()))
                if length < 0 and follower.meta.length >= 0:  # a growing object completed
                    length = follower.meta.length
                    self._apply(core.fetch_whole(serial, os.dup(fd), length, time.monotonic()))
                else:
                    self._apply(core.fetch_progress(serial, pos, time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            w.warn("follow", f"following {key} failed: {exc!r}")
            if core.following == serial:
                self._notify(core.failed)
        finally:
            follower.close()

    # -- bodies -----------------------------------------------------------------------------

    def _send_file(self, action: SendFile) -> None:
        transport = self.transport
        assert transport is not None
        head, fd, offset, count = action.head, action.fd, action.offset, action.count
        if self.sock_fd < 0 or transport.get_write_buffer_size():
            if head:
                transport.write(head)
            self.sender = self._spawn(self._send_rest(fd, offset, count, via_loop=True))
            return
        # Corked, as nginx's tcp_nopush: the head leaves with the body's first bytes, and the
        # body leaves in full frames pushed from this call. Uncorked, the head went alone and
        # most of the body went later, transmitted on the client's ACKs in the client's own
        # time slice: on one machine that moved the kernel's work to wrk and cost 30 % of the
        # throughput against nginx (docs/benchmarks.md).
        tsock = self.tsock
        assert tsock is not None
        if head:
            tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            transport.write(head)
        sent = 0
        if transport.get_write_buffer_size() == 0:
            sent = self._sendfile_now(fd, offset, count)
        if head:
            tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        if sent < 0:
            self._apply(self.core.send_failed(time.monotonic()))
        elif sent == count:
            self._apply(self.core.sent(time.monotonic()))
        else:
            self.sender = self._spawn(
                self._send_rest(fd, offset + sent, count - sent, via_loop=False)
            )

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

    async def _send_rest(self, fd: int, offset: int, count: int, *, via_loop: bool) -> None:
        """What the socket did not take at once; the core's deadline stops a stalled client."""
        try:
            if via_loop:
                await self._sendfile_via_loop(fd, offset, count)
            else:
                await self._sendfile(fd, offset, count)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError) as exc:
            if exc.errno == errno.EBADF and self.transport and self.transport.is_closing():
                return  # aborted meanwhile
            self.sender = None
            self._apply(self.core.send_failed(time.monotonic()))
            return
        self.sender = None
        self._apply(self.core.sent(time.monotonic()))

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` on a plain socket, zero-copy.

        A loop of ``os.sendfile`` on our own duplicate of the socket (so a descriptor number
        the transport closed and the kernel reused can never be written to), waiting for
        writability when the socket is full. It is asyncio's ``loop.sendfile`` without its
        per-call setup, which measured as the largest cost on 2 MB segments.
        """
        if self.wfd < 0:
            self.wfd = os.dup(self.sock_fd)
        while count > 0:
            try:
                n = os.sendfile(self.wfd, fd, offset, count)
            except BlockingIOError:
                await self._writable()
                continue
            if n == 0:
                raise ConnectionAbortedError("the file ended before its length")
            offset += n
            count -= n
            self.core.send_progress(time.monotonic())

    async def _writable(self) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.loop.add_writer(self.wfd, ready)
        try:
            await waiter
        finally:
            if self.wfd >= 0:
                self.loop.remove_writer(self.wfd)

    async def _sendfile_via_loop(self, fd: int, offset: int, count: int) -> None:
        """TLS, or a response queued behind buffered bytes: asyncio's own sendfile."""
        transport = self.transport
        assert transport is not None
        # closefd=False: the core owns fd. Over TLS loop.sendfile reads through memory.
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while count > 0:
                chunk = min(count, _SEND_CHUNK)
                await self.loop.sendfile(transport, f, offset, chunk)
                offset += chunk
                count -= chunk
                self.core.send_progress(time.monotonic())

    def _release_wfd(self) -> None:
        if self.wfd >= 0:
            self.loop.remove_writer(self.wfd)
            os.close(self.wfd)
            self.wfd = -1


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


def check_port(host: str, port: int) -> None:
    """Raise OSError when the workers could not bind ``host:port`` (another program holds it).

    The socket is bound as the workers' are but never listens: only a listening socket joins
    the port's SO_REUSEPORT group, so no connection (to an edge already serving on the port,
    or to this one's first worker) can be handed to it and reset when it closes.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))


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

    def draining() -> None:
        # The supervisor's drain notice: /healthz says so and answers close their
        # connections, while this worker still accepts until it is told to stop.
        worker.state.draining = True

    loop.add_signal_handler(signal.SIGUSR1, draining)

    # The supervisor's pid comes from the supervisor itself: read here with os.getppid(), it
    # would already be init's if the supervisor died while this worker was starting (a
    # second of imports), and the worker would then serve on, orphaned, for ever.
    async def ticker() -> None:
        n = 0
        while True:
            if os.getppid() != supervisor:  # the supervisor died: do not serve on, orphaned
                stop.set()
            try:
                worker.sweep(time.monotonic())
                if n % 4 == 0:
                    worker.tick()
            except Exception as exc:  # a bug; the ticker must live on to see the supervisor go
                print(f"edge worker {index}: tick failed: {exc!r}", file=sys.stderr)
            n += 1
            await asyncio.sleep(0.25)

    tick_task = loop.create_task(ticker())
    await stop.wait()
    # Drain: stop accepting; each core closes its connection when idle and aborts it at
    # drain_timeout_s (the ticker goes on sweeping their deadlines).
    worker.state.draining = True
    server.close()
    for conn in list(worker.connections):
        conn.drain()
    deadline = time.monotonic() + config.drain_timeout_s + protocol.LINGER_S + 1
    while worker.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(worker.connections):
        conn.abort()
    tick_task.cancel()
    worker.tick()
    await origin.aclose()
