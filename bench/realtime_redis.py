"""Realtime Redis engine: what one Redis process costs per publication and per delivery.

Method
  A private ``redis-server`` (no persistence, as the engine runs it) on a free loopback port.
  One hot channel, as a live event's chat is: whatever the cluster size, one channel lives on
  one shard, so this is the figure a hot channel is sized by.
  Engine side: the exact command the engine sends for a publication (``EVALSHA`` of its publish
  script with the arguments ``RedisBroker`` builds: a 160-byte chat message, history 100 kept
  300 s): offset, ``XADD``, trim, ``PUBLISH``. Peer side, in the same run, alternating: the
  floor any Redis fan-out pays, a bare ``PUBLISH`` of the same payload bytes.
  Load: 4 connections, each a pipeline of 64 commands in flight (pre-encoded RESP written in
  batches, replies parsed with hiredis), in rounds of ``--publishes`` until the Redis process
  has spent ``--cpu-seconds`` of CPU on the side (its clock ticks are 10 ms). Subscribers:
  ``S`` pub/sub connections to the channel, as ``S`` gateway processes each hold one, read in a
  separate process that counts bytes (so they keep up and Redis never cuts them).
  Measures, per side and per ``S``: publications per second (wall), and per CPU-second of the
  Redis process (utime + stime from /proc, so other load on the machine counts less); deliveries
  per Redis CPU-second = publications x S / CPU-seconds. Best of ``--repeat`` rounds.
  And recoveries: the engine's read script for a client 10 publications behind (the range
  read a reconnecting client costs), per second and per Redis CPU-second, no subscribers.

Storm (``--storm N``, run on its own): what a reconnect storm costs Redis, three sides in the
same run, alternating, each on its own key prefix: the gateway as it runs (recoveries from its
tail; the channel is large, so its presence is one share per process); presence per viewer (the
namespace's diff limit raised past ``N``: every viewer an entry, joined and left one by one, as
every channel was before shares); and no tail (``tail_size=0``: every recovery reads the
stream). One gateway process on the private
Redis; ``N`` viewers (the project's ``RealtimeClient``) and a host that stays subscribed (the
channel stays on the process, as it does while any of its viewers is connected) on one chat
channel; 20 publications from another node (another process's publisher); then every viewer's
connection is aborted, 20 more publications go out while they are away, and the viewers
reconnect (full jitter, 0.5 s base) and recover.
Measured from the drop until every viewer holds all 40, once and in order: Redis commands
(``INFO commandstats``, every command, the gateway's presence leaves and joins and its ticks
included), recoveries answered by Redis and by the tail, Redis CPU.

At rest (``--at-rest N``, run on its own): what a gateway tick costs Redis. One gateway process
on the private Redis, ``N`` viewers (distinct users) on one chat channel (past the chat
namespace's diff limit, 100, the channel is large and its presence the process's share); after
3 s settled, the Redis commands of the next 10 s (``INFO commandstats``, by command) divided by
the gateway's ticks in them.

Moved (``--move N``, run on its own): what it costs Redis when a large channel's viewers come
back through another process. Two gateway processes' nodes (in this one Python process) on the
private Redis, a host on each, ``N`` viewers on the first (``presence_ttl`` 2 s); every viewer
leaves it and connects through the second. Measured: the Redis commands (by command) from the
move until the second holds them all and the first's share has let them go (presence_ttl and
three ticks later), and, for comparison, the same gateways' commands per tick at rest.

Reproduce: .venv/bin/python bench/realtime_redis.py [--cpu-seconds 1] [--subscribers 0,50,200]
           .venv/bin/python bench/realtime_redis.py --storm 200 [--repeat 2]
           .venv/bin/python bench/realtime_redis.py --at-rest 200
           .venv/bin/python bench/realtime_redis.py --move 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import secrets
import selectors
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import hiredis
import msgspec
import redis.asyncio as aioredis

from streamplane.lifetime import child_setup
from streamplane.realtime.broker import Position
from streamplane.realtime.client import RealtimeClient
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.protocol import DEFAULT_NAMESPACES
from streamplane.realtime.redis import RedisBroker, _Body, _pack, channel_key
from streamplane.realtime.tokens import sign_realtime_token
from streamplane.reporting import Table, markdown_table
from streamplane.stack import free_port

CHANNEL = "chat:final"
PREFIX = "bench:"
MESSAGE = b'{"text":"' + b"x" * 140 + b'","n":1}'  # ~160 bytes: a chat line with its fields
CONNECTIONS = 4
WINDOW = 64
RECOVER_MISSED = 10


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            # Subscribers read in another process; never cut one for being a little behind.
            "--client-output-buffer-limit",
            "pubsub 0 0 0",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=child_setup(),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscribers(port: int, count: int, name: bytes, ready: Connection, stop: Connection) -> None:
    """In its own process: ``count`` subscribed connections, read until told to stop."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(_pack("SUBSCRIBE", name))
        s.recv(1 << 16)  # the confirmation
        s.setblocking(False)
        socks.append(s)
    ready.send(True)
    received = 0
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    while not stop.poll():
        for key, _ in selector.select(timeout=0.05):
            with contextlib.suppress(BlockingIOError):
                received += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]
    stop.send(received)


async def blast(port: int, command: bytes, total: int) -> float:
    """Send ``total`` copies of ``command`` over CONNECTIONS pipelines; the wall seconds."""

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        parser = hiredis.Reader()
        done = 0
        while done < count:
            batch = min(WINDOW, count - done)
            writer.write(command * batch)
            got = 0
            while got < batch:
                parser.feed(await reader.read(1 << 16))
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise SystemExit(f"Redis refused the command: {reply}")
                    got += 1
            done += batch
        writer.close()

    share = total // CONNECTIONS
    start = time.perf_counter()
    await asyncio.gather(*(one(share) for _ in range(CONNECTIONS)))
    return time.perf_counter() - start


async def engine_command(port: int) -> tuple[bytes, bytes, bytes]:
    """The engine's publish command, byte for byte, and the same payload as a bare PUBLISH."""
    broker = RedisBroker(aioredis.Redis(port=port), prefix=PREFIX)
    await broker.start()
    await broker.publish(CHANNEL, MESSAGE, history_size=100, history_ttl=300.0)
    body = _Body(kind="message", user="viewer-1", time_ms=int(time.time() * 1000), data=MESSAGE)
    args = broker._append_args(CHANNEL, body, 100, 300.0)
    keys = [channel_key(PREFIX, CHANNEL, "m"), channel_key(PREFIX, CHANNEL, "h")]
    sha = broker._publish.sha
    for _ in range(RECOVER_MISSED):
        top = await broker.publish(CHANNEL, MESSAGE, history_size=100, history_ttl=300.0)
    # A client RECOVER_MISSED publications behind, at the top of the stream as it will stay
    # (the recovery rounds run with no publication in between).
    await broker.recover(CHANNEL, Position(top.epoch, top.offset - RECOVER_MISSED), limit=100)
    recover = _pack(
        "EVALSHA", broker._read.sha, 2, *keys,
        "unused", broker.meta_ttl_ms, "range", top.epoch, top.offset - RECOVER_MISSED + 1, 100,
    )  # fmt: skip
    await broker.close()
    engine = _pack("EVALSHA", sha, 2, *keys, *args)
    payload = b"epoch1 123456 " + bytes(args[1])  # what the script publishes
    bare = _pack("PUBLISH", channel_key(PREFIX, CHANNEL, "p"), payload)
    return engine, bare, recover


STORM_KEY = b"s" * 32
STORM_PUBLISHES = 20


async def redis_totals(client: aioredis.Redis) -> int:
    """Every command Redis has run (``INFO`` itself excepted)."""
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def storm_side(
    port: int, pid: int, viewers: int, *, tail: bool, per_viewer: bool
) -> list[str]:
    """One storm on a fresh gateway; the row of the table."""
    prefix = f"storm{secrets.token_hex(4)}:"
    broker = RedisBroker.connect(f"redis://127.0.0.1:{port}", prefix=prefix)
    chat = DEFAULT_NAMESPACES["chat"]
    limit = viewers + 10 if per_viewer else chat.presence_diff_limit
    settings = GatewaySettings(
        token_key=STORM_KEY,
        tail_size=1_000 if tail else 0,
        admission_rate=1e6,
        admission_burst=10**6,
        namespaces={
            **DEFAULT_NAMESPACES,
            "chat": msgspec.structs.replace(chat, presence_diff_limit=limit),
        },
    )
    gateway = Gateway(broker, settings)
    url = f"ws://127.0.0.1:{await gateway.start('127.0.0.1', 0)}"
    now = int(time.time())

    def token(user: str, rights: list[str]) -> str:
        return sign_realtime_token(
            STORM_KEY, user=user, channels={"chat:*": rights}, now=now, ttl_s=3600
        )

    host = RealtimeClient(url, token("host", ["read"]), channels=[CHANNEL])
    # The publisher is another process's node, so the storm here cannot hold its messages up.
    source = RedisBroker.connect(f"redis://127.0.0.1:{port}", prefix=prefix)
    crowd = [
        RealtimeClient(url, token(f"v{i}", ["read"]), channels=[CHANNEL], backoff_base=0.5)
        for i in range(viewers)
    ]
    stats = aioredis.Redis(port=port)
    try:
        for client in (host, *crowd):
            client.start()
        for client in (host, *crowd):
            await asyncio.wait_for(client.synced.wait(), 60)
        for n in range(STORM_PUBLISHES):
            await source.publish(CHANNEL, b'{"n":%d}' % n, history_size=100, history_ttl=600.0)

        def holding(count: int) -> bool:
            return all(
                [m.offset for m in c.views[CHANNEL].messages] == list(range(1, count + 1))
                for c in crowd
            )

        async def until(condition: Callable[[], bool]) -> None:
            async with asyncio.timeout(120):
                while not condition():
                    await asyncio.sleep(0.02)

        await until(lambda: holding(STORM_PUBLISHES))
        before = dict(gateway.stats)
        commands, cpu, start = await redis_totals(stats), cpu_seconds(pid), time.perf_counter()
        for conn in list(gateway.connections):  # a network blip: every viewer drops at once
            if conn.grant is not None and conn.grant.user != "host" and conn.transport:
                conn.transport.abort()
        for n in range(STORM_PUBLISHES, 2 * STORM_PUBLISHES):
            await source.publish(CHANNEL, b'{"n":%d}' % n, history_size=100, history_ttl=600.0)
        await until(lambda: holding(2 * STORM_PUBLISHES) and all(c.connects == 2 for c in crowd))
        wall = time.perf_counter() - start
        cpu, commands = cpu_seconds(pid) - cpu, await redis_totals(stats) - commands - 1
        reloads = sum(c.views[CHANNEL].reloads - 1 for c in crowd)
        delta = {k: gateway.stats[k] - before.get(k, 0) for k in gateway.stats}
        side = "presence per viewer" if per_viewer else "presence per process"
        return [
            f"{side}, {'tail' if tail else 'no tail (every recovery reads Redis)'}",
            str(viewers),
            f"{commands:,}",
            f"{commands / viewers:.2f}",
            str(delta["broker_recoveries"]),
            str(delta["tail_recoveries"]),
            f"{cpu * 1000:.0f}",
            f"{wall:.1f}",
            str(reloads),
        ]
    finally:
        for client in (host, *crowd):
            await client.stop()
        await gateway.close()
        await source.close()
        await stats.aclose()


def storm(viewers: int, repeat: int) -> None:
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            for _ in range(repeat):
                for tail, per_viewer in ((True, False), (True, True), (False, False)):
                    row = storm_side(port, proc.pid, viewers, tail=tail, per_viewer=per_viewer)
                    rows.append(asyncio.run(row))
        finally:
            proc.kill()
            proc.wait()
    table = Table(
        headers=[
            "side",
            "viewers",
            "Redis commands in the storm",
            "per viewer",
            "recoveries read from Redis",
            "recoveries from the tail",
            "Redis CPU ms",
            "storm s",
            "reloads",
        ],
        rows=rows,
        right=frozenset({1, 2, 3, 4, 5, 6, 7, 8}),
    )
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("\n".join(markdown_table(table)))
    print(f"\n.venv/bin/python bench/realtime_redis.py {shlex.join(sys.argv[1:])}")


async def at_rest(viewers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        broker = RedisBroker.connect(f"redis://127.0.0.1:{port}", prefix=PREFIX)
        settings = GatewaySettings(token_key=STORM_KEY, admission_rate=1e6, admission_burst=10**6)
        gateway = Gateway(broker, settings)
        url = f"ws://127.0.0.1:{await gateway.start('127.0.0.1', 0)}"
        now = int(time.time())
        crowd = [
            RealtimeClient(
                url,
                sign_realtime_token(
                    STORM_KEY, user=f"v{i}", channels={"chat:*": ["read"]}, now=now, ttl_s=3600
                ),
                channels=[CHANNEL],
            )
            for i in range(viewers)
        ]
        stats = aioredis.Redis(port=port)
        try:
            for client in crowd:
                client.start()
            for client in crowd:
                await asyncio.wait_for(client.synced.wait(), 60)
            await asyncio.sleep(3)
            ticks, before = gateway._ticks, await stats.info("commandstats")
            await asyncio.sleep(10)
            after = await stats.info("commandstats")
            ticks = gateway._ticks - ticks
        finally:
            for client in crowd:
                await client.stop()
            await gateway.close()
            await stats.aclose()
            proc.kill()
            proc.wait()
    was = {name: int(v["calls"]) for name, v in before.items()}
    calls = {
        name.removeprefix("cmdstat_"): int(v["calls"]) - was.get(name, 0)
        for name, v in after.items()
        if name != "cmdstat_info"
    }
    calls = {name: n for name, n in sorted(calls.items(), key=lambda kv: -kv[1]) if n}
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{viewers} viewers, one large channel, one gateway process, {ticks} ticks")
    print(f"Redis commands per tick: {sum(calls.values()) / max(ticks, 1):.1f}")
    print("by command:", ", ".join(f"{name} {n}" for name, n in calls.items()))
    print(f"\n.venv/bin/python bench/realtime_redis.py {shlex.join(sys.argv[1:])}")


async def moved(viewers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        settings = GatewaySettings(
            token_key=STORM_KEY, admission_rate=1e6, admission_burst=10**6, presence_ttl=2.0
        )
        gateways = [
            Gateway(RedisBroker.connect(f"redis://127.0.0.1:{port}", prefix=PREFIX), settings)
            for _ in range(2)
        ]
        urls = [f"ws://127.0.0.1:{await g.start('127.0.0.1', 0)}" for g in gateways]
        now = int(time.time())

        def viewer(url: str, user: str) -> RealtimeClient:
            rights = {"chat:*": ["read"]}
            tok = sign_realtime_token(STORM_KEY, user=user, channels=rights, now=now, ttl_s=3600)
            return RealtimeClient(url, tok, channels=[CHANNEL])

        hosts = [viewer(url, f"host{i}") for i, url in enumerate(urls)]
        first = [viewer(urls[0], f"v{i}") for i in range(viewers)]
        second = [viewer(urls[1], f"v{i}") for i in range(viewers)]
        stats = aioredis.Redis(port=port)

        async def calls() -> dict[str, int]:
            info = await stats.info("commandstats")
            return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}

        def since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
            diff = {k: n - before.get(k, 0) for k, n in after.items() if k != "info"}
            return {k: n for k, n in sorted(diff.items(), key=lambda kv: -kv[1]) if n}

        try:
            for client in (*hosts, *first):
                client.start()
            for client in (*hosts, *first):
                await asyncio.wait_for(client.synced.wait(), 60)
            await asyncio.sleep(3)
            ticks, before = sum(g._ticks for g in gateways), await calls()
            await asyncio.sleep(5)
            rest = since(before, await calls())
            rest_ticks = sum(g._ticks for g in gateways) - ticks
            ticks, before, start = sum(g._ticks for g in gateways), await calls(), time.monotonic()
            for client in first:
                await client.stop()
            for client in second:
                client.start()
            for client in second:
                await asyncio.wait_for(client.synced.wait(), 60)
            await asyncio.sleep(settings.presence_ttl + 4 * settings.tick)
            move = since(before, await calls())
            move_ticks = sum(g._ticks for g in gateways) - ticks
            wall = time.monotonic() - start
        finally:
            for client in (*hosts, *first, *second):
                await client.stop()
            for gateway in gateways:
                await gateway.close()
            await stats.aclose()
            proc.kill()
            proc.wait()
    at_rest = sum(rest.values()) / max(rest_ticks, 1)
    total = sum(move.values())
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{viewers} viewers moved between two gateway processes, one large channel")
    print(f"at rest: {at_rest:.1f} commands per process tick ({rest_ticks} ticks)")
    print(f"the move: {total:,} commands in {wall:.1f} s and {move_ticks} process ticks; less")
    print(f"  those ticks at rest: {total - at_rest * move_ticks:,.0f},")
    print(f"  {(total - at_rest * move_ticks) / viewers:.1f} per viewer")
    print("by command:", ", ".join(f"{name} {n}" for name, n in move.items()))
    print(f"\n.venv/bin/python bench/realtime_redis.py {shlex.join(sys.argv[1:])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=20_000, help="per load round")
    parser.add_argument("--cpu-seconds", type=float, default=1.0, help="Redis CPU per side")
    parser.add_argument("--subscribers", default="0,50,200")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--storm", type=int, default=0, help="viewers: the storm comparison")
    parser.add_argument("--at-rest", type=int, default=0, help="viewers: a tick's cost")
    parser.add_argument("--move", type=int, default=0, help="viewers: moved between processes")
    opts = parser.parse_args()
    if opts.move:
        asyncio.run(moved(opts.move))
        return
    if opts.at_rest:
        asyncio.run(at_rest(opts.at_rest))
        return
    if opts.storm:
        storm(opts.storm, opts.repeat)
        return
    counts = [int(c) for c in opts.subscribers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            engine, bare, recover = asyncio.run(engine_command(port))
            before = cpu_seconds(proc.pid)
            sent, wall = 0, 0.0
            while (recover_cpu := cpu_seconds(proc.pid) - before) < opts.cpu_seconds:
                wall += asyncio.run(blast(port, recover, opts.publishes))
                sent += opts.publishes
            recoveries = (sent / wall, sent / recover_cpu)
            name = channel_key(PREFIX, CHANNEL, "p").encode()
            rows = []
            for count in counts:
                best: dict[str, tuple[float, float]] = {}
                delivered: dict[str, int] = {}
                ready_r, ready_w = multiprocessing.Pipe(duplex=False)
                stop_here, stop_there = multiprocessing.Pipe()
                reader = multiprocessing.Process(
                    target=subscribers, args=(port, count, name, ready_w, stop_there)
                )
                reader.start()
                ready_r.recv()
                for _ in range(opts.repeat):
                    for side, command in (("engine", engine), ("bare PUBLISH", bare)):
                        before, wall, sent = cpu_seconds(proc.pid), 0.0, 0
                        # Until Redis has spent enough CPU that its 10 ms clock ticks vanish.
                        while (cpu := cpu_seconds(proc.pid) - before) < opts.cpu_seconds:
                            wall += asyncio.run(blast(port, command, opts.publishes))
                            sent += opts.publishes
                        rate, per_cpu = sent / wall, sent / cpu
                        delivered[side] = delivered.get(side, 0) + sent * count
                        if side not in best or per_cpu > best[side][1]:
                            best[side] = (rate, per_cpu)
                stop_here.send(True)
                received = stop_here.recv()
                reader.join()
                for side in ("engine", "bare PUBLISH"):
                    rate, per_cpu = best[side]
                    rows.append(
                        [
                            str(count),
                            side,
                            f"{rate:,.0f}",
                            f"{per_cpu:,.0f}",
                            f"{per_cpu * count:,.0f}" if count else "-",
                            f"{best['engine'][1] / best['bare PUBLISH'][1]:.2f}"
                            if side == "engine"
                            else "1",
                        ]
                    )
                expected = sum(delivered.values())
                print(f"S={count}: subscribers read {received / 1e6:,.1f} MB for {expected:,} "
                      "deliveries", file=sys.stderr)  # fmt: skip
        finally:
            proc.kill()
            proc.wait()
    table = Table(
        headers=[
            "subscribers S",
            "side",
            "publications/s (wall)",
            "publications per Redis CPU-s",
            "deliveries per Redis CPU-s",
            "engine / bare (per CPU-s)",
        ],
        rows=rows,
        right=frozenset({0, 2, 3, 4, 5}),
    )
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{version.stdout.split()[2]}")  # fmt: skip
    print("\n".join(markdown_table(table)))
    print(f"\nrecoveries of {RECOVER_MISSED} missed publications (the engine's read script): "
          f"{recoveries[0]:,.0f}/s wall, {recoveries[1]:,.0f} per Redis CPU-s")  # fmt: skip
    print(f"\n.venv/bin/python bench/realtime_redis.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
