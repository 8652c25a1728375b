"""One edge connection as a state machine: bytes and the clock in, actions out.

Sans-I/O, in the manner of h11 and websockets' protocol: an :class:`EdgeProtocol` is told
what the shell observed (bytes received, the client's end of stream, the clock, a send that
finished, an object opened or missing, a fetch that progressed or failed) and answers each
notice with the :data:`Action` list the shell carries out (write bytes, send a file range,
open an object, follow a fetch, pause reading, shut down, close, abort). It does no I/O and
never reads a clock: every notice carries ``now``, seconds on a monotonic clock, and the
wall clock comes from :class:`WorkerState` (set by the shell). The asyncio shell is
``edge/server.py``; the tests drive this class with byte strings and a fake clock.

A connection is in one of these states; each has a deadline, the earliest of which is
:attr:`EdgeProtocol.deadline` (``math.inf``: none). The shell calls :meth:`EdgeProtocol.tick`
once it passed, as aioquic's shells call ``handle_timer`` at ``get_timer()``.

========== ============================================ =========================================
state      what it waits for                            deadline, and what happens at it
========== ============================================ =========================================
IDLE       the first byte of a request (keep-alive)     ``idle_timeout_s``: closed quietly
HEAD       the rest of a request head                   ``header_timeout_s`` from its first byte:
                                                        408 and close (slowloris)
BODY       the body the head announced                  ``body_timeout_s`` from the end of the
                                                        head: 408 and close
RESPONDING the origin (a miss)                          ``stall_timeout_s`` without progress:
                                                        504, or abort once the head went out
           the client to take bytes                     ``send_timeout_s`` without progress:
                                                        abort
CLOSING    our side is shut; what comes is discarded    ``LINGER_S``, then closed (a lingering
                                                        close, so the client reads our answer
                                                        rather than a reset)
CLOSED     nothing
========== ============================================ =========================================

Draining caps every state at ``drain_timeout_s``, then aborts. Requests are answered one at a
time in the order they came (pipelining); reading pauses while more than ``MAX_PIPELINED``
wait. A request that cannot be parsed is answered after those before it, and closes the
connection: the byte stream is lost from there on.

Contract with the shell: an action that needs a notice back (:class:`Open`, :class:`SendFile`,
:class:`ReadText`, :class:`Fetch`, :class:`Operate`) is the last of its list, and the core
emits nothing more for that response until the notice comes. The core owns every file
descriptor it is handed and gives each back with exactly one :class:`CloseFile`.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections import deque
from collections.abc import Mapping
from typing import Final, NamedTuple

import httptools
import msgspec

from streamplane.config import EdgeSettings
from streamplane.edge import forwarded, http, live, propagation, tokens
from streamplane.edge.metrics import WorkerMetrics

__all__ = [
    "LINGER_S",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PIPELINED",
    "Abort",
    "Action",
    "Close",
    "CloseFile",
    "EdgeProtocol",
    "Fetch",
    "Open",
    "Operate",
    "PauseReading",
    "ReadText",
    "Request",
    "ResumeReading",
    "SendFile",
    "Shutdown",
    "State",
    "WorkerState",
    "Write",
]

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 1 << 20
MAX_PIPELINED: Final = 32
# After answering a request we cannot continue (or Connection: close), keep reading and
# discarding for this long before closing: closing with unread bytes makes the kernel send a
# RST, and the client may lose our answer with it (nginx's lingering_close).
LINGER_S: Final = 2.0
# Text that players parse goes through memory (a few KB, answered in one write);
# media bytes always go by sendfile, however small.
_MEDIA_SUFFIXES: Final = (".m4s", ".mp4", ".m4a", ".ts")
_SMALL_TEXT: Final = 64 * 1024
_GRANT_CACHE: Final = 16384
_HOT_OBJECTS: Final = 1024
_HOT_TTL_S: Final = 0.5  # a live playlist is at most this stale
# A blocking reload's object (the playlist as of a part) never changes: held as long as its
# viewers go on asking. Every viewer of a surge asks for it, and when their requests spread
# over seconds (a slow or crowded client) each one after half a second went through the disk
# again, which doubled the edge's CPU per request (bench/live.py at load 20).
_HOT_RELOAD_TTL_S: Final = 30.0
_HEADER_BLOCKS: Final = 4096
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
        b"content-length",
        b"host",  # the manifests it rewrites hand the token to URIs naming this host
    }
)
_GET_HEAD: Final = (b"GET", b"HEAD")
_OPERATIONS: Final = frozenset({"/healthz", "/metrics", "/fill"})
_PREFLIGHT: Final = (
    (b"Access-Control-Allow-Methods", b"GET, HEAD, OPTIONS"),
    (b"Access-Control-Allow-Headers", b"Range, If-None-Match, If-Modified-Since"),
    (b"Access-Control-Max-Age", b"86400"),
)
_JSON: Final = b"application/json"
_UNKNOWN_END: Final = 1 << 62  # a growing object's end, until it is whole
_ALLOW: Final = ((b"Allow", b"GET, HEAD, OPTIONS"),)


# -- actions: what the shell carries out --------------------------------------------------


class Write(msgspec.Struct, frozen=True, gc=False):
    """Send these bytes after everything sent before (a head, or a head and a small body)."""

    data: bytes


class SendFile(msgspec.Struct, frozen=True, gc=False):
    """Send ``head``, then ``count`` bytes of ``fd`` from ``offset``, zero-copy where it can.

    Notice back: :meth:`EdgeProtocol.sent` once all went, :meth:`EdgeProtocol.send_progress`
    whenever some went after a wait, :meth:`EdgeProtocol.send_failed` if the client is gone.
    """

    fd: int
    offset: int
    count: int
    head: bytes = b""


class ReadText(msgspec.Struct, frozen=True, gc=False):
    """Read ``count`` bytes of ``fd`` from ``offset``.

    Notice back: :meth:`EdgeProtocol.text_read`.
    """

    fd: int
    offset: int
    count: int


class Open(msgspec.Struct, frozen=True, gc=False):
    """Open the complete object ``key`` in the cache.

    Notice back: :meth:`EdgeProtocol.opened`, or :meth:`EdgeProtocol.missing` with the status
    of a recent origin error on it, if any.
    """

    key: str


class Fetch(msgspec.Struct, frozen=True, gc=False):
    """Start or join the origin fetch of ``key`` and report on it under ``serial``.

    Notices back, while :attr:`EdgeProtocol.following` is ``serial``: :meth:`~EdgeProtocol.opened`
    (it completed), :meth:`~EdgeProtocol.fetch_ready` (the origin gave the length),
    :meth:`~EdgeProtocol.fetch_progress`, :meth:`~EdgeProtocol.fetch_failed`.
    """

    key: str
    serial: int


class Operate(msgspec.Struct, frozen=True):
    """Answer an operations endpoint (``/metrics``, ``/fill``).

    Notice back: :meth:`EdgeProtocol.reply`.
    """

    request: Request
    path: str


class CloseFile(msgspec.Struct, frozen=True, gc=False):
    """The core is done with ``fd``: close it."""

    fd: int


class PauseReading(msgspec.Struct, frozen=True, gc=False):
    """Stop reading the socket: enough requests wait."""


class ResumeReading(msgspec.Struct, frozen=True, gc=False):
    pass


class Shutdown(msgspec.Struct, frozen=True, gc=False):
    """Send FIN once what was written has gone (or close, where the transport cannot);
    keep reading: a lingering close."""


class Close(msgspec.Struct, frozen=True, gc=False):
    """Close the connection once what was written has gone."""


class Abort(msgspec.Struct, frozen=True, gc=False):
    """Drop the connection now (RST), stopping any send under way."""


Action = (
    Write
    | SendFile
    | ReadText
    | Open
    | Fetch
    | Operate
    | CloseFile
    | PauseReading
    | ResumeReading
    | Shutdown
    | Close
    | Abort
)

_PAUSE: Final = PauseReading()
_RESUME: Final = ResumeReading()
_SHUTDOWN: Final = Shutdown()
_CLOSE: Final = Close()
_ABORT: Final = Abort()


class State(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    RESPONDING = "responding"
    CLOSING = "closing"
    CLOSED = "closed"


# -- what a worker's connections share ------------------------------------------------------


class WorkerState:
    """What one worker's connections share: settings, keys, caches, counters, the access log.

    Plain data. The shell sets the clock-derived fields (:meth:`set_clock`) and drains
    ``log_lines`` and ``hits`` (advice to the eviction policy).
    """

    def __init__(self, config: EdgeSettings, keyring: Mapping[str, bytes], index: int = 0) -> None:
        self.config = config
        self.index = index
        self.metrics = WorkerMetrics()
        self.grants = tokens.GrantCache(keyring, _GRANT_CACHE)
        self.proxies = config.proxy_networks()
        self.verified: dict[tuple[bytes, str], _Granted] = {}  # by request target and client
        # Playlists and manifests held in memory for _HOT_TTL_S, as nginx's open_file_cache
        # holds descriptors: a player polls them, and each poll would otherwise cost five
        # syscalls.
        # Keyed by the object's key, or (key, carry) for a manifest rewritten for a token.
        self.hot: dict[str | tuple[str, propagation.Carry], _Hot] = {}
        # (key, mtime_ns, size) -> the whole object's answer and its header block
        self.blocks: dict[tuple[str, int, int], tuple[http.ObjectAnswer, bytes]] = {}
        self.draining = False
        self.date = b""
        self.wall_offset = 0.0  # wall clock minus the monotonic clock
        self.log_lines: list[bytes] = []
        # Hits per key, in the order of each key's last request (what LRU needs).
        self.hits: dict[str, int] = {}

    def set_clock(self, monotonic: float, wall: float) -> None:
        self.wall_offset = wall - monotonic
        self.date = http.http_date(wall)

    def hit(self, key: str) -> None:
        hits = self.hits
        hits[key] = hits.pop(key, 0) + 1


class _Hot:
    """A small object held in memory, with the whole answers it was last given."""

    __slots__ = ("answers", "block", "body", "until")

    def __init__(self, until: float, block: bytes, body: bytes) -> None:
        self.until = until
        self.block = block  # its header block
        self.body = body
        # (Date, keep-alive, Origin) -> head and body: a poll writes them without building
        # a head or copying the body again within the same second.
        self.answers: dict[tuple[bytes, bool, bytes | None], bytes] = {}


def _with_etag(headers: list[tuple[bytes, bytes]], etag: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name, etag if name == b"ETag" else value) for name, value in headers)


class _Granted(NamedTuple):
    """A request target a client was granted: what the next request for it can skip."""

    path: str
    grant: tokens.Grant
    carry: propagation.Carry | None  # what a manifest answered to it hands on, for ``host``
    host: bytes | None


# -- requests -------------------------------------------------------------------------------


class Request:
    """One request as parsed: what the edge needs of it, nothing more."""

    __slots__ = (
        "body",
        "head_done",
        "header_bytes",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "started",
        "url",
    )

    def __init__(self, started: float) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body: bytes | bytearray = b""  # most requests have none; see on_body
        self.method = b""
        self.keep_alive = True
        self.http11 = True  # chunked bodies can be sent to it
        self.started = started
        self.head_done: float | None = None  # the body's deadline counts from then


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# What a response waits for.
_OPEN, _OPERATE, _TEXT, _SEND, _FETCH = range(5)


class _Response:
    """The response under way: to the oldest request not yet answered."""

    __slots__ = (
        "answer",
        "available",
        "carry",
        "deadline",
        "end",
        "etag",
        "fd",
        "growing",
        "head",
        "head_sent",
        "key",
        "moved",
        "mtime_ns",
        "path",
        "phase",
        "pos",
        "progress_at",
        "req",
        "sending",
        "serial",
        "start",
        "text",
    )

    def __init__(self, req: Request, path: str, key: str, phase: int, deadline: float) -> None:
        self.req = req
        self.path = path
        self.key = key
        self.phase = phase
        self.deadline = deadline
        self.fd = -1
        self.answer: http.ObjectAnswer | None = None
        self.head = b""  # the response head, made before the body (except for text)
        self.head_sent = False
        self.serial = 0  # nonzero: follows the fetch of that serial
        self.start = self.pos = self.end = 0  # the bytes of the file to send
        self.available = 0  # bytes of an arriving object on disk, as last reported
        self.sending = 0  # bytes of the SendFile under way
        self.progress_at = 0.0  # the origin's last progress
        self.text = False  # a small text body: read whole, answered in one write
        self.carry: propagation.Carry | None = None  # the token a manifest hands on
        self.etag = b""  # a text body's validator, decided before it is read
        self.mtime_ns = 0
        self.moved = -1  # a taken-over fetch's descriptor, used once the send under way ends
        self.growing = False  # sent chunked as it lands: its end is known once it is whole


# -- the connection ---------------------------------------------------------------------------


class EdgeProtocol:
    """The state of one client connection; see the module docstring."""

    def __init__(self, worker: WorkerState, client_ip: str, now: float) -> None:
        self.w = worker
        self.client_ip = client_ip
        self.deadline = now + worker.config.idle_timeout_s
        self._parser = httptools.HttpRequestParser(self)
        self._now = now
        self._out: list[Action] = []
        self._current: Request | None = None  # being received
        self._queue: deque[Request] = deque()  # received, not yet answered
        self._response: _Response | None = None
        # A request that could not be parsed: answered once the queue is, then we close.
        self._refusal: tuple[int, str, Request | None] | None = None
        self._deaf = False  # what the client sends from now on is discarded
        self._reading_paused = False
        self._write_blocked_at: float | None = None  # the transport's buffer is full since
        self._eof = False
        self._closing_at: float | None = None  # our side shut since then (CLOSING)
        self._close_sent = False
        self._closed = False
        self._drain_by: float | None = None
        self._idle_since = now
        self._serial = 0
        self._received = 0  # requests parsed whole

    # -- what the shell reads -------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._closed:
            return State.CLOSED
        if self._closing_at is not None:
            return State.CLOSING
        if self._response is not None or self._queue:
            return State.RESPONDING
        if self._current is not None:
            return State.HEAD if self._current.head_done is None else State.BODY
        return State.IDLE

    @property
    def following(self) -> int:
        """The serial of the fetch the response under way follows (0: none)."""
        resp = self._response
        return resp.serial if resp is not None and not self._closed else 0

    # -- notices from the shell -------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, now: float) -> list[Action]:
        self._now = now
        if self._deaf:
            return self._take()  # discarded: a lingering close, or the stream is lost
        queued, fresh = self._received, self._current is None
        try:
            self._feed(data)
        except _Reject as exc:
            self._refuse(exc.status, str(exc))
        except httptools.HttpParserInvalidMethodError:
            # Where the failing request starts is known only if it starts this chunk.
            if queued == self._received and fresh and _METHOD_LIKE.match(data):
                self._refuse(501, "unknown method")
            else:
                self._refuse(400, "malformed request line")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own refusals carry their status
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.status, str(cause))
            elif "Invalid HTTP version" in str(exc):
                self._refuse(505, "only HTTP/1.0 and HTTP/1.1 are served here")
            elif "Content-Length overflow" in str(exc):
                self._refuse(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
            else:
                self._refuse(400, f"malformed request: {exc}")
        self._advance()
        return self._take()

    def eof(self, now: float) -> list[Action]:
        """The client finished sending: answer what is queued, then close."""
        self._now = now
        self._eof = True
        if self._closing_at is not None and not self._closed and not self._close_sent:
            self._close_sent = True
            self._emit(_CLOSE)
        self._advance()
        return self._take()

    def tick(self, now: float) -> list[Action]:
        """The clock: act on a deadline that passed."""
        self._now = now
        if now < self.deadline or self._closed:
            return self._take()
        resp = self._response
        if self._closing_at is not None or (self._drain_by is not None and now >= self._drain_by):
            self._abort()
        elif resp is not None:
            if resp.phase == _FETCH and not resp.head_sent:
                self._release(resp)
                self._error(resp.req, 504, "the origin did not answer in time")
            else:  # a client that takes nothing, or an origin stalled mid-body
                self._abort()
        elif self._write_blocked_at is not None:
            self._abort()
        elif self._current is not None:
            what = "headers" if self._current.head_done is None else "body"
            self._refuse(408, f"the request {what} took too long")
        else:
            self._shutdown()  # idle keep-alive
        self._advance()
        return self._take()

    def drain(self, now: float) -> list[Action]:
        """The worker stops: close when idle, give the rest ``drain_timeout_s``."""
        self._now = now
        self._drain_by = now + self.w.config.drain_timeout_s
        if self.state is State.IDLE:
            self._shutdown()
        self._rearm()
        return self._take()

    def connection_lost(self, now: float) -> list[Action]:
        self._now = now
        if not self._closed:
            self._closed = self._deaf = True
            if self._closing_at is None:
                self._closing_at = now
            if self._response is not None:
                self._release(self._response)
                self._response = None
            self._queue.clear()
        self.deadline = math.inf
        return self._take()

    def writing_paused(self, now: float) -> list[Action]:
        """The transport's buffer is full: answer nothing more until it drains."""
        self._now = now
        if self._write_blocked_at is None:
            self._write_blocked_at = now
        self._rearm()
        return self._take()

    def writing_resumed(self, now: float) -> list[Action]:
        self._now = now
        self._write_blocked_at = None
        self._advance()
        return self._take()

    def failed(self, now: float) -> list[Action]:
        """Carrying out an action raised (a bug, or an error nobody expected).

        The response under way becomes a 500 if nothing of it was sent, and the connection
        serves on; otherwise the client cannot be told, and the connection is aborted.
        """
        self._now = now
        resp = self._response
        if resp is not None and not resp.head_sent and not self._closed:
            self._release(resp)
            self._error(resp.req, 500, "the edge failed on this request")
        else:
            self._abort()
        self._advance()
        return self._take()

    # -- answers to the core's actions -------------------------------------------------------

    def opened(self, fd: int, size: int, mtime_ns: int, now: float) -> list[Action]:
        """The complete object asked for (by :class:`Open`, or a fetch that completed)."""
        self._now = now
        resp = self._response
        if resp is None or resp.fd >= 0 or resp.phase not in (_OPEN, _FETCH) or self._closed:
            self._emit(CloseFile(fd))
            return self._take()
        if resp.phase == _OPEN:
            self.w.metrics.s.hits += 1
            self.w.hit(resp.key)
        resp.serial = 0
        self._send_object(resp, fd, size, mtime_ns)
        self._advance()
        return self._take()

    def missing(self, failed: tuple[int, str] | None, now: float) -> list[Action]:
        """The cache does not hold the object; ``failed``: the status and words of a recent
        origin failure on it, if any."""
        self._now = now
        resp = self._response
        if resp is None or resp.phase != _OPEN or self._closed:
            return self._take()
        if failed is not None:
            self._error(resp.req, failed[0], failed[1])
        else:
            self.w.metrics.s.misses += 1
            self._serial += 1
            resp.serial = self._serial
            resp.phase = _FETCH
            resp.progress_at = now
            resp.deadline = now + self.w.config.stall_timeout_s
            self._emit(Fetch(resp.key, resp.serial))
        self._advance()
        return self._take()

    def fetch_ready(
        self, serial: int, fd: int, length: int, mtime: float, now: float
    ) -> list[Action]:
        """The origin answered: the object will have ``length`` bytes, arriving in ``fd``
        (``length`` < 0: the origin sends it as it is being written, length unknown)."""
        self._now = now
        resp = self._response
        if resp is None or resp.serial != serial or resp.fd >= 0 or self._closed:
            self._emit(CloseFile(fd))
            return self._take()
        resp.progress_at = now
        if length < 0:
            self._answer_growing(resp, fd, int(mtime) * 1_000_000_000)
            self._advance()
            return self._take()
        # whole seconds, as the committed file's mtime will give: the same validators
        if self._answer_object(resp, fd, length, int(mtime) * 1_000_000_000):
            resp.phase = _FETCH
            resp.deadline = now + self.w.config.stall_timeout_s
            if not resp.text:  # the head goes now, the body as it arrives
                resp.head_sent = True
                self._emit(Write(resp.head))
        self._advance()
        return self._take()

    def fetch_progress(self, serial: int, size: int, now: float) -> list[Action]:
        """The arriving object has ``size`` bytes on disk."""
        self._now = now
        resp = self._response
        if resp is None or resp.serial != serial or resp.fd < 0 or self._closed:
            return self._take()
        if size > resp.available:
            resp.available = size
            resp.progress_at = now
        if resp.phase == _FETCH:
            self._pump(resp)
        self._rearm()
        return self._take()

    def fetch_whole(self, serial: int, fd: int, size: int, now: float) -> list[Action]:
        """The growing object followed is complete with ``size`` bytes, readable in ``fd``."""
        self._now = now
        resp = self._response
        if resp is None or resp.serial != serial or self._closed:
            self._emit(CloseFile(fd))
            return self._take()
        resp.progress_at = now
        if resp.growing:
            self._emit(CloseFile(fd))
            resp.available = resp.end = size
            if resp.phase == _FETCH:
                self._pump(resp)
        elif resp.fd < 0 and resp.phase == _FETCH:  # it waited for the whole object
            resp.serial = 0
            self._send_object(resp, fd, size, resp.mtime_ns)
        else:
            self._emit(CloseFile(fd))
        self._advance()
        return self._take()

    def fetch_failed(self, serial: int, status: int, message: str, now: float) -> list[Action]:
        """The rest of the object will not come: ``status`` and why."""
        self._now = now
        resp = self._response
        if resp is None or resp.serial != serial or self._closed:
            return self._take()
        if resp.head_sent:  # mid-body: the client sees a short body and retries
            self._abort()
        else:
            self._release(resp)
            self._error(resp.req, status, message)
        self._advance()
        return self._take()

    def fetch_moved(self, serial: int, fd: int, now: float) -> list[Action]:
        """The fetch was taken over (its fetcher died): the same object, the same bytes, goes
        on arriving in ``fd``. Used from the next send on; a send under way ends on the old."""
        self._now = now
        resp = self._response
        if resp is None or resp.serial != serial or resp.fd < 0 or self._closed:
            self._emit(CloseFile(fd))
            return self._take()
        if resp.phase == _SEND:
            if resp.moved >= 0:
                self._emit(CloseFile(resp.moved))
            resp.moved = fd
        else:
            self._emit(CloseFile(resp.fd))
            resp.fd = fd
        return self._take()

    def sent(self, now: float) -> list[Action]:
        """The :class:`SendFile` under way has gone out whole."""
        self._now = now
        resp = self._response
        if resp is None or resp.phase != _SEND or self._closed:
            return self._take()
        resp.pos += resp.sending
        resp.sending = 0
        if resp.moved >= 0:
            self._emit(CloseFile(resp.fd))
            resp.fd, resp.moved = resp.moved, -1
        if resp.pos >= resp.end:
            self._finish_body(resp)
        else:  # an arriving object: send what came meanwhile, or wait for more
            resp.progress_at = max(resp.progress_at, now)
            self._pump(resp)
        self._advance()
        return self._take()

    def send_progress(self, now: float) -> None:
        """Some bytes of the :class:`SendFile` under way went after a wait."""
        resp = self._response
        if resp is not None and resp.phase == _SEND:
            resp.deadline = now + self.w.config.send_timeout_s
            self._rearm()

    def send_failed(self, now: float) -> list[Action]:
        """The client is gone, or reset the connection mid-send."""
        self._now = now
        self._abort()
        return self._take()

    def text_read(self, body: bytes, now: float) -> list[Action]:
        """The bytes :class:`ReadText` asked for."""
        self._now = now
        resp = self._response
        if resp is None or resp.phase != _TEXT or self._closed:
            return self._take()
        self._release(resp)
        self._text_response(resp, body)
        self._advance()
        return self._take()

    def reply(
        self,
        status: int,
        body: bytes,
        now: float,
        *,
        content_type: bytes = _JSON,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> list[Action]:
        """The shell's answer to :class:`Operate`."""
        self._now = now
        resp = self._response
        if resp is None or resp.phase != _OPERATE or self._closed:
            return self._take()
        self._simple(resp.req, status, body, content_type=content_type, extra=extra)
        self._advance()
        return self._take()

    # -- parsing (httptools callbacks) ------------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        while True:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # The upgrade request itself was complete and is queued. RFC 9110 section
                # 7.8 lets a server ignore Upgrade and go on with HTTP/1.1, as nginx does:
                # the request is answered as any other (a player sending "Upgrade: h2c" gets
                # its segment), and what follows is parsed as the next request. CONNECT asks
                # for a tunnel: it is refused (its target is no path: 400, and a path would be
                # 405) and what follows it is not read as HTTP.
                upgraded = self._queue[-1] if self._queue else None
                if upgraded is not None and upgraded.method == b"CONNECT":
                    upgraded.keep_alive = False
                    self._deaf = True
                    return
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                self._parser = httptools.HttpRequestParser(self)
                data = data[offset:]
                if not data:
                    return

    def on_message_begin(self) -> None:
        self._current = Request(self._now)

    def on_url(self, url: bytes) -> None:
        req = self._current
        assert req is not None
        req.url += url
        if len(req.url) > http.MAX_PATH_BYTES:
            raise _Reject(414, "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._current
        assert req is not None
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > MAX_HEADER_BYTES:
            raise _Reject(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
        if req.head_done is not None:
            # a trailer (after a chunked body): not believed, or a client could add a token, a
            # range or a forwarded-for address the proxy in front of it never saw in the head
            return
        lower = name.lower()
        if lower in _NEEDED_HEADERS:
            if lower in req.headers and lower != b"cookie":
                if lower == b"range":
                    raise _Reject(400, "more than one Range header")
                if lower == b"x-forwarded-for":  # one list, as its lines were sent
                    req.headers[lower] += b", " + value
            else:
                req.headers[lower] = value

    def on_headers_complete(self) -> None:
        req = self._current
        assert req is not None
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            if version == "0.9":  # what llhttp makes of a request line without a version
                raise _Reject(400, "the request line has no HTTP version")
            raise _Reject(505, f"HTTP/{version} is not served here: use HTTP/1.1")
        req.method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        req.http11 = version == "1.1"
        length = req.headers.get(b"content-length")
        # llhttp has checked it is digits, and the only one
        if length is not None and int(length) > MAX_BODY_BYTES:
            raise _Reject(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        req.head_done = self._now

    def on_body(self, body: bytes) -> None:
        req = self._current
        assert req is not None
        if len(req.body) + len(body) > MAX_BODY_BYTES:
            raise _Reject(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        if type(req.body) is bytes:
            req.body = bytearray(body)  # amortised appends: a body may come a byte at a time
        else:
            req.body += body

    def on_message_complete(self) -> None:
        req = self._current
        assert req is not None
        self._current = None
        self._queue.append(req)
        self._received += 1

    # -- the order of things -----------------------------------------------------------------

    def _advance(self) -> None:
        """Answer what waits, in order, as far as it can go now; then set the deadline."""
        queue = self._queue
        # Before answering, so that an action waiting for a notice stays the last one.
        if self._reading_paused or len(queue) > MAX_PIPELINED:
            self._flow()
        # _closing_at is set once the connection closes or closed (see _abort)
        while self._response is None and self._closing_at is None:
            if self._write_blocked_at is not None:
                break
            if queue:
                self._answer(queue.popleft())
            elif self._refusal is not None or self._eof:
                self._end_of_stream()
                break
            else:
                break
        self._rearm()

    def _flow(self) -> None:
        """Pause reading while too many requests wait; resume at half, or to linger."""
        if self._closing_at is not None:
            if self._reading_paused and not self._closed:
                self._reading_paused = False  # discard what still comes while lingering
                self._emit(_RESUME)
        elif not self._reading_paused:
            self._reading_paused = True
            self._emit(_PAUSE)
        elif len(self._queue) <= MAX_PIPELINED // 2:
            self._reading_paused = False
            self._emit(_RESUME)

    def _end_of_stream(self) -> None:
        """Every request before it answered: the refusal of an unparsable one, or the close."""
        if self._refusal is not None:
            status, message, partial = self._refusal
            req = partial or Request(self._now)
            req.keep_alive = False
            if req.method not in _GET_HEAD:
                req.method = b"GET"
            self._error(req, status, message)  # and then _done shuts down
        else:
            self._closing_at = self._now
            self._deaf = True
            self._close_sent = True
            self._emit(_CLOSE)
        if self._reading_paused:
            self._flow()

    def _rearm(self) -> None:
        c = self.w.config
        if self._closed:
            self.deadline = math.inf
            return
        if self._closing_at is not None:
            deadline = self._closing_at + LINGER_S
        elif self._response is not None:
            deadline = self._response.deadline
        elif self._write_blocked_at is not None:
            deadline = self._write_blocked_at + c.send_timeout_s
        elif (req := self._current) is not None:
            if req.head_done is None:
                deadline = req.started + c.header_timeout_s
            else:
                deadline = req.head_done + c.body_timeout_s
        else:
            deadline = self._idle_since + c.idle_timeout_s
        if self._drain_by is not None and self._drain_by < deadline:
            deadline = self._drain_by
        self.deadline = deadline

    def _take(self) -> list[Action]:
        out = self._out
        self._out = []
        return out

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _shutdown(self) -> None:
        if self._closing_at is None and not self._closed:
            self._closing_at = self._now
            self._deaf = True
            if self._eof:
                self._close_sent = True
                self._emit(_CLOSE)
            else:
                self._emit(_SHUTDOWN)

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = self._deaf = True
        if self._closing_at is None:
            self._closing_at = self._now
        self._emit(_ABORT)  # first: the shell stops any send before its file is closed
        if self._response is not None:
            self._release(self._response)
            self._response = None
        self._queue.clear()
        self.deadline = math.inf

    def _refuse(self, status: int, message: str) -> None:
        if self._refusal is None:
            self._refusal = (status, message, self._current)
        self._current = None
        self._deaf = True

    def _release(self, resp: _Response) -> None:
        if resp.fd >= 0:
            self._emit(CloseFile(resp.fd))
            resp.fd = -1
        if resp.moved >= 0:
            self._emit(CloseFile(resp.moved))
            resp.moved = -1

    # -- answering ------------------------------------------------------------------------

    def _answer(self, req: Request) -> None:
        """Start answering ``req``: at once, or by setting the response under way."""
        w = self.w
        method = req.method
        if method == b"OPTIONS":
            self._simple(req, 204, b"", extra=_PREFLIGHT)
            return
        client = self.client_ip
        if w.proxies:
            client = self._forwarded_for(req) or client
        epoch = int(self._now + w.wall_offset)
        # A player polls its playlist with one URL and one token: a request target this
        # client was granted before skips parsing and the ACL match, keeping only the clock.
        seen = w.verified.get((req.url, client))
        if seen is not None and (method == b"GET" or method == b"HEAD") and seen.grant.live(epoch):
            path = seen.path
            host = req.headers.get(b"host")
            carry = seen.carry if host == seen.host else self._carry(req, path)
        else:
            try:
                path, query = http.request_path(req.url)
            except http.BadPath as exc:
                self._error(req, 400, str(exc))
                return
            if path in _OPERATIONS or path.startswith("/_edge/"):
                self._operate(req, path)
                return
            if method not in _GET_HEAD:
                self._error(req, 405, "only GET and HEAD", extra=_ALLOW)
                return
            grant = None
            if w.config.require_token:
                try:
                    grant = self._check_token(req, path, query, client, epoch)
                except tokens.TokenError as exc:
                    w.metrics.s.token_rejections += 1
                    self._error(req, exc.http_status, str(exc))
                    return
            if not path[1:] or "/." in path:  # the path is normalised: a segment starting "."
                self._error(req, 404, "no such object")
                return
            carry = self._carry(req, path)
            if grant is not None:
                verified = w.verified
                if len(verified) >= _GRANT_CACHE:
                    verified.clear()
                verified[(req.url, client)] = _Granted(path, grant, carry, req.headers.get(b"host"))
        key = path[1:]
        if b"_HLS_" in req.url and key.endswith(".m3u8"):
            try:
                reload = live.reload_key(key, req.url.partition(b"?")[2].decode("latin-1"))
            except live.BadReload as exc:
                self._error(req, 400, str(exc))
                return
            if reload is not None:  # the playlist as of a part: an object of its own
                key = reload
        hot = w.hot.get(key if carry is None else (key, carry))
        h = req.headers
        if (
            hot is not None
            and hot.until > req.started
            and not (h and (b"range" in h or b"if-none-match" in h or b"if-modified-since" in h))
        ):
            w.metrics.s.hits += 1
            w.hit(key)
            if method == b"HEAD":
                self._emit(Write(self._head(req, 200, hot.block)))
                self._done(req, 200, 0)
                return
            answer_key = (w.date, req.keep_alive and not w.draining, h.get(b"origin"))
            answer = hot.answers.get(answer_key)
            if answer is None:
                answer = self._head(req, 200, hot.block) + hot.body
                if len(hot.answers) >= 8:
                    hot.answers.clear()
                hot.answers[answer_key] = answer
            self._emit(Write(answer))
            self._done(req, 200, len(hot.body))
            return
        resp = self._response = _Response(
            req, path, key, _OPEN, self._now + w.config.send_timeout_s
        )
        resp.carry = carry
        self._emit(Open(key))

    def _carry(self, req: Request, path: str) -> propagation.Carry | None:
        """The token a manifest served to this request hands on to the URIs inside it.

        Players resolve a manifest's relative URIs without the manifest's query, so a title
        signed in the query string would play no further than its master playlist (token
        propagation, see ``propagation``). Only a token that came in the query and was
        verified is carried; one from a cookie travels by itself.
        """
        config = self.w.config
        if not config.require_token or not propagation.rewrites(path):
            return None
        query = req.url.partition(b"?")[2]
        try:
            return propagation.carry_from_query(config.token_name, query, req.headers.get(b"host"))
        except tokens.TokenError:  # refused before this, by the token check
            return None

    def _check_token(
        self, req: Request, path: str, query: str, client: str, epoch: int
    ) -> tokens.Grant | None:
        """The grant of the request's token for ``path``; raises a :class:`tokens.TokenError`.

        Returns the grant only when the token came in the target's own query string, so
        that the target can be remembered as granted (``WorkerState.verified``); not when it
        leans on a cookie, which the target does not carry.
        """
        name = self.w.config.token_name
        token = tokens.token_from_request(query, None, name)
        in_query = token is not None
        if not in_query:
            cookie = req.headers.get(b"cookie")
            token = tokens.token_from_request(
                "", cookie.decode("latin-1") if cookie is not None else None, name
            )
        grant = self.w.grants.verify(token, path=path, now=epoch, client_ip=client)
        return grant if in_query else None

    def _forwarded_for(self, req: Request) -> str | None:
        """The client a trusted proxy forwards for: X-Forwarded-For walked from the right
        past the trusted hops. Its leftmost entries are whatever the client wrote."""
        value = req.headers.get(b"x-forwarded-for")
        chain = forwarded.x_forwarded_for_chain([value.decode("latin-1")]) if value else []
        return forwarded.client_address(self.client_ip, chain, self.w.proxies)

    def _operate(self, req: Request, path: str) -> None:
        if path == "/healthz":  # answered here: what it reports is this worker's state
            draining = self.w.draining
            body = b'{"status": "draining"}\n' if draining else b'{"status": "ok"}\n'
            self._simple(req, 503 if draining else 200, body, content_type=_JSON)
            return
        deadline = self._now + self.w.config.send_timeout_s
        self._response = _Response(req, path, "", _OPERATE, deadline)
        self._emit(Operate(req, path))

    def _send_object(self, resp: _Response, fd: int, size: int, mtime_ns: int) -> None:
        """A complete object, opened: answer from it."""
        if not self._answer_object(resp, fd, size, mtime_ns):
            return
        if resp.text:
            resp.phase = _TEXT
            self._emit(ReadText(fd, resp.start, resp.end - resp.start))
            return
        resp.phase = _SEND
        resp.sending = resp.end - resp.start
        resp.head_sent = True
        resp.deadline = self._now + self.w.config.send_timeout_s
        self._emit(SendFile(fd, resp.start, resp.sending, resp.head))

    def _answer_object(self, resp: _Response, fd: int, size: int, mtime_ns: int) -> bool:
        """Decide the answer about an object of ``size`` bytes in ``fd``.

        Answers at once (and gives ``fd`` back) what needs no body: 304, 416, HEAD, an empty
        range. Otherwise keeps ``fd`` and the bytes to send in ``resp`` and returns True.
        """
        req = resp.req
        h = req.headers
        if resp.carry is not None or (
            size <= _SMALL_TEXT and not resp.path.endswith(_MEDIA_SUFFIXES)
        ):
            return self._text_first(resp, fd, size, mtime_ns)
        if not h or not (b"range" in h or b"if-none-match" in h or b"if-modified-since" in h):
            # The whole object, as most requests want: its header block is made once per
            # version of the object, however many viewers ask for it.
            block_key = (resp.key, mtime_ns, size)
            cached = self.w.blocks.get(block_key)
            if cached is not None:
                resp.answer, block = cached
            else:
                resp.answer = answer = http.answer_object(
                    resp.path,
                    mtime_ns,
                    size,
                    range_header=None,
                    if_none_match=None,
                    if_modified_since=None,
                )
                block = http.header_block([*answer.headers, (b"Content-Length", b"%d" % size)])
                blocks = self.w.blocks
                if len(blocks) >= _HEADER_BLOCKS:
                    blocks.clear()
                blocks[block_key] = (answer, block)
            return self._body_from(resp, fd, block)
        try:
            answer = http.answer_object(
                resp.path,
                mtime_ns,
                size,
                range_header=h.get(b"range"),
                if_none_match=h.get(b"if-none-match"),
                if_modified_since=h.get(b"if-modified-since"),
            )
        except http.Unsatisfiable as exc:
            self._emit(CloseFile(fd))
            self._error(req, 416, str(exc), extra=((b"Content-Range", b"bytes */%d" % size),))
            return False
        if answer.status == 304:
            self._emit(CloseFile(fd))
            self._simple(req, 304, b"", extra=tuple(answer.headers))
            return False
        resp.answer = answer
        block = http.header_block([*answer.headers, (b"Content-Length", b"%d" % answer.count)])
        return self._body_from(resp, fd, block)

    def _text_first(self, resp: _Response, fd: int, size: int, mtime_ns: int) -> bool:
        """A small text body (or a manifest to rewrite, whatever its size) is read whole and
        answered by _text_response; only a 304 is decided before, from its validator."""
        etag = http.etag_for(mtime_ns, size)
        if resp.carry is not None:  # a manifest rewritten for a token is another representation
            etag = propagation.etag(etag, resp.carry)
        h = resp.req.headers
        if h and http.is_not_modified(
            etag, mtime_ns / 1e9, h.get(b"if-none-match"), h.get(b"if-modified-since")
        ):
            self._emit(CloseFile(fd))
            headers = http.object_headers(resp.path, mtime_ns, size)
            self._simple(resp.req, 304, b"", extra=_with_etag(headers, etag))
            return False
        resp.text = True
        resp.fd = fd
        resp.etag = etag
        resp.mtime_ns = mtime_ns
        resp.start = resp.pos = 0
        resp.end = size
        return True

    def _body_from(self, resp: _Response, fd: int, block: bytes) -> bool:
        answer = resp.answer
        assert answer is not None
        req = resp.req
        resp.fd = fd
        resp.start = resp.pos = answer.offset
        resp.end = answer.offset + answer.count
        head = self._head(req, answer.status, block)
        if req.method == b"HEAD" or answer.count == 0:
            self._release(resp)
            self._emit(Write(head))
            self._done(req, answer.status, 0)
            return False
        resp.head = head
        return True

    def _answer_growing(self, resp: _Response, fd: int, mtime_ns: int) -> None:
        """An object the origin sends as it is written (a low-latency DASH segment): a plain
        GET over HTTP/1.1 gets its bytes chunk by chunk as they land; any other request
        (HEAD, a range, a validator, HTTP/1.0) waits for it whole (see ``fetch_whole``)."""
        req = resp.req
        h = req.headers
        resp.mtime_ns = mtime_ns
        resp.phase = _FETCH
        resp.deadline = self._now + self.w.config.stall_timeout_s
        if (
            req.method != b"GET"
            or not req.http11
            or resp.carry is not None
            or not resp.path.endswith(_MEDIA_SUFFIXES)
            or (h and (b"range" in h or b"if-none-match" in h or b"if-modified-since" in h))
        ):
            self._emit(CloseFile(fd))
            return
        resp.fd = fd
        resp.growing = True
        resp.start = resp.pos = 0
        resp.end = _UNKNOWN_END
        resp.head_sent = True
        self._emit(Write(self._head(req, 200, http.growing_headers(resp.path, mtime_ns))))

    def _finish_body(self, resp: _Response) -> None:
        """The body went whole: the last chunk of a chunked one, then the response is done."""
        if resp.growing:
            self._emit(Write(b"\r\n0\r\n\r\n" if resp.pos > resp.start else b"0\r\n\r\n"))
        self._release(resp)
        self._done(resp.req, resp.answer.status if resp.answer else 200, resp.end - resp.start)

    def _pump(self, resp: _Response) -> None:
        """An arriving object: send what is on disk beyond what went, or wait for more."""
        available = min(resp.available, resp.end)
        if resp.growing:
            if available > resp.pos:
                count = available - resp.pos
                # each piece is one chunk; the line ending the one before goes in front
                frame = (b"\r\n%x\r\n" if resp.pos > resp.start else b"%x\r\n") % count
                resp.phase = _SEND
                resp.sending = count
                resp.deadline = self._now + self.w.config.send_timeout_s
                self._emit(SendFile(resp.fd, resp.pos, count, frame))
                return
            if resp.pos >= resp.end:
                self._finish_body(resp)
                return
        elif resp.text:
            if available >= resp.end:
                resp.phase = _TEXT
                self._emit(ReadText(resp.fd, resp.start, resp.end - resp.start))
                return
        elif available > resp.pos:
            resp.phase = _SEND
            resp.sending = available - resp.pos
            resp.head_sent = True
            resp.deadline = self._now + self.w.config.send_timeout_s
            self._emit(SendFile(resp.fd, resp.pos, resp.sending))
            return
        resp.phase = _FETCH
        resp.deadline = resp.progress_at + self.w.config.stall_timeout_s

    def _text_response(self, resp: _Response, body: bytes) -> None:
        """The one place a small text body (a playlist, a manifest) is answered from.

        The body is the whole file. A manifest asked for with a query token is rewritten here
        so that the URIs in it carry the token on (``propagation``); the range asked for, the
        length and the head are then the body's as it is sent.
        """
        req = resp.req
        carry = resp.carry
        if carry is not None:
            body = propagation.propagate(resp.path, body, carry)
        h = req.headers
        try:
            answer = http.answer_object(
                resp.path,
                resp.mtime_ns,
                len(body),
                range_header=h.get(b"range") if h else None,
                if_none_match=None,  # decided before the read (see _text_first)
                if_modified_since=None,
                etag=resp.etag,
            )
        except http.Unsatisfiable as exc:
            extra = ((b"Content-Range", b"bytes */%d" % len(body)),)
            self._error(req, 416, str(exc), extra=extra)
            return
        headers = [*answer.headers, (b"Content-Length", b"%d" % answer.count)]
        head = self._head(req, answer.status, headers)
        if req.method == b"HEAD":
            self._emit(Write(head))
            self._done(req, answer.status, 0)
            return
        if answer.status == 200:
            hot = self.w.hot
            if len(hot) >= _HOT_OBJECTS:
                hot.clear()
            hot_key = resp.key if carry is None else (resp.key, carry)
            ttl = _HOT_RELOAD_TTL_S if live.is_reload(resp.key) else _HOT_TTL_S
            hot[hot_key] = _Hot(req.started + ttl, http.header_block(headers), body)
        else:
            body = body[answer.offset : answer.offset + answer.count]
        self._emit(Write(head + body))
        self._done(req, answer.status, len(body))

    def _head(self, req: Request, status: int, headers: list[tuple[bytes, bytes]] | bytes) -> bytes:
        return http.response_head(
            status,
            headers,
            date=self.w.date,
            keep_alive=req.keep_alive and not self.w.draining,
            cors_origin=req.headers.get(b"origin") or b"*",
        )

    def _simple(
        self,
        req: Request,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        headers = list(extra)
        if status != 204 and status != 304:
            headers.append((b"Content-Type", content_type))
            headers.append((b"Content-Length", b"%d" % len(body)))
        head = self._head(req, status, headers)
        if req.method == b"HEAD" or status == 204 or status == 304:
            self._emit(Write(head))
            self._done(req, status, 0)
        else:
            self._emit(Write(head + body))
            self._done(req, status, len(body))

    def _error(
        self,
        req: Request,
        status: int,
        message: str,
        *,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self._simple(req, status, http.error_body(status, message), content_type=_JSON, extra=extra)

    def _done(self, req: Request, status: int, sent: int) -> None:
        """The response to ``req`` went whole: count it, log it, and go on or close."""
        w = self.w
        elapsed = self._now - req.started
        w.metrics.request(status, elapsed)
        w.metrics.s.bytes_sent += sent
        if w.config.access_log:
            entry = {
                "t": round(self._now + w.wall_offset, 3),
                "client": self.client_ip,
                "method": req.method.decode("latin-1"),
                "path": req.url[:256].decode("latin-1").partition("?")[0],
                "status": status,
                "bytes": sent,
                "ms": round(elapsed * 1000, 3),
                "worker": w.index,
            }
            w.log_lines.append(json.dumps(entry).encode() + b"\n")
        self._response = None
        self._idle_since = self._now
        if not req.keep_alive or w.draining:
            self._shutdown()
