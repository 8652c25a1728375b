"""`streamplane gateway-load`: many real WebSocket viewers against a gateway, and the scenarios
they run: steady fan-out (every viewer checks it applies offsets 1, 2, 3, ... with no hole and no
repeat, and records each message's latency), and a reconnect storm (every viewer drops its
connection at once, messages go on meanwhile, all reconnect with full-jitter backoff and their
last position; the time until every viewer holds every message, and what is left missing).

Viewers are picows clients (a few KB each, so the load side stays cheap), spread over P
processes, each from its own loopback address (127.0.0.2, 127.0.0.3, ...) to get past one
address's ephemeral ports.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from multiprocessing import Process, Queue
from typing import Any

import msgspec

from streamplane.realtime.tokens import sign_realtime_token

__all__ = ["CHANNEL", "LoadReport", "percentile", "run_load"]

CHANNEL = "event:load"


class LoadReport(msgspec.Struct, kw_only=True):
    held: int
    connect_s: float
    latencies: list[float]
    deliveries: int
    holes: int
    repeats: int
    storm_s: float
    lost: int


class _Frame(msgspec.Struct):
    type: str
    offset: int = 0
    epoch: str = ""
    data: dict[str, float] | None = None
    channels: list[dict[str, Any]] | None = None


def _load(index: int, port: int, count: int, token: str, out: Any, commands: Any) -> None:
    from picows import WSListener, WSMsgType, ws_connect

    decoder = msgspec.json.Decoder(_Frame)
    latencies: list[float] = []
    stats = {"holes": 0, "repeats": 0}

    class Viewer(WSListener):
        def __init__(self) -> None:
            self.position: dict[str, Any] | None = None
            self.transport: Any = None
            self.synced = False

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            item: dict[str, Any] = {"channel": CHANNEL}
            if self.position is not None:
                item["since"] = self.position
            frame = {"type": "subscribe", "id": 1, "channels": [item]}
            transport.send(WSMsgType.TEXT, msgspec.json.encode(frame))

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type != WSMsgType.TEXT:
                return
            msg = decoder.decode(frame.get_payload_as_bytes())
            if msg.type == "subscribed" and msg.channels:
                answer = msg.channels[0]
                if answer["recovered"]:
                    for pub in answer["publications"]:
                        self._apply(pub["epoch"], pub["offset"], None)
                else:
                    self.position = answer["position"]
                self.synced = True
            elif msg.type == "pub":
                self._apply(msg.epoch, msg.offset, msg.data)

        def _apply(self, epoch: str, offset: int, data: dict[str, float] | None) -> None:
            at = self.position
            if at is not None and at["epoch"] == epoch and offset <= at["offset"]:
                stats["repeats"] += 1
                return
            if at is None or at["epoch"] != epoch or offset != at["offset"] + 1:
                stats["holes"] += 1
            self.position = {"epoch": epoch, "offset": offset}
            if data is not None and "t" in data:
                latencies.append(time.time() - data["t"])

    async def connect_all(viewers: list[Viewer]) -> None:
        host = f"127.0.0.{2 + index}"
        sem = asyncio.Semaphore(200)

        async def one(v: Viewer) -> None:
            delay = 0.0
            for attempt in range(20):
                await asyncio.sleep(delay)
                async with sem:
                    try:
                        await ws_connect(
                            lambda: v,
                            f"ws://127.0.0.1:{port}/connect?token={token}",
                            local_addr=(host, 0),
                            read_buffer_init_size=1024,
                        )
                        return
                    except Exception:
                        delay = random.random() * min(2.0, 0.1 * 2**attempt)

        await asyncio.gather(*(one(v) for v in viewers))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        viewers = [Viewer() for _ in range(count)]
        await connect_all(viewers)
        while not all(v.synced for v in viewers):
            await asyncio.sleep(0.05)
        out.put(("connected", index, sum(v.transport is not None for v in viewers)))

        async def keep_alive() -> None:  # the gateway drops connections it stops hearing
            ping = msgspec.json.encode({"type": "ping", "id": 0})
            while True:
                await asyncio.sleep(5)
                for v in viewers:
                    if v.transport is not None and v.synced:
                        v.transport.send(WSMsgType.TEXT, ping)

        pinger = loop.create_task(keep_alive())
        while True:
            command, arg = await loop.run_in_executor(None, commands.get)
            if command == "report":
                want = arg
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not all(
                    v.position is not None and v.position["offset"] >= want for v in viewers
                ):
                    await asyncio.sleep(0.02)
                done = time.time()
                behind = sum(
                    want - (v.position["offset"] if v.position else 0)
                    for v in viewers
                    if v.position is None or v.position["offset"] < want
                )
                out.put(("report", index, (done, list(latencies), dict(stats), behind)))
                latencies.clear()
            elif command == "drop":
                for v in viewers:
                    v.synced = False
                    v.transport.disconnect()
                await asyncio.sleep(0.05)
                await connect_all(viewers)
                out.put(("reconnected", index, time.time()))
            elif command == "stop":
                pinger.cancel()
                return

    asyncio.run(run())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _publish(port: int, token: str, count: int, start: int) -> None:
    from streamplane.realtime.client import RealtimeClient

    client = RealtimeClient(f"ws://127.0.0.1:{port}", token)
    client.start()
    try:
        for i in range(count):
            await client.publish(CHANNEL, {"t": time.time(), "n": start + i})
            await asyncio.sleep(0.02)
    finally:
        await client.stop()


def run_load(
    port: int,
    key: bytes,
    *,
    connections: int,
    processes: int,
    messages: int,
    storm_messages: int,
    measure: Callable[[str], None] = lambda phase: None,
) -> LoadReport:
    """Run the scenarios against the gateway on 127.0.0.1:``port`` (tokens signed with ``key``).
    ``measure`` is called at "connected", "broadcast" (the measured broadcast starts) and
    "broadcasted" (every viewer has it), for a caller measuring the gateway meanwhile."""
    now = int(time.time())
    viewer = sign_realtime_token(key, user="v", channels={CHANNEL: ["read"]}, now=now, ttl_s=3600)
    source = sign_realtime_token(
        key, user="src", channels={CHANNEL: ["read", "publish", "moderate"]}, now=now, ttl_s=3600
    )
    out: Queue[Any] = Queue()
    commands: list[Queue[Any]] = [Queue() for _ in range(processes)]
    share = connections // processes
    loads = [
        Process(target=_load, args=(i, port, share, viewer, out, commands[i]))
        for i in range(processes)
    ]
    t0 = time.perf_counter()
    for p in loads:
        p.start()
    held = sum(out.get(timeout=300)[2] for _ in loads)
    connect_s = time.perf_counter() - t0
    time.sleep(1.5)
    measure("connected")
    asyncio.run(_publish(port, source, messages, 0))
    measure("broadcast")
    asyncio.run(_publish(port, source, messages, messages))
    for q in commands:
        q.put(("report", 2 * messages))
    reports = [out.get(timeout=120)[2] for _ in loads]
    measure("broadcasted")
    lat = [x for r in reports for x in r[1]]
    holes = sum(r[2]["holes"] for r in reports)
    repeats = sum(r[2]["repeats"] for r in reports)
    # the storm: everyone drops at once; messages go on meanwhile
    storm0 = time.time()
    for q in commands:
        q.put(("drop", None))
    asyncio.run(_publish(port, source, storm_messages, 2 * messages))
    for _ in loads:
        out.get(timeout=300)
    total = 2 * messages + storm_messages
    for q in commands:
        q.put(("report", total))
    storm = [out.get(timeout=300)[2] for _ in loads]
    for q in commands:
        q.put(("stop", None))
    for p in loads:
        p.join(30)
    return LoadReport(
        held=held,
        connect_s=connect_s,
        latencies=lat,
        deliveries=held * messages,
        holes=holes + sum(r[2]["holes"] for r in storm),
        repeats=repeats + sum(r[2]["repeats"] for r in storm),
        storm_s=max(r[0] for r in storm) - storm0,
        lost=sum(r[3] for r in storm),
    )
