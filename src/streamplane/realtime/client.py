"""A realtime client in Python: the load tool's and the tests' viewer, and the reference for the
browser client (``web/static/realtime.js``), which follows the same rules.

It keeps, per channel, the publications it applied and its last position; on any disconnect it
waits a full-jitter exponential backoff (at least what the server's code asked for), reconnects,
resubscribes to every channel in one batch with its last positions, and applies exactly what it
missed, or reloads the channel when the server says it cannot be recovered. A channel refused
for now (4503: the broker is away) is asked for again on the same connection, after the code's
wait plus the same backoff, until it is answered. A code that says give up (a forged token, a
malformed frame) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from streamplane.realtime.broker import Position
from streamplane.realtime.protocol import (
    Code,
    Connected,
    Count,
    Cursor,
    Disconnect,
    ErrorReply,
    Ping,
    PresenceDiff,
    PubFrame,
    Publish,
    Reply,
    Reset,
    SetState,
    StateFrame,
    Subscribe,
    Subscribed,
    SubscribeItem,
    Verdict,
    decode_server_frame,
    encode,
    full_jitter_backoff,
    is_stale,
)

__all__ = ["ChannelView", "ClientGaveUp", "RealtimeClient", "RequestFailed"]

TokenSource = Callable[[], Awaitable[str]]


class ClientGaveUp(Exception):
    """The server said not to reconnect (``code``), or the token was refused."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


class RequestFailed(Exception):
    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.reason}")
        self.reply = reply


@dataclass
class ChannelView:
    """What a client shows for one channel."""

    messages: list[PubFrame] = field(default_factory=list)  # applied, in order
    state: dict[str, StateFrame] = field(default_factory=dict)
    viewers: int = 0
    present: dict[str, str] = field(default_factory=dict)
    reloads: int = 0

    def stale_keys(self, now_ms: int) -> list[str]:
        return sorted(k for k, v in self.state.items() if is_stale(v, now_ms))


class RealtimeClient:
    def __init__(
        self,
        url: str,
        token: str | TokenSource,
        *,
        channels: list[str] | None = None,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        rng: random.Random | None = None,
        local_addr: tuple[str, int] | None = None,
        on_publication: Callable[[PubFrame], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.channels: list[str] = list(channels or [])
        self.views: dict[str, ChannelView] = {c: ChannelView() for c in self.channels}
        self.cursor = Cursor()
        self.connects = 0
        self.disconnects: list[int] = []
        self.connected = asyncio.Event()
        self.synced = asyncio.Event()  # every channel subscribed since the last connect
        self._backoff = (backoff_base, backoff_cap)
        self._rng = rng or random.Random()
        self._local_addr = local_addr
        self._on_publication = on_publication
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ws_tasks: list[asyncio.Task[None]] = []  # the connection's own: end with it
        self._refusals = 0  # subscribes refused for now in a row, on this connection

    # -- running ------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientGaveUp):
                await self._task

    async def run(self) -> None:
        """Connect and stay connected until the server says give up (raises ClientGaveUp)."""
        attempt = 0
        while True:
            after_ms = 0
            try:
                token = self._token if isinstance(self._token, str) else await self._token()
                async with connect(
                    f"{self.url}/connect?token={token}",
                    open_timeout=10,
                    max_size=None,
                    ping_interval=None,
                    local_addr=self._local_addr,
                ) as ws:
                    self._ws = ws
                    attempt = 0
                    after_ms = await self._session(ws)
            except InvalidStatus as err:
                status = err.response.status_code
                if status == 503:
                    after_ms = 1000 * int(err.response.headers.get("Retry-After", "1"))
                elif (
                    status == 401
                    and b'"code":4002' in err.response.body
                    and not isinstance(self._token, str)
                ):
                    after_ms = 0  # a fresh token is fetched on the next attempt
                else:
                    raise ClientGaveUp(status, err.response.body.decode(errors="replace")) from None
            except (OSError, WebSocketException, TimeoutError):
                pass  # the network or the server went away: back off and reconnect
            finally:
                self._ws = None
                self.connected.clear()
                self.synced.clear()
                for future in self._waiting.values():
                    if not future.done():
                        future.set_exception(ConnectionError("disconnected"))
                self._waiting.clear()
            wait = full_jitter_backoff(
                attempt, base=self._backoff[0], cap=self._backoff[1], draw=self._rng.random()
            )
            attempt += 1
            await asyncio.sleep(after_ms / 1000 + wait)

    async def _session(self, ws: ClientConnection) -> int:
        """Read frames until the connection ends; the milliseconds the server asked to wait."""
        ws_tasks: list[asyncio.Task[None]] = []
        self._ws_tasks, self._refusals = ws_tasks, 0
        try:
            return await self._read(ws, ws_tasks)
        finally:
            for task in ws_tasks:
                task.cancel()

    async def _ping(self, ws: ClientConnection, every: float) -> None:
        """Tell the gateway this client is alive (it drops connections it stops hearing)."""
        with contextlib.suppress(WebSocketException):
            while True:
                await asyncio.sleep(every)
                await ws.send(encode(Ping(id=0)).decode())

    async def _read(self, ws: ClientConnection, ws_tasks: list[asyncio.Task[None]]) -> int:
        after_ms = 0
        async for message in ws:
            frame = decode_server_frame(message)
            if isinstance(frame, Connected):
                self.connects += 1
                self.connected.set()
                pinger = asyncio.get_running_loop().create_task(self._ping(ws, frame.ping_s))
                ws_tasks.append(pinger)
                await self._resubscribe(ws)
            elif isinstance(frame, Disconnect):
                self.disconnects.append(frame.code)
                if not frame.reconnect:
                    raise ClientGaveUp(frame.code, frame.reason)
                after_ms = frame.after_ms
            else:
                await self._apply(ws, frame)
        return after_ms

    async def _resubscribe(self, ws: ClientConnection) -> None:
        if not self.channels:
            self.synced.set()
            return
        items = [SubscribeItem(channel=c, since=self.cursor.position(c)) for c in self.channels]
        await ws.send(encode(Subscribe(id=next(self._ids), channels=items)).decode())

    async def _apply(self, ws: ClientConnection, frame: Any) -> None:
        if isinstance(frame, PubFrame):
            verdict = self.cursor.offer(frame.channel, frame.epoch, frame.offset)
            if verdict is Verdict.APPLY:
                self._take(frame)
            elif verdict is Verdict.GAP:  # never expected from this server: recover anyway
                since = self.cursor.position(frame.channel)
                item = SubscribeItem(channel=frame.channel, since=since)
                await ws.send(encode(Subscribe(id=next(self._ids), channels=[item])).decode())
        elif isinstance(frame, Subscribed):
            again: list[str] = []
            for answer in frame.channels:
                if answer.code:
                    if answer.channel in self.channels and _retry_after_ms(answer.code):
                        again.append(answer.channel)
                    continue
                # the gateway follows this answer with who is here: presence starts afresh
                # (leaves while this client was away were never sent to it)
                self._view(answer.channel).present.clear()
                if answer.recovered:
                    for pub in answer.publications:
                        if self.cursor.offer(pub.channel, pub.epoch, pub.offset) is Verdict.APPLY:
                            self._take(pub)
                else:
                    self._reload(answer.channel, answer.position, answer.publications, answer.state)
            if again:
                # Not subscribed yet, and nothing would ask again before the next reconnect.
                after_ms = max(_retry_after_ms(a.code) for a in frame.channels if a.code)
                task = asyncio.get_running_loop().create_task(
                    self._subscribe_later(ws, again, after_ms)
                )
                self._ws_tasks.append(task)
            else:
                self._refusals = 0
                self.synced.set()
            self._resolve(frame.id, frame)
        elif isinstance(frame, Reset):
            self._reload(frame.channel, frame.position, frame.publications, frame.state)
        elif isinstance(frame, Count):
            self._view(frame.channel).viewers = frame.viewers
        elif isinstance(frame, PresenceDiff):
            view = self._view(frame.channel)
            for user in frame.joined:
                view.present[user.client] = user.user
            for client in frame.left:
                view.present.pop(client, None)
        elif isinstance(frame, ErrorReply | Reply) or hasattr(frame, "id"):
            self._resolve(frame.id, frame)

    async def _subscribe_later(
        self, ws: ClientConnection, channels: list[str], after_ms: int
    ) -> None:
        wait = full_jitter_backoff(
            self._refusals, base=self._backoff[0], cap=self._backoff[1], draw=self._rng.random()
        )
        self._refusals += 1
        await asyncio.sleep(after_ms / 1000 + wait)
        items = [SubscribeItem(channel=c, since=self.cursor.position(c)) for c in channels]
        with contextlib.suppress(WebSocketException):
            await ws.send(encode(Subscribe(id=next(self._ids), channels=items)).decode())

    def _view(self, channel: str) -> ChannelView:
        return self.views.setdefault(channel, ChannelView())

    def _take(self, pub: PubFrame) -> None:
        view = self._view(pub.channel)
        view.messages.append(pub)
        if pub.kind == "state":
            value = msgspec.json.decode(pub.data, type=StateFrame)
            view.state[value.key] = value
        if self._on_publication is not None:
            self._on_publication(pub)

    def _reload(
        self, channel: str, position: Position, pubs: list[PubFrame], state: list[StateFrame]
    ) -> None:
        view = self._view(channel)
        view.reloads += 1
        view.messages = []
        view.state = {s.key: s for s in state}
        self.cursor.reset(channel, position)
        for pub in pubs:  # the recent history to show, already at or before ``position``
            view.messages.append(pub)

    def _resolve(self, request: int, frame: Any) -> None:
        future = self._waiting.pop(request, None)
        if future is not None and not future.done():
            future.set_result(frame)

    # -- requests -----------------------------------------------------------------------------

    async def request(self, make: Callable[[int], Any], timeout: float = 10.0) -> Any:
        """Send the frame ``make(id)`` and wait for its answer; RequestFailed on an error."""
        await asyncio.wait_for(self.connected.wait(), timeout)
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        request = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request] = future
        await ws.send(encode(make(request)).decode())
        answer = await asyncio.wait_for(future, timeout)
        if isinstance(answer, ErrorReply):
            raise RequestFailed(answer)
        return answer

    async def publish(self, channel: str, data: Any) -> Reply:
        raw = msgspec.Raw(msgspec.json.encode(data))
        answer: Reply = await self.request(lambda i: Publish(id=i, channel=channel, data=raw))
        return answer

    async def set_state(
        self, channel: str, key: str, value: Any, *, seq: int, source_time_ms: int, max_age_ms: int
    ) -> Reply:
        raw = msgspec.Raw(msgspec.json.encode(value))
        answer: Reply = await self.request(
            lambda i: SetState(
                id=i,
                channel=channel,
                key=key,
                value=raw,
                seq=seq,
                source_time_ms=source_time_ms,
                max_age_ms=max_age_ms,
            )
        )
        return answer

    async def subscribe(self, *channels: str) -> Subscribed:
        new = [c for c in channels if c not in self.channels]
        self.channels.extend(new)
        for c in new:
            self._view(c)
        items = [SubscribeItem(channel=c, since=self.cursor.position(c)) for c in channels]
        answer: Subscribed = await self.request(lambda i: Subscribe(id=i, channels=items))
        return answer


def _retry_after_ms(code: int) -> int:
    """The wait before asking again for a channel refused with ``code``; 0: final (forbidden,
    unknown, too many channels)."""
    try:
        info = Code(code).info
    except ValueError:
        return 0
    return 0 if info.closes else info.after_ms
