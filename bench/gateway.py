"""The realtime gateway under load: connections held, RSS per connection, broadcast latency to
everyone, deliveries per CPU-second, and a reconnect storm (recovery time, messages lost).

Method: one `streamplane gateway` process (in-memory broker), and P load processes, each opening
its share of N WebSocket connections (picows clients, so the load side is cheap) from its own
loopback address (127.0.0.2, 127.0.0.3, ...: past one address's ephemeral ports), all
subscribed to one channel. A publisher sends M messages carrying their send time; each client
checks it applies offsets 1, 2, 3, ... with no hole and no repeat and records the latency.
Then the storm: every client drops its connection at once, K more messages are published while
they are away, and all reconnect (full-jitter backoff, capped at 2 s) with their last position:
recovery time is until every client holds every message; lost counts holes left. Measured from
/proc: the gateway's RSS growth per connection and its CPU seconds during the broadcast.
The peer, run in the same run on the same N and M: the bare sans-I/O broadcast server of
bench/ws_impl.py (no tokens, channels, cursors or history): the ratio is what the gateway's
protocol and bookkeeping cost.

    .venv/bin/python bench/gateway.py --connections 5000 --processes 2 --messages 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from multiprocessing import Process, Queue
from typing import Any

import httpx
import msgspec

from streamplane.realtime.tokens import sign_realtime_token
from streamplane.stack import free_port

CHANNEL = "event:bench"


class _Frame(msgspec.Struct):
    type: str
    offset: int = 0
    epoch: str = ""
    data: dict[str, float] | None = None
    channels: list[dict[str, Any]] | None = None


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(index: int, port: int, count: int, token: str, out: Any, commands: Any) -> None:
    from picows import WSListener, WSMsgType, ws_connect

    decoder = msgspec.json.Decoder(_Frame)
    latencies: list[float] = []
    stats = {"holes": 0, "repeats": 0}

    class Viewer(WSListener):  # type: ignore[misc]
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
                return

    asyncio.run(run())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--storm-messages", type=int, default=20)
    args = parser.parse_args()
    print(__doc__.split("\n\n")[1])
    key = secrets.token_bytes(32)
    port = free_port()
    env = {
        **os.environ,
        "STREAMPLANE_REALTIME_TOKEN_KEY": key.hex(),
        "STREAMPLANE_REALTIME_ADMISSION_RATE": "20000",
        "STREAMPLANE_REALTIME_ADMISSION_BURST": "20000",
    }
    gateway = subprocess.Popen(
        [sys.executable, "-m", "streamplane", "gateway", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        now = int(time.time())
        viewer = sign_realtime_token(
            key, user="v", channels={CHANNEL: ["read"]}, now=now, ttl_s=3600
        )
        source = sign_realtime_token(
            key,
            user="src",
            channels={CHANNEL: ["read", "publish", "moderate"]},
            now=now,
            ttl_s=3600,
        )
        base = _rss_kb(gateway.pid)
        out: Queue[Any] = Queue()
        commands = [Queue() for _ in range(args.processes)]  # type: ignore[var-annotated]
        share = args.connections // args.processes
        loads = [
            Process(target=_load, args=(i, port, share, viewer, out, commands[i]))
            for i in range(args.processes)
        ]
        t0 = time.perf_counter()
        for p in loads:
            p.start()
        held = sum(out.get(timeout=300)[2] for _ in loads)
        connect_s = time.perf_counter() - t0
        time.sleep(1.5)
        rss = _rss_kb(gateway.pid)
        asyncio.run(_publish(port, source, args.messages, 0))
        cpu0 = _cpu_s(gateway.pid)
        asyncio.run(_publish(port, source, args.messages, args.messages))
        for q in commands:
            q.put(("report", 2 * args.messages))
        reports = [out.get(timeout=120)[2] for _ in loads]
        cpu = _cpu_s(gateway.pid) - cpu0
        lat = [x for r in reports for x in r[1]]
        holes = sum(r[2]["holes"] for r in reports)
        repeats = sum(r[2]["repeats"] for r in reports)
        # the storm: everyone drops at once; messages go on meanwhile
        storm0 = time.time()
        for q in commands:
            q.put(("drop", None))
        asyncio.run(_publish(port, source, args.storm_messages, 2 * args.messages))
        for _ in loads:
            out.get(timeout=300)
        total = 2 * args.messages + args.storm_messages
        for q in commands:
            q.put(("report", total))
        storm = [out.get(timeout=300)[2] for _ in loads]
        recovered_s = max(r[0] for r in storm) - storm0
        lost = sum(r[3] for r in storm)
        holes_storm = sum(r[2]["holes"] for r in storm)
        for q in commands:
            q.put(("stop", None))
        for p in loads:
            p.join(30)
        deliveries = held * args.messages
        print(
            f"connections held      {held} (opened in {connect_s:.1f} s"
            f" from {args.processes} addresses)"
        )
        print(
            f"gateway RSS           {rss / 1024:.0f} MB;"
            f" {(rss - base) / max(1, held):.1f} KB per connection"
        )
        print(
            f"broadcast latency     p50 {_pct(lat, 0.5) * 1000:.0f} ms,"
            f" p99 {_pct(lat, 0.99) * 1000:.0f} ms ({len(lat)} deliveries)"
        )
        print(f"deliveries / CPU-s    {deliveries / max(cpu, 1e-9):,.0f} (gateway process)")
        print(
            f"reconnect storm       all {held} back and recovered in {recovered_s:.1f} s;"
            f" {args.storm_messages} published meanwhile"
        )
        print(
            f"lost                  {lost}"
            f" (holes applied: {holes + holes_storm}, repeats: {repeats})"
        )
        print("stale shown as current: not exercised here (state channels: tests/realtime)")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ws_impl import measure

        bare = measure("websockets", held, args.messages)
        gateway_kb = (rss - base) / max(1, held)
        gateway_rate = deliveries / max(cpu, 1e-9)
        print(
            f"bare sans-I/O server  {bare['kb_per_conn']:.1f} KB per connection,"
            f" {bare['deliveries_per_cpu_s']:,.0f} deliveries / CPU-s; gateway / bare:"
            f" memory x{gateway_kb / bare['kb_per_conn']:.2f},"
            f" deliveries per CPU-s x{gateway_rate / bare['deliveries_per_cpu_s']:.2f}"
        )
        print(
            f"command: {sys.executable} bench/gateway.py --connections {args.connections}"
            f" --processes {args.processes} --messages {args.messages}"
        )
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)


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


if __name__ == "__main__":
    main()
