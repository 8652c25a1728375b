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
import os
import secrets
import signal
import subprocess
import sys
import time

import httpx

from streamplane.realtime.load import percentile, run_load
from streamplane.stack import free_port


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
        base = _rss_kb(gateway.pid)
        seen: dict[str, float] = {}

        def measure(phase: str) -> None:
            seen[phase] = _cpu_s(gateway.pid)
            seen[phase + "-rss"] = _rss_kb(gateway.pid)

        report = run_load(
            port,
            key,
            connections=args.connections,
            processes=args.processes,
            messages=args.messages,
            storm_messages=args.storm_messages,
            measure=measure,
        )
        held, connect_s, lat = report.held, report.connect_s, report.latencies
        rss = seen["connected-rss"]
        cpu = seen["broadcasted"] - seen["broadcast"]
        recovered_s, lost = report.storm_s, report.lost
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
            f"broadcast latency     p50 {percentile(lat, 0.5) * 1000:.0f} ms,"
            f" p99 {percentile(lat, 0.99) * 1000:.0f} ms ({len(lat)} deliveries)"
        )
        print(f"deliveries / CPU-s    {deliveries / max(cpu, 1e-9):,.0f} (gateway process)")
        print(
            f"reconnect storm       all {held} back and recovered in {recovered_s:.1f} s;"
            f" {args.storm_messages} published meanwhile"
        )
        print(
            f"lost                  {lost}"
            f" (holes applied: {report.holes}, repeats: {report.repeats})"
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


if __name__ == "__main__":
    main()
