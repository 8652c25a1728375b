"""The realtime gateway: the asyncio shell around the protocol core and a broker.

One process holds many WebSocket connections on `websockets`' sans-I/O protocol, driven by one
``asyncio.Protocol`` per connection: no task per connection, which keeps an idle connection at a
few kilobytes (``bench/ws_impl.py`` chose it over picows on memory per connection; see
``docs/benchmarks.md``). A publication is encoded once, framed once, and the same bytes are
written to every subscriber.

Per connection, in order: a handshake timer (a client that has not finished its upgrade in time
is dropped); admission (a token bucket on new connections and a connection limit, past which the
upgrade is answered 503 with Retry-After); the token, checked before the upgrade (401 forged or
expired); then frames. The transport's write buffer is the connection's send queue, bounded: a
client that lets it grow past ``send_queue_bytes`` is cut with SLOW and reconnects and recovers,
so it never slows the others.

Per channel, the process keeps one broker subscription and a cursor. A delivery that does not
follow the cursor (lost on the way, or a new epoch) makes the process recover the channel from
the broker's history, or send every subscriber a ``reset`` when that cannot be done exactly.
Each connection also has its own position per channel, so a connection joining with a last
position gets exactly what it missed, then the live stream, nothing twice. What a connection
missed is answered from the channel's tail (the newest publications this process delivered,
``history.RecentTail``) when the tail holds all of it, and from the broker's history otherwise:
in a reconnect storm the engine is asked only for the gaps no process can fill.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import resource
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from streamplane.realtime.admission import Admission, AdmissionWindow, admission_at
from streamplane.realtime.broker import (
    Broker,
    BrokerError,
    Position,
    PresenceEntry,
    PresenceShare,
    Publication,
    StateValue,
)
from streamplane.realtime.history import RecentTail
from streamplane.realtime.protocol import (
    DEFAULT_NAMESPACES,
    STATE,
    ClientFrame,
    Code,
    Connected,
    Count,
    CountThrottle,
    Cursor,
    Delete,
    DeleteNotice,
    ErrorReply,
    FrameError,
    Mute,
    MuteNotice,
    Mutes,
    Namespace,
    Ping,
    Pong,
    PresenceDiff,
    PresenceList,
    PresenceQuery,
    PresenceUser,
    PubFrame,
    Publish,
    Reply,
    Reset,
    ServerFrame,
    SetState,
    StateFrame,
    Subscribe,
    Subscribed,
    SubscribedChannel,
    TokenBucket,
    Unsubscribe,
    Verdict,
    decode_client_frame,
    disconnect_frame,
    encode,
    namespace_of,
    presence_counted,
    presence_update,
    pub_frame,
    required_right,
    state_frame,
)
from streamplane.realtime.tokens import RealtimeGrant, rights_on, verify_realtime_token

__all__ = ["Gateway", "GatewaySettings", "raise_open_file_limit"]

_log = logging.getLogger(__name__)

_STATUS_FOR: Final = {Code.UNAUTHORIZED: 401, Code.TOKEN_EXPIRED: 401}
_REJOIN_ATTEMPTS: Final = 12  # about 15 s of backoff


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    token_key: bytes
    max_connections: int = 18_000  # per process; the open-file limit here is 20,000
    admission_rate: float = 2_000.0  # new connections per second, per process
    admission_burst: int = 4_000
    # The most connections a planned raise may take this process to: what its open-file limit
    # lets it hold (past it, accept fails; a 503 with Retry-After is the better answer).
    # None: no ceiling but the plan's.
    connection_ceiling: int | None = None
    handshake_timeout: float = 5.0
    max_frame_bytes: int = 16_384
    send_queue_bytes: int = 256 * 1024
    max_channels: int = 64  # per connection
    recover_limit: int = 1_000  # the most publications one recovery sends
    # Publications kept per channel (at most the namespace's history) to answer recoveries from
    # memory; 0 sends every recovery to the broker.
    tail_size: int = 1_000
    join_history: int = 30  # publications a fresh subscription starts with
    presence_ttl: float = 30.0
    tick: float = 1.0  # presence, counts, expiry: once per tick
    ping_s: float = 25.0  # clients ping this often; silent for 2.5x as long, they are dropped
    namespaces: dict[str, Namespace] = msgspec.field(default_factory=lambda: DEFAULT_NAMESPACES)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one (every connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        _log.info("open-file limit raised from %d to %d", soft, hard)
        soft = hard
    else:
        _log.info("open-file limit %d (hard %d)", soft, hard)
    return soft, hard


def _ws_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


@dataclass(eq=False)
class _Channel:
    name: str
    namespace: Namespace
    conns: set[_Connection] = field(default_factory=set)
    cursor: Cursor = field(default_factory=Cursor)
    ready: bool = False  # the broker subscription is in place and the cursor set
    recovering: bool = False
    tail: RecentTail = field(default_factory=lambda: RecentTail(0, 0))
    held: list[Publication] = field(default_factory=list)  # deliveries during a recovery
    # client -> user: the last snapshot diffed to this process's viewers (kept while counted)
    presence: dict[str, str] = field(default_factory=dict)
    # A large channel's presence is this process's share, counted (Broker.report_presence);
    # a small one's is an entry per connection, those in ``joined``.
    counted: bool = False
    joined: set[str] = field(default_factory=set)
    seen: dict[str, float] = field(default_factory=dict)  # counted: user -> when last here
    present: int = 0  # the channel's size as the broker last said
    small_since: float | None = None  # since when it has been at most half the diff limit
    subscribing: asyncio.Future[None] | None = None


class _Connection(asyncio.Protocol):
    """One WebSocket connection: the sans-I/O protocol and this client's place in each channel."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.ws = ServerProtocol(max_size=gateway.settings.max_frame_bytes * 4)
        self.transport: asyncio.Transport | None = None
        self.grant: RealtimeGrant | None = None
        self.client = ""
        self.open = False
        self.closed = False
        self.positions = Cursor()  # what this connection has been sent, per channel
        self.joining: dict[str, list[Publication]] = {}  # channel -> deliveries held meanwhile
        self.inbox: list[ClientFrame] = []
        self.worker: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.heard = 0.0  # loop time of the last bytes received

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(
            self.gateway.settings.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        if not self.open and self.transport is not None:
            self.gateway.stats["handshake_timeouts"] += 1
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.heard = asyncio.get_running_loop().time()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()
        if self.ws.close_expected() and self.transport is not None:
            self.transport.close()  # the close handshake is done, or the protocol failed

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.closed = True
        if self.open:
            self.open = False
            self.gateway._gone(self)

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        gateway = self.gateway
        url = urlsplit(request.path)
        if url.path == "/health":
            self._answer(gateway.health_response(self.ws))
            return
        if url.path != "/connect":
            self._answer(self.ws.reject(404, "no such path: connect at /connect?token=...\n"))
            return
        refused = gateway.admit()
        if refused is not None:
            response = self.ws.reject(503, "overloaded: retry later\n")
            response.headers["Retry-After"] = str(refused)
            self._answer(response)
            return
        token = parse_qs(url.query).get("token", [""])[0]
        try:
            if not token:
                raise FrameError(Code.UNAUTHORIZED, "no token: connect at /connect?token=...")
            grant = verify_realtime_token(
                token, gateway.settings.token_key, now=int(gateway.clock())
            )
        except FrameError as err:
            body = encode(ErrorReply(id=0, code=int(err.code), reason=str(err))).decode()
            self._answer(self.ws.reject(_STATUS_FOR.get(err.code, 403), body + "\n"))
            return
        response = self.ws.accept(request)
        if response.status_code != 101:
            self._answer(response)
            return
        self.ws.send_response(response)
        self._flush()  # the 101 goes out before the first frame
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.grant = grant
        self.open = True
        self.client = gateway._joined(self, grant)
        self.send(
            Connected(
                client=self.client,
                user=grant.user,
                expires=grant.expires,
                ping_s=gateway.settings.ping_s,
            )
        )

    def _answer(self, response: Response) -> None:
        self.ws.send_response(response)
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- frames -------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY) or not self.open:
            return  # ping, pong and close are the sans-I/O protocol's
        try:
            decoded = decode_client_frame(
                frame.data, max_bytes=self.gateway.settings.max_frame_bytes
            )
        except FrameError as err:
            self.gateway.stats["bad_frames"] += 1
            self.disconnect(err.code)
            return
        self.inbox.append(decoded)
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        # One frame at a time per connection: a publish after a subscribe sees the subscription.
        try:
            while self.inbox and not self.closed:
                frame = self.inbox.pop(0)
                try:
                    await self.gateway._handle(self, frame)
                except FrameError as err:
                    if err.code.info.closes:
                        self.disconnect(err.code)
                    else:
                        self.send(self._error(frame, err.code, str(err)))
                except BrokerError as err:
                    self.send(self._error(frame, Code.UNAVAILABLE, f"broker: {err}"))
                except Exception:
                    # A defect must not leave the client waiting on an answer that never comes.
                    _log.exception("frame %s failed", type(frame).__name__)
                    self.disconnect(Code.SHUTDOWN)
        finally:
            self.worker = None

    @staticmethod
    def _error(frame: ClientFrame, code: Code, reason: str) -> ErrorReply:
        return ErrorReply(id=frame.id, code=int(code), reason=reason, after_ms=code.info.after_ms)

    # -- sending ------------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self.ws.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def send(self, frame: ServerFrame) -> None:
        self.write(_ws_frame(encode(frame)))

    def write(self, framed: bytes) -> None:
        """Queue already framed bytes; a connection whose queue is full is cut as SLOW."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.gateway.settings.send_queue_bytes:
            self.gateway.stats["slow"] += 1
            self.disconnect(Code.SLOW)
            return
        transport.write(framed)

    def disconnect(self, code: Code) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        if self.ws.state is State.OPEN:
            transport.write(_ws_frame(encode(disconnect_frame(code))))
            self.ws.send_close(int(code), code.info.reason)
            self._flush()
        transport.close()
        # A slow client may never drain what is queued: do not wait for it.
        asyncio.get_running_loop().call_later(1.0, transport.abort)
        self.closed = True
        if self.open:
            self.open = False
            self.gateway._gone(self)


class Gateway:
    """The connections of one process, their channels, and the broker that joins the processes."""

    def __init__(
        self,
        broker: Broker,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.clock = clock
        self.connections: set[_Connection] = set()
        self.channels: dict[str, _Channel] = {}
        self.mutes = Mutes()
        # The normal limits, raised while a planned event's window is open (admission.py).
        self.normal = Admission(
            rate=settings.admission_rate,
            burst=settings.admission_burst,
            max_connections=settings.max_connections,
        )
        self.limits = self.normal
        self.windows: list[AdmissionWindow] = []
        self._clamped_from: Admission | None = None
        self.admission = TokenBucket(rate=settings.admission_rate, burst=settings.admission_burst)
        self.counts = CountThrottle(interval=settings.tick)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "accepted",
                "refused",
                "handshake_timeouts",
                "bad_frames",
                "slow",
                "resets",
                "silent",
                "tail_recoveries",  # recoveries answered from this process's tail
                "broker_recoveries",  # recoveries that read the broker's history
                "presence_rejoined",  # entries joined again after the broker came back
            ),
            0,
        )
        # Presence leaves the broker refused (it was down), retried when it returns: a
        # connection that died during an outage must not stay present until its entry expires.
        self._unleft: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[int, int, weakref.ref[_Connection]]] = []
        self._ids = itertools.count(1)
        self._ticks = 0
        self._swept = 0.0
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        broker.on_recovered(self._broker_returned)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; returns the port (``port`` 0 picks one)."""
        await self.broker.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=4096, reuse_port=reuse_port or None
        )
        self._ticker = loop.create_task(self._tick_forever())
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.disconnect(Code.SHUTDOWN)
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.broker.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- admission ----------------------------------------------------------------------------

    def plan_admission(self, windows: list[AdmissionWindow]) -> None:
        """Take the planned events' windows (the control plane's plan, polled)."""
        self.windows = windows
        self._limits_now()

    def _limits_now(self) -> Admission:
        limits = admission_at(self.normal, self.windows, self.clock())
        ceiling = self.settings.connection_ceiling
        if ceiling is not None and limits.max_connections > max(
            ceiling, self.normal.max_connections
        ):
            if limits != self._clamped_from:
                self._clamped_from = limits
                _log.warning(
                    "admission: the plan asks %d connections of this process, which can hold "
                    "%d: the event needs more gateway processes (realtime.total_processes)",
                    limits.max_connections,
                    ceiling,
                )
            limits = msgspec.structs.replace(
                limits, max_connections=max(ceiling, self.normal.max_connections)
            )
        if limits != self.limits:
            bucket = self.admission
            bucket.take(time.monotonic(), cost=0.0)  # refilled at the old rate until now
            # A raise takes effect at once: the bucket holds what it would have held had the
            # higher burst been the limit all along (a surge at the window's opening is let in).
            raised = max(0, limits.burst - self.limits.burst)
            bucket.tokens = min(limits.burst, bucket.tokens + raised)
            bucket.rate, bucket.burst = limits.rate, limits.burst
            _log.info(
                "admission: %g/s, burst %d, up to %d connections",
                limits.rate,
                limits.burst,
                limits.max_connections,
            )
            self.limits = limits
        return limits

    def admit(self) -> int | None:
        """None to admit a new connection, else the seconds to tell it to wait."""
        if len(self.connections) >= self._limits_now().max_connections:
            self.stats["refused"] += 1
            return 5
        if not self.admission.take(time.monotonic()):
            self.stats["refused"] += 1
            return max(1, math.ceil(self.admission.wait_s()))
        return None

    def health_response(self, ws: ServerProtocol) -> Response:
        health = self.broker.health()
        body = msgspec.json.encode(
            {
                "ok": health.ok,
                "degraded": not health.ok,
                "detail": health.detail,
                "node": self.broker.node,
                "connections": len(self.connections),
                "channels": len(self.channels),
                "admission": {
                    **msgspec.structs.asdict(self._limits_now()),
                    "windows": len(self.windows),
                    "raised_for": sorted(
                        {w.channel for w in self.windows if w.start <= self.clock() < w.end}
                    ),
                },
                **self.stats,
            }
        )
        response = ws.reject(200 if health.ok else 503, body.decode())
        response.headers["Content-Type"] = "application/json"
        return response

    def _joined(self, conn: _Connection, grant: RealtimeGrant) -> str:
        self.connections.add(conn)
        self.stats["accepted"] += 1
        # The join's number breaks ties, never ``id(conn)``: CPython hands a new connection the
        # address of one just freed, and a tie on both would compare the weak references.
        number = next(self._ids)
        heapq.heappush(self._expiries, (grant.expires, number, weakref.ref(conn)))
        return f"{self.broker.node}.{number}"

    def _gone(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        for name in conn.positions.positions().keys() | conn.joining.keys():
            self._leave(conn, name)

    # -- frames -------------------------------------------------------------------------------

    async def _handle(self, conn: _Connection, frame: ClientFrame) -> None:
        if isinstance(frame, Ping):
            conn.send(Pong(id=frame.id))
            return
        if isinstance(frame, Subscribe):
            await self._subscribe(conn, frame)
            return
        if isinstance(frame, Unsubscribe):
            for name in frame.channels:
                self._leave(conn, name)
            conn.send(Reply(id=frame.id))
            return
        namespace = self._authorise(conn, frame, frame.channel)
        assert conn.grant is not None
        user = conn.grant.user
        if isinstance(frame, Publish):
            await self._publish(conn, frame, namespace, user)
        elif isinstance(frame, SetState):
            await self._set_state(conn, frame, namespace)
        elif isinstance(frame, Delete):
            data = msgspec.json.encode(DeleteNotice(offset=frame.offset, by=user))
            position = await self._append(frame.channel, namespace, data, "delete", user)
            conn.send(Reply(id=frame.id, position=position))
        elif isinstance(frame, Mute):
            until = self.clock() + max(0.0, frame.seconds)
            data = msgspec.json.encode(MuteNotice(user=frame.user, until=until))
            self.mutes.mute(frame.channel, frame.user, until)
            position = await self._append(frame.channel, namespace, data, "mute", user)
            conn.send(Reply(id=frame.id, position=position))
        elif isinstance(frame, PresenceQuery):
            await self._presence_query(conn, frame, namespace)

    def _authorise(self, conn: _Connection, frame: ClientFrame, channel: str) -> Namespace:
        namespace = namespace_of(channel, self.settings.namespaces)
        right = required_right(frame, namespace)
        assert conn.grant is not None
        if right not in rights_on(conn.grant, channel):
            raise FrameError(Code.FORBIDDEN, f"the token gives no {right!r} on {channel}")
        return namespace

    async def _append(
        self, channel: str, namespace: Namespace, data: bytes, kind: str, user: str
    ) -> Position:
        return await self.broker.publish(
            channel,
            data,
            kind=kind,
            user=user,
            history_size=namespace.history_size,
            history_ttl=namespace.history_ttl,
        )

    async def _publish(
        self, conn: _Connection, frame: Publish, namespace: Namespace, user: str
    ) -> None:
        data = bytes(frame.data)
        if len(data) > namespace.max_message_bytes:
            raise FrameError(
                Code.MESSAGE_TOO_LARGE, f"{len(data)} bytes; at most {namespace.max_message_bytes}"
            )
        now = self.clock()
        if self.mutes.is_muted(frame.channel, user, now):
            raise FrameError(Code.MUTED, f"muted on {frame.channel}")
        assert conn.grant is not None
        if "moderate" in rights_on(conn.grant, frame.channel):
            # Moderators and the operator's sources (announcements) are not rate limited.
            position = await self._append(frame.channel, namespace, data, "message", user)
            conn.send(Reply(id=frame.id, position=position))
            return
        # One bucket per user and channel in the broker: every connection of the user, on every
        # process, draws from it.
        taken = await self.broker.rate_take(
            frame.channel, user, rate=namespace.rate_per_s, burst=namespace.burst
        )
        if not taken.taken:
            conn.send(
                ErrorReply(
                    id=frame.id,
                    code=int(Code.RATE_LIMITED),
                    reason=f"at most {namespace.rate_per_s:g} messages a second",
                    after_ms=max(1, taken.wait_ms),
                )
            )
            return
        position = await self._append(frame.channel, namespace, data, "message", user)
        conn.send(Reply(id=frame.id, position=position))

    async def _set_state(self, conn: _Connection, frame: SetState, namespace: Namespace) -> None:
        value = StateValue(
            key=frame.key,
            value=bytes(frame.value),
            seq=frame.seq,
            source_time_ms=frame.source_time_ms,
            max_age_ms=frame.max_age_ms,
        )
        # The key is stored and published with every write: it counts against the limit too.
        size = len(value.value) + len(value.key.encode())
        if size > namespace.max_message_bytes:
            raise FrameError(
                Code.MESSAGE_TOO_LARGE,
                f"key and value {size} bytes; at most {namespace.max_message_bytes}",
            )
        write = await self.broker.state_write(
            frame.channel,
            value,
            history_size=namespace.history_size,
            history_ttl=namespace.history_ttl,
        )
        # A dropped write (older or repeated seq) is not an error for the source: it says so.
        conn.send(Reply(id=frame.id, position=write.position))

    async def _presence_query(
        self, conn: _Connection, frame: PresenceQuery, namespace: Namespace
    ) -> None:
        stats = await self.broker.presence_stats(frame.channel)
        present = None
        # Listed only when every connection is an entry: a large channel's shares are counts.
        if stats.clients <= namespace.presence_diff_limit and not stats.shared:
            entries = await self.broker.presence(frame.channel)
            present = [PresenceUser(client=e.client, user=e.user) for e in entries]
        conn.send(
            PresenceList(
                id=frame.id,
                channel=frame.channel,
                clients=stats.clients,
                # A user whose last connection went may still be in a share for a while
                # (see _share_users): never more users than connections.
                users=min(stats.users, stats.clients),
                present=present,
            )
        )

    # -- subscriptions ------------------------------------------------------------------------

    async def _subscribe(self, conn: _Connection, frame: Subscribe) -> None:
        answers: list[SubscribedChannel] = []
        for item in frame.channels:
            try:
                answers.append(await self._subscribe_one(conn, frame, item.channel, item.since))
            except FrameError as err:
                answers.append(self._refused(item.channel, err.code))
            except BrokerError:
                self._leave(conn, item.channel)  # half-joined: undo it, the client retries
                answers.append(self._refused(item.channel, Code.UNAVAILABLE))
        conn.send(Subscribed(id=frame.id, channels=answers))
        for answer in answers:
            if not answer.code:
                self._tell_present(conn, answer.channel)
        for item in frame.channels:  # what arrived while the answer was being made
            self._release(conn, item.channel)

    def _tell_present(self, conn: _Connection, name: str) -> None:
        """Who a small channel's viewers were last told is here, to a viewer who just
        subscribed: the diffs that follow are relative to it, and without it a newcomer would
        only ever see who joins after them (clients start a channel's presence afresh on its
        subscribe answer)."""
        channel = self.channels.get(name)
        # a counted channel's snapshot is only ever set while it was listed (small)
        if channel is None or channel.counted or not channel.presence:
            return
        joined = [PresenceUser(client=c, user=u) for c, u in sorted(channel.presence.items())]
        conn.send(PresenceDiff(channel=name, joined=joined, left=[]))

    @staticmethod
    def _refused(channel: str, code: Code) -> SubscribedChannel:
        return SubscribedChannel(
            channel=channel,
            recovered=False,
            position=Position("", 0),
            publications=[],
            code=int(code),
        )

    async def _subscribe_one(
        self, conn: _Connection, frame: Subscribe, name: str, since: Position | None
    ) -> SubscribedChannel:
        namespace = self._authorise(conn, frame, name)
        known = conn.positions.position(name) is not None or name in conn.joining
        held = conn.positions.positions().keys() | conn.joining.keys()
        if not known and len(held) >= self.settings.max_channels:
            raise FrameError(Code.TOO_MANY_CHANNELS, f"at most {self.settings.max_channels}")
        conn.positions.forget(name)
        conn.joining[name] = []  # live deliveries wait here until the answer is sent
        channel = await self._channel(name, namespace)
        channel.conns.add(conn)
        if not known:
            await self._join_presence(channel, conn)
        if since is not None:
            missed = self._from_tail(channel, since)
            if missed is not None:
                conn.positions.reset(name, missed[0])
                return SubscribedChannel(
                    channel=name,
                    recovered=True,
                    position=missed[0],
                    publications=[pub_frame(p) for p in missed[1]],
                )
            self.stats["broker_recoveries"] += 1
            answer = await self.broker.recover(name, since, limit=self.settings.recover_limit)
            if answer.recovered:
                conn.positions.reset(name, answer.top)
                return SubscribedChannel(
                    channel=name,
                    recovered=True,
                    position=answer.top,
                    publications=[pub_frame(p) for p in answer.publications],
                )
        top, pubs, state = await self._reload(name, namespace)
        conn.positions.reset(name, top)
        return SubscribedChannel(
            channel=name, recovered=False, position=top, publications=pubs, state=state
        )

    def _from_tail(
        self, channel: _Channel, since: Position
    ) -> tuple[Position, list[Publication]] | None:
        """What a client at ``since`` missed, from the channel's tail: all of it up to what this
        process has delivered (later publications reach it through the fan-out), or None."""
        top = channel.tail.top
        if self.settings.tail_size <= 0:
            return None
        # The tail is whole only while it is where the channel's deliveries are: not during a
        # recovery of the channel itself (its hole is being filled), not after a reset.
        if top is None or channel.recovering or channel.cursor.position(channel.name) != top:
            return None
        pubs = channel.tail.recover(since, limit=self.settings.recover_limit)
        if pubs is None:
            return None
        self.stats["tail_recoveries"] += 1
        return top, pubs

    async def _reload(
        self, name: str, namespace: Namespace
    ) -> tuple[Position, list[PubFrame], list[StateFrame]]:
        """What a client reloads a channel from: its recent history, state, and position."""
        page = await self.broker.history(name, limit=self.settings.join_history)
        state = []
        if namespace.kind == STATE:
            state = [state_frame(v) for _, v in sorted((await self.broker.state(name)).items())]
        return page.top, [pub_frame(p) for p in page.publications], state

    def _release(self, conn: _Connection, name: str) -> None:
        held = conn.joining.pop(name, None)
        if held is None or conn.positions.position(name) is None:
            return
        for pub in held:
            self._deliver_to(conn, pub, _ws_frame(encode(pub_frame(pub))))

    async def _channel(self, name: str, namespace: Namespace) -> _Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = _Channel(name=name, namespace=namespace)
        if channel.ready:
            return channel
        if channel.subscribing is None:
            channel.subscribing = asyncio.get_running_loop().create_future()
            try:
                await self.broker.subscribe(name, self._on_publication)
                # A process (re)starting in a storm learns here that the channel is large, and
                # counts its viewers from the first instead of joining each one. Read before the
                # history: from the history's top on, nothing may be awaited until the channel
                # is ready, or a publication delivered meanwhile would be dropped unseen.
                channel.present = (await self.broker.presence_stats(name)).clients
                channel.counted = presence_counted(
                    channel.present, 0, False, diff_limit=namespace.presence_diff_limit
                )
                page = await self.broker.history(name, limit=200)
                channel.cursor.reset(name, page.top)
                channel.tail = RecentTail(
                    min(namespace.history_size, self.settings.tail_size),
                    int(namespace.history_ttl * 1000),
                )
                channel.tail.reset(page.top, page.publications)
                now = self.clock()
                for pub in page.publications:  # mutes still in force on this channel
                    if pub.kind == "mute":
                        notice = msgspec.json.decode(pub.data, type=MuteNotice)
                        if notice.until > now:
                            self.mutes.mute(name, notice.user, notice.until)
                channel.ready = True
                channel.subscribing.set_result(None)
            except BaseException as err:
                channel.subscribing.set_exception(err)
                channel.subscribing.exception()  # retrieved: the waiters re-raise it
                channel.subscribing = None
                if not channel.conns:
                    self.channels.pop(name, None)
                raise
        else:
            await asyncio.shield(channel.subscribing)
        return channel

    def _leave(self, conn: _Connection, name: str) -> None:
        conn.positions.forget(name)
        conn.joining.pop(name, None)
        channel = self.channels.get(name)
        if channel is None or conn not in channel.conns:
            return
        channel.conns.discard(conn)
        if conn.client in channel.joined:  # counted, it leaves with the next share
            channel.joined.discard(conn.client)
            self._spawn(self._forget_presence(name, conn.client))
        if not channel.conns and channel.ready:
            del self.channels[name]
            self.counts.forget(name)
            self._spawn(self._unsubscribe(name))

    async def _unsubscribe(self, name: str) -> None:
        # This runs after the leave that asked for it. A viewer may have joined the channel in
        # between (a reconnect storm does it all the time): its subscribe was a no-op on the
        # subscription still in place, so dropping it now would leave that channel deaf to
        # every later publication. The channel's presence here is the one truth about it.
        if name in self.channels:
            return
        await self.broker.unsubscribe(name, self._on_publication)
        if name in self.channels:  # joined while the unsubscribe was on its way: take it back
            try:
                await self.broker.subscribe(name, self._on_publication)
            except BrokerError:
                _log.warning("could not resubscribe to %s; its viewers reconnect", name)
                channel = self.channels.get(name)
                for conn in list(channel.conns if channel is not None else ()):
                    conn.disconnect(Code.SHUTDOWN)

    async def _join_presence(self, channel: _Channel, conn: _Connection) -> None:
        limit = channel.namespace.presence_diff_limit
        if channel.counted:
            return
        if presence_counted(channel.present, len(channel.conns), False, diff_limit=limit):
            # This process alone holds more than a small channel: count it from now on.
            self._count_presence(channel)
            return
        await self._enter(channel, conn)

    async def _enter(self, channel: _Channel, conn: _Connection) -> None:
        """Join ``conn``'s presence entry on ``channel``."""
        assert conn.grant is not None
        channel.joined.add(conn.client)
        entry = PresenceEntry(client=conn.client, user=conn.grant.user)
        await self.broker.presence_join(channel.name, entry, ttl=self.settings.presence_ttl)
        if conn.client not in channel.joined or conn not in channel.conns:
            # It left, or the channel went to a count, while the entry was on its way: the
            # leave may have landed before it.
            channel.joined.discard(conn.client)
            await self.broker.presence_leave(channel.name, conn.client)

    def _count_presence(self, channel: _Channel) -> None:
        """The channel is large: this process's connections on it become one share, and its
        entries go in the same step (never counted twice)."""
        if channel.counted:
            return
        channel.counted = True
        leave, channel.joined = sorted(channel.joined), set()

        async def report() -> None:
            try:
                await self._report_presence({channel.name: leave})
            except BrokerError as err:  # the share goes with the next tick
                _log.warning("presence share of %s not reported: %s", channel.name, err)

        self._spawn(report())

    async def _list_presence(self, channel: _Channel) -> None:
        """The channel is small again: an entry per connection, then the share withdrawn."""
        channel.counted = False
        channel.seen = {}
        await asyncio.gather(*(self._enter(channel, conn) for conn in list(channel.conns)))
        await self._report_presence()

    async def _report_presence(self, leave: Mapping[str, Sequence[str]] | None = None) -> None:
        """Every counted channel's share of this process, in one call (a tick's, or a move)."""
        now = self.clock()
        shares = {
            name: PresenceShare(
                clients=len(channel.conns),
                users=self._share_users(channel, now),
                replaces=tuple((leave or {}).get(name, ())),
            )
            for name, channel in self.channels.items()
            if channel.counted
        }
        try:
            await self.broker.report_presence(shares, ttl=self.settings.tick * 3)
        except BrokerError:
            # The entries that were to go are left when the broker returns, or expire.
            now = self.clock()
            for name, clients in (leave or {}).items():
                self._unleft.update(((name, c), now) for c in clients)
            raise

    def _share_users(self, channel: _Channel, now: float) -> frozenset[str]:
        """The users of this process's connections on a counted channel, and those whose last
        connection here went less than ``presence_ttl`` ago (as long as the entry of a
        connection that vanished stays): a viewer back within it, as in a reconnect storm,
        costs the broker nothing, where withdrawing it and adding it again would be two writes
        per viewer. The users shown are never more than the connections."""
        seen = channel.seen
        for conn in channel.conns:
            if conn.grant is not None:
                seen[conn.grant.user] = now
        horizon = now - self.settings.presence_ttl
        for user in [u for u, at in seen.items() if at < horizon]:
            del seen[user]
        return frozenset(seen)

    async def _forget_presence(self, name: str, client: str) -> None:
        try:
            await self.broker.presence_leave(name, client)
        except BrokerError:  # retried when the broker returns; it expires on its own otherwise
            self._unleft[(name, client)] = self.clock()

    # -- fan-out ------------------------------------------------------------------------------

    def _on_publication(self, pub: Publication) -> None:
        channel = self.channels.get(pub.channel)
        if channel is None or not channel.ready:
            return
        if channel.recovering:
            channel.held.append(pub)
            return
        verdict = channel.cursor.offer(pub.channel, pub.epoch, pub.offset)
        if verdict is Verdict.APPLY:
            self._fan_out(channel, pub)
        elif verdict is Verdict.GAP:
            channel.recovering = True
            channel.held.append(pub)
            self._spawn(self._recover_channel(channel))

    def _fan_out(self, channel: _Channel, pub: Publication) -> None:
        channel.tail.append(pub)
        if pub.kind == "mute":
            notice = msgspec.json.decode(pub.data, type=MuteNotice)
            self.mutes.mute(pub.channel, notice.user, notice.until)
        framed = _ws_frame(encode(pub_frame(pub)))
        for conn in list(channel.conns):
            self._deliver_to(conn, pub, framed)

    def _deliver_to(self, conn: _Connection, pub: Publication, framed: bytes) -> None:
        held = conn.joining.get(pub.channel)
        if held is not None:
            held.append(pub)
            return
        verdict = conn.positions.offer(pub.channel, pub.epoch, pub.offset)
        if verdict is Verdict.APPLY:
            conn.write(framed)
        elif verdict is Verdict.GAP:
            # This connection fell behind the channel (it joined from an older position the
            # channel has since passed): bring it up to date on its own.
            conn.joining[pub.channel] = [pub]
            self._spawn(self._catch_up(conn, pub.channel))

    async def _catch_up(self, conn: _Connection, name: str) -> None:
        at = conn.positions.position(name)
        channel = self.channels.get(name)
        missed = self._from_tail(channel, at) if channel is not None and at is not None else None
        if missed is not None:
            for pub in missed[1]:
                self._deliver_now(conn, pub)
            for pub in conn.joining.pop(name, []):
                self._deliver_to(conn, pub, _ws_frame(encode(pub_frame(pub))))
            return
        try:
            if at is not None:
                self.stats["broker_recoveries"] += 1
                answer = await self.broker.recover(name, at, limit=self.settings.recover_limit)
                if answer.recovered:
                    for pub in answer.publications:
                        self._deliver_now(conn, pub)
                    held = conn.joining.pop(name, [])
                    for pub in held:
                        self._deliver_to(conn, pub, _ws_frame(encode(pub_frame(pub))))
                    return
            await self._reset(conn, name)
        except BrokerError:
            conn.disconnect(Code.SHUTDOWN)  # reconnects and recovers once the broker is back

    def _deliver_now(self, conn: _Connection, pub: Publication) -> None:
        if conn.positions.offer(pub.channel, pub.epoch, pub.offset) is Verdict.APPLY:
            conn.write(_ws_frame(encode(pub_frame(pub))))

    async def _reset(self, conn: _Connection, name: str) -> None:
        """Tell the connection to reload ``name`` from now on: its history could not be given."""
        channel = self.channels.get(name)
        if channel is None or conn not in channel.conns:
            return
        conn.joining[name] = []
        top, pubs, state = await self._reload(name, channel.namespace)
        conn.positions.reset(name, top)
        self.stats["resets"] += 1
        conn.send(Reset(channel=name, position=top, publications=pubs, state=state))
        self._release(conn, name)

    async def _recover_channel(self, channel: _Channel) -> None:
        """The channel's deliveries have a hole: fill it from history, or reset every client."""
        name = channel.name
        try:
            at = channel.cursor.position(name)
            answer = None
            if at is not None:
                answer = await self.broker.recover(name, at, limit=self.settings.recover_limit)
            if answer is not None and answer.recovered:
                for pub in answer.publications:
                    if channel.cursor.offer(name, pub.epoch, pub.offset) is Verdict.APPLY:
                        self._fan_out(channel, pub)
            else:
                top = answer.top if answer is not None else None
                if top is None:
                    top = (await self.broker.history(name, limit=0)).top
                channel.cursor.reset(name, top)
                channel.tail.reset(top)
                for conn in list(channel.conns):
                    await self._reset(conn, name)
        except BrokerError:
            _log.warning("could not recover %s; will retry when the broker returns", name)
            channel.held.clear()
            channel.recovering = False
            return
        held, channel.held = channel.held, []
        channel.recovering = False
        for pub in held:
            self._on_publication(pub)

    def _broker_returned(self, channels: frozenset[str]) -> None:
        for name in channels:
            channel = self.channels.get(name)
            if channel is not None and channel.ready and not channel.recovering:
                channel.recovering = True
                self._spawn(self._recover_channel(channel))
        self._spawn(self._rejoin_presence(channels))

    async def _rejoin_presence(self, names: frozenset[str]) -> None:
        """The broker is back, possibly empty (a Redis restarted without persistence): join
        every connection this process still holds on those channels again (a refresh never
        revives an entry), and make the leaves that failed during the outage, so that neither
        the living are missing nor the dead present."""
        for attempt in range(_REJOIN_ATTEMPTS):
            try:
                for name, client in list(self._unleft):
                    await self.broker.presence_leave(name, client)
                    self._unleft.pop((name, client), None)
                for name in sorted(names):
                    channel = self.channels.get(name)
                    if channel is None:
                        continue
                    # All at once: the engine bounds what is in flight (thousands of
                    # connections one round trip after another would take seconds).
                    listed = [c for c in channel.conns if c.client in channel.joined]
                    results = await asyncio.gather(
                        *(self._rejoin(channel, conn) for conn in listed),
                        return_exceptions=True,
                    )
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                await self._report_presence()  # the counted channels' shares, back at once
                return
            except BrokerError as err:
                # A restarted cluster node refuses work for a moment after its pub/sub is back.
                _log.warning("presence not joined again yet: %s", err)
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        _log.error(
            "presence of %d channel(s) not joined again; it returns with new joins", len(names)
        )

    async def _rejoin(self, channel: _Channel, conn: _Connection) -> None:
        if conn.client not in channel.joined or conn not in channel.conns:
            return
        await self._enter(channel, conn)
        self.stats["presence_rejoined"] += 1

    # -- once a tick: presence, counts, token expiry ------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick)
            try:
                await self._tick()
            except BrokerError as err:
                _log.warning("broker: %s", err)
            except Exception:
                _log.exception("tick failed")

    async def _tick(self) -> None:
        now = self.clock()
        self._drop_silent()
        while self._expiries and self._expiries[0][0] <= now:
            _, _, ref = heapq.heappop(self._expiries)
            conn = ref()
            if conn is not None:
                conn.disconnect(Code.TOKEN_EXPIRED)
        for key in [k for k, at in self._unleft.items() if now - at > self.settings.presence_ttl]:
            del self._unleft[key]  # expired in the broker by now
        # Presence entries live presence_ttl; refreshing them three times per ttl is enough.
        self._ticks += 1
        every = max(1, int(self.settings.presence_ttl / 3 / self.settings.tick))
        refresh = self._ticks % every == 0
        names = list(self.channels)
        local = {n: len(self.channels[n].conns) for n in names}
        await self.broker.report_counts(local, ttl=self.settings.tick * 3)
        await self._report_presence()
        totals = (await self.broker.counts(names)).counts
        for name in names:
            channel = self.channels.get(name)
            if channel is None or not channel.ready:
                continue
            if refresh and channel.joined:
                await self.broker.presence_refresh(
                    name, sorted(channel.joined), ttl=self.settings.presence_ttl
                )
            viewers = totals.get(name, 0)
            if self.counts.due(name, viewers, now):
                framed = _ws_frame(encode(Count(channel=name, viewers=viewers)))
                for conn in list(channel.conns):
                    conn.write(framed)
            await self._presence_tick(channel)

    def _drop_silent(self) -> None:
        """Drop connections not heard from for 2.5 ping intervals: a peer that vanished without
        closing (a cut network) would otherwise hold its descriptor and its presence forever."""
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._swept < self.settings.ping_s / 2:
            return
        self._swept = loop_now
        limit = 2.5 * self.settings.ping_s
        for conn in [c for c in self.connections if loop_now - c.heard > limit]:
            self.stats["silent"] += 1
            if conn.transport is not None:
                conn.transport.abort()

    async def _presence_tick(self, channel: _Channel) -> None:
        limit = channel.namespace.presence_diff_limit
        stats = await self.broker.presence_stats(channel.name)
        channel.present = stats.clients
        now = self.clock()
        if max(stats.clients, len(channel.conns)) > limit // 2:
            channel.small_since = None
        elif channel.small_since is None:
            channel.small_since = now
        counted = presence_counted(
            stats.clients,
            len(channel.conns),
            channel.counted,
            diff_limit=limit,
            small_for=0.0 if channel.small_since is None else now - channel.small_since,
            settle=self.settings.presence_ttl,
        )
        if counted:
            self._count_presence(channel)
        elif channel.counted:
            await self._list_presence(channel)
            return  # listed from the next tick on, once the share is withdrawn
        if counted or stats.shared or stats.clients > limit:
            # Counts only. The snapshot stays what this process's viewers were last told: the
            # first diff once the channel is listed again tells them who left meanwhile.
            return
        entries = await self.broker.presence(channel.name)
        diff = presence_update(channel.name, channel.presence, entries, diff_limit=limit)
        channel.presence = {e.client: e.user for e in entries}
        if diff is not None:
            framed = _ws_frame(encode(diff))
            for conn in list(channel.conns):
                conn.write(framed)
