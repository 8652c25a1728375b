"""Which WebSocket implementation the gateway runs on: memory per connection and deliveries per
CPU-second of a broadcast server, `websockets`' sans-I/O protocol against `picows`, same run.

Method: each server is a bare asyncio broadcast server (one callback per connection, no task per
connection, as the gateway is) in its own process on the default event loop. One client process
opens N WebSocket connections (picows client for both servers, so the client side costs the
same), then the server broadcasts M text frames of 100 bytes to every connection. Measured in
the server process from /proc: RSS growth per connection once all are open, and CPU seconds
(user + system) spent from the first broadcast until every client has received the last one.

    .venv/bin/python bench/ws_impl.py --connections 2000 --messages 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from multiprocessing import Process, Queue
from typing import Any

PAYLOAD = b'{"type":"pub","channel":"chat:final","offset":1,"data":{"text":"' + b"x" * 40 + b'"}}'


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


async def _serve_websockets(port: int, commands: Any, ready: Any) -> None:
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    conns: list[tuple[Any, Any]] = []

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.ws = ServerProtocol()

        def data_received(self, data: bytes) -> None:
            self.ws.receive_data(data)
            for event in self.ws.events_received():
                if isinstance(event, Request):
                    self.ws.send_response(self.ws.accept(event))
                    conns.append((self.ws, self.transport))
            out = self.ws.data_to_send()
            if out:
                self.transport.writelines(out)

    loop = asyncio.get_running_loop()
    await loop.create_server(Conn, "127.0.0.1", port, backlog=4096)
    ready.put("up")
    await _broadcast_loop(commands, ready, lambda: _send_ws(conns), lambda: len(conns))


def _send_ws(conns: list[tuple[Any, Any]]) -> None:
    for ws, transport in conns:
        ws.send_text(PAYLOAD)
        transport.writelines(ws.data_to_send())


async def _serve_picows(port: int, commands: Any, ready: Any) -> None:
    from picows import WSListener, WSMsgType, ws_create_server

    conns: list[Any] = []

    class Listener(WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport: Any) -> None:
            conns.append(transport)

    # A 16 KB read buffer per connection is picows' default; the gateway reads small frames.
    await ws_create_server(
        lambda request: Listener(), "127.0.0.1", port, backlog=4096, read_buffer_init_size=1024
    )
    ready.put("up")

    def send() -> None:
        for transport in conns:
            transport.send(WSMsgType.TEXT, PAYLOAD)

    await _broadcast_loop(commands, ready, send, lambda: len(conns))


async def _broadcast_loop(commands: Any, ready: Any, send: Any, count: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, commands.get)
        if command == "count":
            ready.put(count())
        elif command == "stop":
            return
        else:
            for _ in range(int(command)):
                send()
                await asyncio.sleep(0)
            ready.put("sent")


def _server(kind: str, port: int, commands: Any, ready: Any) -> None:
    serve = _serve_websockets if kind == "websockets" else _serve_picows
    asyncio.run(serve(port, commands, ready))


def _clients(port: int, n: int, messages: int, ready: Any, go: Any) -> None:
    from picows import WSListener, ws_connect

    async def run() -> None:
        done = asyncio.Event()
        received = [0]
        target = n * messages

        class Listener(WSListener):  # type: ignore[misc]
            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                received[0] += 1
                if received[0] >= target:
                    done.set()

        held = []
        for i in range(n):
            held.append(await ws_connect(Listener, f"ws://127.0.0.1:{port}/"))
            if i % 500 == 499:
                await asyncio.sleep(0)
        ready.put("connected")
        await asyncio.get_running_loop().run_in_executor(None, go.get)
        await asyncio.wait_for(done.wait(), 120)
        ready.put(time.perf_counter())
        await asyncio.get_running_loop().run_in_executor(None, go.get)

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(kind: str, n: int, messages: int) -> dict[str, float]:
    port = _free_port()
    commands: Queue[Any] = Queue()
    ready: Queue[Any] = Queue()
    server = Process(target=_server, args=(kind, port, commands, ready))
    server.start()
    ready.get(timeout=30)
    assert server.pid is not None
    base = _rss_kb(server.pid)
    client_ready: Queue[Any] = Queue()
    go: Queue[Any] = Queue()
    clients = Process(target=_clients, args=(port, n, messages, client_ready, go))
    clients.start()
    client_ready.get(timeout=120)
    commands.put("count")
    held = ready.get(timeout=30)
    rss = _rss_kb(server.pid)
    cpu0 = _cpu_s(server.pid)
    t0 = time.perf_counter()
    commands.put(str(messages))
    go.put("go")
    t1 = client_ready.get(timeout=180)
    cpu = _cpu_s(server.pid) - cpu0
    go.put("stop")
    commands.put("stop")
    clients.join(30)
    server.join(30)
    return {
        "connections": held,
        "kb_per_conn": (rss - base) / max(1, held),
        "deliveries_per_cpu_s": held * messages / max(cpu, 1e-9),
        "wall_s": t1 - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    print(__doc__.split("\n\n")[1])
    rows = {}
    for kind in ("websockets", "picows"):
        rows[kind] = measure(kind, args.connections, args.messages)
        r = rows[kind]
        print(
            f"{kind:11s} connections {r['connections']:6.0f}  RSS/conn {r['kb_per_conn']:5.1f} KB"
            f"  deliveries/CPU-s {r['deliveries_per_cpu_s']:9.0f}  wall {r['wall_s']:.2f} s"
        )
    a, b = rows["websockets"], rows["picows"]
    print(
        f"picows / websockets: memory per connection x{b['kb_per_conn'] / a['kb_per_conn']:.2f},"
        f" deliveries per CPU-second x{b['deliveries_per_cpu_s'] / a['deliveries_per_cpu_s']:.2f}"
    )
    print(
        f"command: {sys.executable} bench/ws_impl.py --connections {args.connections}"
        f" --messages {args.messages}"
    )


if __name__ == "__main__":
    main()
