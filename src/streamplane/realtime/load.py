"""`streamplane gateway-load`: many real WebSocket viewers against a gateway, and the scenarios
they run.

- **Surge**: the viewers arrive spread over ``arrival_s`` seconds (0: as fast as they can dial).
  A handshake answered 503 is retried no sooner than its ``Retry-After``, plus a full-jitter
  exponential backoff over the viewer's refusals so far (as the real client does); the report
  gives the 503s, how long a refusal took (dial to the 503), refusals that carried no
  ``Retry-After`` (must be 0), and the time until every viewer was admitted.
- **Steady fan-out**: every viewer checks it applies offsets 1, 2, 3, ... with no hole and no
  repeat, and records each message's latency.
- **Reconnect storm**: every viewer drops its connection at once, messages go on meanwhile, all
  reconnect with full-jitter backoff and their last position; the time until every viewer holds
  every message, and what is left missing.
- **Redis restart** (when the caller can restart the broker, e.g. ``LoadStack``): the broker is
  killed and started again empty mid-stream while messages go on; the publisher retries what is
  refused; every viewer must end on the publisher's last position, by recovery or an explicit
  reload, with nothing applied twice.

Throughout, a state source writes a score with a maximum age into a state channel; each viewer
shows the latest value as current until its age runs out (``protocol.is_stale``), and the report
counts values shown as current past their true age (the source's own clock, carried in the
value): it must be 0.

Viewers are picows clients (a few KB each, so the load side stays cheap), spread over P
processes, each from its own loopback address (127.0.0.2, 127.0.0.3, ...) to get past one
address's ephemeral ports, each with its open-file limit raised to the hard one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Process, Queue
from pathlib import Path
from typing import Any

import msgspec

from streamplane.lifetime import child_setup
from streamplane.realtime.gateway import raise_open_file_limit
from streamplane.realtime.protocol import full_jitter_backoff
from streamplane.realtime.tokens import sign_realtime_token
from streamplane.stack import free_port

__all__ = [
    "CHANNEL",
    "STATE_CHANNEL",
    "LoadReport",
    "LoadStack",
    "RestartReport",
    "percentile",
    "retry_after_s",
    "run_load",
]

CHANNEL = "event:load"
STATE_CHANNEL = "state:load"
_MAX_PER_PROCESS = 18_000  # the open-file limit here is 20,000 per process


class RestartReport(msgspec.Struct, kw_only=True):
    recovered_s: float  # from the kill until every viewer is on the publisher's last position
    lost: int
    repeats: int
    reloads: int  # explicit "not recovered" / resets: the honest answer to an emptied Redis
    refused: int  # publications the gateway refused while Redis was away (the source retried)
    unconnected: int


class LoadReport(msgspec.Struct, kw_only=True):
    held: int
    connect_s: float  # the surge: from the first arrival until every viewer was admitted
    refused: int  # handshakes answered 503 during the surge (each retried after Retry-After)
    early_retries: int  # retries sooner than the Retry-After they were given (must be 0)
    refusal_ms: list[float] = []  # each 503: from the dial until the answer
    admission_ms: list[float] = []  # each admitted handshake in the surge: dial until the 101
    without_retry_after: int = 0  # 503s that carried no Retry-After (must be 0)
    latencies: list[float]
    deliveries: int  # publications applied by the viewers in the measured round
    holes: int
    repeats: int
    storm_s: float
    lost: int  # publications missing on viewers connected and subscribed at the end, unexplained
    reloads: int  # explicit "not recovered": the viewer was told to reload, nothing silent
    unconnected: int  # viewers still not back at the end: their count, not a loss by the gateway
    redials: int = 0  # connections that closed under a viewer outside the storm's drop
    # Upgrades whose connection closed before any answer (a gateway drops a handshake it has not
    # received whole in its handshake timeout): not admitted, dialled again.
    handshakes_cut: int = 0
    why_unconnected: list[str] = []
    state_values: int = 0  # state values viewers showed
    stale_shown: int = 0  # values a viewer turned to stale on time (their age ran out)
    stale_as_current: int = 0  # values shown as current past their true age (must be 0)
    restart: RestartReport | None = None


class _Pos(msgspec.Struct):
    epoch: str
    offset: int


class _State(msgspec.Struct):
    key: str
    value: msgspec.Raw
    seq: int
    source_time_ms: int
    max_age_ms: int


class _Pub(msgspec.Struct):
    channel: str
    epoch: str
    offset: int
    kind: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")


class _Answer(msgspec.Struct):
    channel: str
    recovered: bool
    position: _Pos
    publications: list[_Pub] = []
    state: list[_State] = []
    code: int = 0


class _Frame(msgspec.Struct):
    type: str
    channel: str = ""
    epoch: str = ""
    offset: int = 0
    kind: str = ""
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: a frame without data
    channels: list[_Answer] | None = None
    position: _Pos | None = None  # a reset's
    state: list[_State] | None = None  # a reset's
    ping_s: float = 0.0  # connected's


class _Tick(msgspec.Struct):
    t: float
    n: int


class _Truth(msgspec.Struct):
    """A state value as the source made it: its own clock, never rewritten on the way."""

    seq: int
    t_ms: int
    max_age_ms: int


def retry_after_s(header: str | None, default: float = 1.0) -> float:
    """The seconds a 503's ``Retry-After`` asks for (delta-seconds; anything else: ``default``)."""
    try:
        return max(0.0, float(int((header or "").strip())))
    except ValueError:
        return default


class _Shown:
    """What one viewer shows for the state key: the value, until when it shows it as current
    (its frame's own age), and until when it really is current (the source's clock)."""

    __slots__ = ("counted", "current_until", "seq", "true_until")

    def __init__(self, seq: int, current_until: int, true_until: int) -> None:
        self.seq = seq
        self.current_until = current_until
        self.true_until = true_until
        self.counted = False


def _load(
    index: int, port: int, count: int, token: str, out: Any, commands: Any, plan: Any
) -> None:
    from picows import WSHandshakeError, WSListener, WSMsgType, ws_connect

    from streamplane.realtime.protocol import is_stale

    raise_open_file_limit()
    decoder = msgspec.json.Decoder(_Frame)
    ticks = msgspec.json.Decoder(_Tick)
    truths = msgspec.json.Decoder(_Truth)
    latencies: list[float] = []
    stats = dict.fromkeys(
        (
            "holes",
            "repeats",
            "reloads",
            "redials",
            "applied",
            "refused",
            "early",
            "without_retry_after",
            "state_values",
            "stale_shown",
            "stale_as_current",
            "resubscribed",
            "handshakes_cut",
        ),
        0,
    )
    moves = [0]  # bumped on every change of any viewer: the report waits while it moves
    dialling = [0]  # viewers in ``dial``: a wait for the viewers never ends while one dials
    tasks: set[asyncio.Task[None]] = set()
    ping_s = [25.0]

    def judge(shown: _Shown, at_ms: int) -> None:
        # Shown as current from its arrival until min(now, its frame's expiry): past the true
        # expiry, that was a stale value shown as current. Each value is judged once.
        if shown.counted:
            return
        if min(at_ms, shown.current_until) > shown.true_until:
            stats["stale_as_current"] += 1
            shown.counted = True
        elif at_ms > shown.current_until:
            stats["stale_shown"] += 1
            shown.counted = True

    class Viewer(WSListener):
        __slots__ = ("at", "shown", "synced", "transport", "why")

        def __init__(self) -> None:
            self.at: dict[str, _Pos] = {}
            self.transport: Any = None
            self.synced = False
            self.why = ""  # why it is not subscribed, for the report
            self.shown: _Shown | None = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            self.why = "connected, no answer to its subscribe"
            self._subscribe(transport, (CHANNEL, STATE_CHANNEL))

        def _subscribe(self, transport: Any, channels: tuple[str, ...]) -> None:
            if transport is not self.transport:
                return  # a later connection subscribes for itself
            items: list[dict[str, Any]] = []
            for name in channels:
                item: dict[str, Any] = {"channel": name}
                at = self.at.get(name)
                if at is not None:
                    item["since"] = {"epoch": at.epoch, "offset": at.offset}
                items.append(item)
            frame = {"type": "subscribe", "id": 1, "channels": items}
            transport.send(WSMsgType.TEXT, msgspec.json.encode(frame))

        def on_ws_disconnected(self, transport: Any) -> None:
            if transport is self.transport:  # not the close of a connection already replaced
                # A connection closed under it: like the real client, it reconnects and
                # recovers from its last position (left alone, it would be counted as loss).
                self.synced = False
                self.why = "closed after connecting"
                stats["redials"] += 1
                moves[0] += 1
                task = asyncio.get_running_loop().create_task(dial(self, 0.0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type != WSMsgType.TEXT:
                return
            msg = decoder.decode(frame.get_payload_as_bytes())
            if msg.type == "pub":
                self._apply(msg.channel, msg.epoch, msg.offset, msg.kind, msg.data)
            elif msg.type == "subscribed" and msg.channels:
                refused = tuple(a.channel for a in msg.channels if a.code)
                for answer in msg.channels:
                    if answer.code:
                        self.why = f"subscribe refused with code {answer.code}"
                    elif answer.recovered:
                        for pub in answer.publications:
                            self._apply(pub.channel, pub.epoch, pub.offset, pub.kind, pub.data)
                    else:
                        self._reload(answer.channel, answer.position, answer.state)
                if refused:
                    # As the real client does (4503: retry the request): those channels again,
                    # after a jittered pause, from the positions held.
                    stats["resubscribed"] += 1
                    asyncio.get_running_loop().call_later(
                        0.2 + random.random(), self._subscribe, transport, refused
                    )
                else:
                    self.synced = True
                moves[0] += 1
            elif msg.type == "reset":
                assert msg.position is not None
                self._reload(msg.channel, msg.position, msg.state or [])
            elif msg.type == "connected" and msg.ping_s:
                ping_s[0] = msg.ping_s

        def _reload(self, channel: str, position: _Pos, state: list[_State]) -> None:
            # A first subscription starts from the channel's top; after that, "not recovered"
            # is the explicit reload the guarantee allows, counted so that it is never hidden.
            if channel in self.at:
                stats["reloads"] += 1
            self.at[channel] = position
            for value in state:
                self._show(value)
            moves[0] += 1

        def _apply(
            self, channel: str, epoch: str, offset: int, kind: str, data: msgspec.Raw | None
        ) -> None:
            at = self.at.get(channel)
            if at is not None and at.epoch == epoch and offset <= at.offset:
                stats["repeats"] += 1
                return
            if at is None or at.epoch != epoch or offset != at.offset + 1:
                stats["holes"] += 1
            self.at[channel] = _Pos(epoch, offset)
            stats["applied"] += 1
            moves[0] += 1
            if not data:
                return
            if kind == "state":
                self._show(msgspec.json.decode(data, type=_State))
            elif channel == CHANNEL:
                latencies.append(time.time() - ticks.decode(data).t)

        def _show(self, value: _State) -> None:
            now_ms = int(time.time() * 1000)
            if self.shown is not None and value.seq <= self.shown.seq:
                return  # an older or repeated write: never shown over a newer one
            truth = truths.decode(value.value)
            if self.shown is not None:
                judge(self.shown, now_ms)
            stats["state_values"] += 1
            current_until = value.source_time_ms + value.max_age_ms
            if is_stale(_as_state(value), now_ms):
                current_until = 0  # shown as stale from its arrival: never as current
            self.shown = _Shown(value.seq, current_until, truth.t_ms + truth.max_age_ms)

    host = f"127.0.0.{2 + index}"
    url = f"ws://127.0.0.1:{port}/connect?token={token}"
    admitted: list[float] = []
    refusal_ms: list[float] = []
    admission_ms: list[float] = []

    async def dial(v: Viewer, at: float) -> None:
        dialling[0] += 1
        try:
            await _dial(v, at)
        finally:
            dialling[0] -= 1
            moves[0] += 1

    async def _dial(v: Viewer, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        v.transport = None
        v.why = "dialling"
        failed, attempt, refusals, not_before = "", 0, 0, 0.0
        while attempt < 20:
            async with sem:
                if time.time() < not_before - 0.001:
                    stats["early"] += 1
                dialled = time.perf_counter()
                try:
                    _, listener = await ws_connect(
                        lambda: v, url, local_addr=(host, 0), read_buffer_init_size=1024
                    )
                    if listener is not None:
                        admitted.append(time.time())
                        admission_ms.append((time.perf_counter() - dialled) * 1000)
                        return
                    # picows returns without a listener, not an error, when the connection
                    # closed before the upgrade's answer: nothing was admitted, nothing will
                    # subscribe. Counted, and dialled again like any failed dial.
                    stats["handshakes_cut"] += 1
                    failed = "the connection closed before the upgrade's answer"
                    attempt += 1
                    delay = random.random() * min(2.0, 0.1 * 2**attempt)
                except WSHandshakeError as exc:
                    status = exc.response.status if exc.response is not None else 0
                    failed = f"HTTP {status}: {exc}"
                    if status == 503:
                        refusal_ms.append((time.perf_counter() - dialled) * 1000)
                        stats["refused"] += 1
                        headers = exc.response.headers if exc.response is not None else {}
                        if headers.get("Retry-After") is None:
                            stats["without_retry_after"] += 1
                        wait = retry_after_s(headers.get("Retry-After"))
                        not_before = time.time() + wait
                        # Obeyed, then spread: the refused must not all come back at once.
                        jitter = full_jitter_backoff(
                            refusals, base=0.5, cap=10.0, draw=random.random()
                        )
                        delay, refusals = wait + jitter, refusals + 1
                    else:
                        attempt += 1
                        delay = random.random() * min(2.0, 0.1 * 2**attempt)
                except Exception as exc:
                    failed = f"{type(exc).__name__}: {exc}"
                    attempt += 1
                    delay = random.random() * min(2.0, 0.1 * 2**attempt)
            await asyncio.sleep(delay)
        v.why = f"gave up connecting after 20 attempts: {failed}"

    # Handshakes in flight per process: past a few dozen, a starved gateway times them out
    # and every retry is wasted work (the 100k attempt under load 50 collapsed so).
    sem = asyncio.Semaphore(64)  # bound to the loop on first use

    def at_target(v: Viewer, target: dict[str, _Pos]) -> bool:
        return v.synced and all(v.at.get(c) == p for c, p in target.items())

    async def settle(viewers: list[Viewer], done: Callable[[Viewer], bool]) -> None:
        """Wait until every viewer is ``done``, or none dials and none has moved (reconnected,
        been answered, caught up) for ``quiet`` seconds: where a viewer is then, it stays."""
        quiet, moved, seen = plan["quiet_s"], time.monotonic(), -1
        while True:
            if moves[0] != seen:
                seen, moved = moves[0], time.monotonic()
                if all(done(v) for v in viewers):
                    return
            elif not dialling[0] and time.monotonic() - moved > quiet:
                return
            await asyncio.sleep(0.1)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        viewers = [Viewer() for _ in range(count)]

        async def keep_alive() -> None:
            # The gateway drops connections it stops hearing: each viewer pings once per
            # ping_s/2, spread over the interval rather than all at once, and from the
            # start: a surge of minutes must not lose its first viewers as silent.
            ping = msgspec.json.encode({"type": "ping", "id": 0})
            turn = 0
            while True:
                await asyncio.sleep(1.0)
                share = max(1, int(len(viewers) / max(1.0, ping_s[0] / 2)))
                for v in viewers[turn : turn + share]:
                    if v.transport is not None:
                        v.transport.send(WSMsgType.TEXT, ping)
                turn = turn + share if turn + share < len(viewers) else 0

        pinger = loop.create_task(keep_alive())
        start, spread = time.time(), plan["arrival_s"]
        await asyncio.gather(
            *(dial(v, start + spread * i / max(1, count)) for i, v in enumerate(viewers))
        )
        await settle(viewers, lambda v: v.synced)
        synced = sum(v.synced for v in viewers)
        surge = (synced, max(admitted or [start]), list(refusal_ms), list(admission_ms))
        out.put(("connected", index, surge))

        while True:
            command, arg = await loop.run_in_executor(None, commands.get)
            if command == "report":
                target = {c: _Pos(p[0], p[1]) for c, p in arg.items()}
                await settle(viewers, functools.partial(at_target, target=target))
                done = time.time()
                # Only a viewer subscribed on a live connection can have lost anything: one
                # still reconnecting was never sent the rest, it is counted apart.
                behind = 0
                for v in viewers:
                    if not v.synced:
                        continue
                    for c, p in target.items():
                        at = v.at.get(c)
                        if at is None or at.epoch != p.epoch:
                            behind += p.offset  # the whole epoch, never told to reload
                        elif at.offset < p.offset:
                            behind += p.offset - at.offset
                now_ms = int(time.time() * 1000)
                for v in viewers:
                    if v.shown is not None:
                        judge(v.shown, now_ms)
                why = sorted({v.why for v in viewers if not v.synced})
                unconnected = sum(not v.synced for v in viewers)
                result = (done, list(latencies), dict(stats), behind, unconnected, why)
                out.put(("report", index, result))
                latencies.clear()
            elif command == "drop":
                for v in viewers:
                    v.synced = False
                    gone, v.transport = v.transport, None  # its close is this drop, not a cut
                    if gone is not None:
                        gone.disconnect()
                await asyncio.sleep(0.05)
                await asyncio.gather(*(dial(v, 0.0) for v in viewers))
                out.put(("reconnected", index, time.time()))
            elif command == "stop":
                pinger.cancel()
                for v in viewers:
                    v.transport = None  # closing at the end is not a cut to redial
                for task in list(tasks):
                    task.cancel()
                return

    asyncio.run(run())


def _as_state(value: _State) -> Any:
    from streamplane.realtime.broker import StateWire

    return StateWire(
        key=value.key,
        value=value.value,
        seq=value.seq,
        source_time_ms=value.source_time_ms,
        max_age_ms=value.max_age_ms,
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class _Source:
    """The publisher of the event channel and the state source, on one real client."""

    def __init__(self, port: int, token: str, state_every: float) -> None:
        from streamplane.realtime.client import RealtimeClient

        self.client = RealtimeClient(
            f"ws://127.0.0.1:{port}", token, backoff_base=0.05, backoff_cap=0.5
        )
        self.top: dict[str, tuple[str, int]] = {}
        self.refused = 0
        self.sent = 0
        self.state_every = state_every
        self.seq = 0
        self._state: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.client.start()
        await asyncio.wait_for(self.client.connected.wait(), 60)
        await self._write_state()
        self._state = asyncio.get_running_loop().create_task(self._state_forever())

    async def stop(self) -> None:
        if self._state is not None:
            self._state.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._state
        await self.client.stop()

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        # A publication the gateway refuses (the broker away: 4503) or that dies with its
        # connection is sent again until it lands: the source must not skip a message.
        while True:
            try:
                return await asyncio.wait_for(call(), 10)
            except Exception:  # refused, timed out, or the connection closed under it
                self.refused += 1
                await asyncio.sleep(0.2)

    async def publish(self, count: int, interval: float) -> None:
        for _ in range(count):
            self.sent += 1
            payload = {"t": time.time(), "n": self.sent}
            reply = await self._retrying(functools.partial(self.client.publish, CHANNEL, payload))
            if reply.position is not None:
                self.top[CHANNEL] = (reply.position.epoch, reply.position.offset)
            await asyncio.sleep(interval)

    async def _write_state(self) -> None:
        self.seq += 1
        now_ms = int(time.time() * 1000)
        max_age = int(self.state_every * 2500)
        truth = {"seq": self.seq, "t_ms": now_ms, "max_age_ms": max_age}
        reply = await self._retrying(
            lambda: self.client.set_state(
                STATE_CHANNEL,
                "score",
                truth,
                seq=self.seq,
                source_time_ms=now_ms,
                max_age_ms=max_age,
            )
        )
        if reply.position is not None:
            self.top[STATE_CHANNEL] = (reply.position.epoch, reply.position.offset)

    async def _state_forever(self) -> None:
        while True:
            await asyncio.sleep(self.state_every)
            await self._write_state()

    async def settle(self) -> dict[str, tuple[str, int]]:
        """Stop writing state and give the positions every viewer must end on."""
        if self._state is not None:
            self._state.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._state
            self._state = None
        # The last write may have been cut short by the cancel: one more, awaited, so that the
        # top is a position the source really holds.
        await self._write_state()
        return dict(self.top)

    def resume(self) -> None:
        if self._state is None:
            self._state = asyncio.get_running_loop().create_task(self._state_forever())


def run_load(
    port: int,
    key: bytes,
    *,
    connections: int,
    processes: int,
    messages: int,
    storm_messages: int,
    interval: float = 0.02,
    arrival_s: float = 0.0,
    state_every: float = 1.0,
    restart_broker: Callable[[], None] | None = None,
    storm: bool = True,
    quiet_s: float = 15.0,
    measure: Callable[[str], None] = lambda phase: None,
) -> LoadReport:
    """Run the scenarios against the gateway on 127.0.0.1:``port`` (tokens signed with ``key``).
    ``measure`` is called at "connected", "broadcast" (the measured broadcast starts) and
    "broadcasted" (every viewer has it), for a caller measuring the gateway meanwhile.
    ``restart_broker``, when given, kills and restarts the broker: the Redis restart runs."""
    if processes < 1 or connections < processes:
        raise ValueError("need at least one process and one connection per process")
    if connections > processes * _MAX_PER_PROCESS:
        raise ValueError(
            f"{connections} connections over {processes} processes is past "
            f"{_MAX_PER_PROCESS} per process (the open-file limit): use more processes"
        )
    if processes > 250:
        raise ValueError("at most 250 load processes (one loopback address each)")
    raise_open_file_limit()
    now = int(time.time())
    viewer = sign_realtime_token(
        key,
        user="v",
        channels={CHANNEL: ["read"], STATE_CHANNEL: ["read"]},
        now=now,
        ttl_s=6 * 3600,
    )
    source_token = sign_realtime_token(
        key,
        user="src",
        channels={CHANNEL: ["read", "publish", "moderate"], STATE_CHANNEL: ["read", "publish"]},
        now=now,
        ttl_s=6 * 3600,
    )
    out: Queue[Any] = Queue()
    commands: list[Queue[Any]] = [Queue() for _ in range(processes)]
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    plan = {"arrival_s": arrival_s, "quiet_s": quiet_s}
    loads = [
        Process(target=_load, args=(i, port, shares[i], viewer, out, commands[i], plan))
        for i in range(processes)
    ]

    def gather(kind: str, timeout: float) -> list[Any]:
        got = []
        for _ in loads:
            item = out.get(timeout=timeout)
            assert item[0] == kind, item
            got.append(item[2])
        return got

    def report(target: dict[str, tuple[str, int]]) -> list[Any]:
        for q in commands:
            q.put(("report", target))
        return gather("report", 600)

    async def orchestrate() -> LoadReport:
        loop = asyncio.get_running_loop()
        source = _Source(port, source_token, state_every)
        await source.start()
        try:
            t0 = time.time()
            for p in loads:
                p.start()
            connected = await loop.run_in_executor(None, gather, "connected", 1800)
            held = sum(c[0] for c in connected)
            connect_s = max(c[1] for c in connected) - t0
            await asyncio.sleep(1.5)
            measure("connected")
            await source.publish(messages, interval)
            first = await loop.run_in_executor(None, report, await source.settle())
            source.resume()
            measure("broadcast")
            await source.publish(messages, interval)
            steady = await loop.run_in_executor(None, report, await source.settle())
            measure("broadcasted")
            lat = [x for r in first + steady for x in r[1]]
            applied = sum(r[2]["applied"] for r in steady) - sum(r[2]["applied"] for r in first)
            # the storm: everyone drops at once; messages go on meanwhile
            stormed, storm0 = steady, time.time()
            if storm:
                source.resume()
                for q in commands:
                    q.put(("drop", None))
                await source.publish(storm_messages, interval)
                await loop.run_in_executor(None, gather, "reconnected", 1800)
                stormed = await loop.run_in_executor(None, report, await source.settle())
            last = stormed
            restart = None
            if restart_broker is not None:
                source.resume()
                refused0 = source.refused
                before = stormed
                publishing = loop.create_task(source.publish(max(4, storm_messages), 0.25))
                await asyncio.sleep(0.5)
                killed = time.time()
                await loop.run_in_executor(None, restart_broker)
                await publishing
                after = await loop.run_in_executor(None, report, await source.settle())
                restart = RestartReport(
                    recovered_s=max(r[0] for r in after) - killed,
                    lost=sum(r[3] for r in after),
                    repeats=_delta(after, before, "repeats"),
                    reloads=_delta(after, before, "reloads"),
                    refused=source.refused - refused0,
                    unconnected=sum(r[4] for r in after),
                )
                last = after
        finally:
            for q in commands:
                q.put(("stop", None))
            await source.stop()
        return LoadReport(
            held=held,
            connect_s=connect_s,
            refused=sum(r[2]["refused"] for r in first),
            early_retries=sum(r[2]["early"] for r in last),
            refusal_ms=[ms for c in connected for ms in c[2]],
            admission_ms=[ms for c in connected for ms in c[3]],
            without_retry_after=sum(r[2]["without_retry_after"] for r in last),
            latencies=lat,
            deliveries=applied,
            holes=sum(r[2]["holes"] for r in stormed),
            repeats=sum(r[2]["repeats"] for r in stormed),
            storm_s=max(r[0] for r in stormed) - storm0 if storm else float("nan"),
            lost=sum(r[3] for r in stormed),
            reloads=_delta(stormed, steady, "reloads"),
            unconnected=sum(r[4] for r in stormed),
            redials=sum(r[2]["redials"] for r in stormed),
            handshakes_cut=sum(r[2]["handshakes_cut"] for r in last),
            why_unconnected=sorted({w for r in last for w in r[5]}),
            state_values=sum(r[2]["state_values"] for r in last),
            stale_shown=sum(r[2]["stale_shown"] for r in last),
            stale_as_current=sum(r[2]["stale_as_current"] for r in last),
            restart=restart,
        )

    try:
        return asyncio.run(orchestrate())
    finally:
        for p in loads:
            p.join(30)
            if p.is_alive():
                p.kill()


def _delta(now: list[Any], before: list[Any], key: str) -> int:
    return int(sum(r[2][key] for r in now) - sum(r[2][key] for r in before))


# -- a private stack: Redis and gateway processes of the run's own -------------------------------


class LoadStack:
    """A private ``redis-server`` (no persistence) and ``streamplane gateway --processes G`` on
    it, for a load run that may restart the broker: never the shared Redis."""

    def __init__(
        self,
        key: bytes,
        *,
        gateways: int,
        port: int | None = None,
        admission_rate: float = 2_000.0,
        admission_burst: int = 4_000,
    ) -> None:
        self.key = key
        self.gateways = gateways
        self.port = port or free_port()
        self.redis_port = free_port()
        self.admission = (admission_rate, admission_burst)
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-load-"))
        self.redis: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    def _start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.redis = subprocess.Popen(
            [server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--maxclients", "10000",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_setup(signal.SIGTERM),
        )  # fmt: skip
        _wait_port(self.redis_port, 20, self.redis, "redis-server")

    def restart_redis(self) -> None:
        """kill -9 and start again on the same port, empty: a crashed Redis without persistence."""
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(10)
        time.sleep(1.0)  # away long enough for every gateway process to notice
        self._start_redis()

    def gateway_pids(self) -> list[int]:
        assert self.gateway is not None
        if self.gateways == 1:
            return [self.gateway.pid]
        path = Path(f"/proc/{self.gateway.pid}/task/{self.gateway.pid}/children")
        # The processes are spawned, and spawning starts multiprocessing's resource tracker
        # beside them: a child too, but no gateway (its memory and CPU are not the gateway's).
        return [
            int(p) for p in path.read_text().split() if b"resource_tracker" not in _cmdline(int(p))
        ]

    def gateway_stats(self, attempts: int = 60) -> dict[str, dict[str, Any]]:
        """Each gateway process's /health (its counts: accepted, refused, handshake_timeouts,
        ...), by node. The kernel hands each request to one process of the port: asked until
        every process has answered or ``attempts`` run out."""
        import urllib.error
        import urllib.request

        seen: dict[str, dict[str, Any]] = {}
        url = f"http://127.0.0.1:{self.port}/health"
        for _ in range(attempts):
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    body = answer.read()
            except urllib.error.HTTPError as err:  # 503: degraded, the counts are still there
                body = err.read()
            health = msgspec.json.decode(body)
            seen[str(health["node"])] = health
            if len(seen) >= self.gateways:
                break
        return seen

    @staticmethod
    def still_running(pids: list[int]) -> int:
        """How many of ``pids`` (``gateway_pids()`` before the run) still run: a gateway that
        fell over under the load is gone or a zombie."""
        alive = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                alive += state not in ("Z", "X")
        return alive

    def __enter__(self) -> LoadStack:
        self._start_redis()
        env = {
            **os.environ,
            "STREAMPLANE_REALTIME_TOKEN_KEY": self.key.hex(),
            "STREAMPLANE_REALTIME_BROKER": f"redis://127.0.0.1:{self.redis_port}",
            "STREAMPLANE_REALTIME_ADMISSION_RATE": str(self.admission[0]),
            "STREAMPLANE_REALTIME_ADMISSION_BURST": str(self.admission[1]),
        }
        log = (self.workdir / "gateway.log").open("wb")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "streamplane", "gateway", "--port", str(self.port),
             "--processes", str(self.gateways)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=child_setup(signal.SIGTERM),
        )  # fmt: skip
        try:
            _wait_port(self.port, 60, self.gateway, "streamplane gateway")
            deadline = time.monotonic() + 60
            while len(self.gateway_pids()) < self.gateways and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # every child listening, not only the first
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for proc in (self.gateway, self.redis):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self) -> str:
        path = self.workdir / "gateway.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], name: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def processes_for(connections: int) -> int:
    """The fewest processes that hold ``connections`` under the open-file limit."""
    return max(1, -(-connections // 15_000))
