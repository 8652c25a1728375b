"""The realtime gateway under load: connections held, RSS per connection, broadcast latency to
everyone, deliveries per CPU-second, a surge, a reconnect storm, a Redis restart, and stale
values shown as current.

Method: a private `redis-server` (no persistence, a free port) and `streamplane gateway
--processes G` on it (SO_REUSEPORT; each process raises its open-file limit to the hard one),
started by `streamplane.realtime.load.LoadStack`; P load processes (`gateway-load`'s), each
opening its share of N WebSocket connections (picows clients) from its own loopback address
(127.0.0.2, 127.0.0.3, ...: past one address's ephemeral ports), all subscribed to an event
channel and a state channel. The surge: the N arrive over `--arrival` seconds against the
gateways' admission (503 + Retry-After, obeyed). A publisher sends M messages carrying their
send time, `--interval` apart, twice (the second round measured); each client checks it applies
offsets 1, 2, 3, ... with no hole and no repeat and records the latency. A state source writes a
score with a maximum age throughout; each client counts values it would show as current past
their true age. The storm: every client drops its connection at once, K more messages go out
meanwhile, all reconnect with their last position. The Redis restart: Redis killed -9 and
started again empty mid-stream; every client must end on the publisher's last position
(recovered or told to reload), nothing applied twice. Measured from /proc over the G gateway
processes: RSS growth per connection and CPU seconds during the measured round.
The peer, in the same run: the bare sans-I/O broadcast server of bench/ws_impl.py (no tokens,
channels, cursors, history or broker) holding N/G connections, one gateway process's share:
the ratio is what the gateway's protocol, bookkeeping and Redis cost per process.

    .venv/bin/python bench/gateway.py --connections 20000 --gateways 2 --processes 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

from streamplane.realtime.load import LoadStack, percentile, processes_for, run_load


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


def _load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--gateways", type=int, default=0, help="0: one per 15,000 connections")
    parser.add_argument("--processes", type=int, default=0, help="load processes (0: as many)")
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--storm-messages", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--arrival", type=float, default=0.0, help="the surge's window, seconds")
    parser.add_argument("--admission-rate", type=float, default=2000.0)
    parser.add_argument("--admission-burst", type=int, default=4000)
    parser.add_argument("--no-storm", action="store_true")
    parser.add_argument("--no-restart", action="store_true")
    args = parser.parse_args()
    gateways = args.gateways or max(1, processes_for(args.connections))
    processes = args.processes or max(2, processes_for(args.connections))
    print(__doc__.split("\n\n")[1])
    print(f"load average at start: {_load_average()} on {os.cpu_count()} cores")
    key = secrets.token_bytes(32)
    with LoadStack(
        key,
        gateways=gateways,
        admission_rate=args.admission_rate,
        admission_burst=args.admission_burst,
    ) as stack:
        pids = stack.gateway_pids()
        base = sum(_rss_kb(p) for p in pids)
        seen: dict[str, float] = {}
        t0 = time.time()

        def measure(phase: str) -> None:
            seen[phase] = sum(_cpu_s(p) for p in pids)
            seen[phase + "-rss"] = sum(_rss_kb(p) for p in pids)
            seen[phase + "-load"] = os.getloadavg()[0]
            mb = seen[phase + "-rss"] / 1024
            print(  # progress, for a run that takes long
                f"  {time.time() - t0:6.0f} s  {phase}: gateways' RSS {mb:.0f} MB,"
                f" CPU {seen[phase]:.0f} s, load average {_load_average()}",
                flush=True,
            )

        report = run_load(
            stack.port,
            key,
            connections=args.connections,
            processes=processes,
            messages=args.messages,
            storm_messages=args.storm_messages,
            interval=args.interval,
            arrival_s=args.arrival,
            storm=not args.no_storm,
            restart_broker=None if args.no_restart else stack.restart_redis,
            measure=measure,
        )
        wall = time.time() - t0
        alive = LoadStack.still_running(pids)
        gateway_stats = stack.gateway_stats() if alive else {}
    held, lat = report.held, report.latencies
    rss = seen["connected-rss"]
    cpu = seen["broadcasted"] - seen["broadcast"]
    gateway_kb = (rss - base) / max(1, held)
    gateway_rate = report.deliveries / max(cpu, 1e-9)
    print(
        f"connections held      {held} of {args.connections} ({gateways} gateway processes,"
        f" {processes} load processes from 127.0.0.2-127.0.0.{1 + processes})"
    )
    print(
        f"surge                 all admitted in {report.connect_s:.1f} s"
        f" (arrivals over {args.arrival:.0f} s; {report.refused} answered 503,"
        f" {report.early_retries} retried before their Retry-After)"
    )
    if report.refusal_ms:
        print(
            f"a 503                 answered in p50 {percentile(report.refusal_ms, 0.5):.0f} ms,"
            f" p99 {percentile(report.refusal_ms, 0.99):.0f} ms (dial to answer);"
            f" {report.without_retry_after} without Retry-After;"
            f" gateway processes still running {alive} of {len(pids)}"
        )
        print(
            f"  an admitted one     p50 {percentile(report.admission_ms, 0.5):.0f} ms,"
            f" p99 {percentile(report.admission_ms, 0.99):.0f} ms (dial to 101, same run)"
        )
    print(
        f"gateway RSS           {rss / 1024:.0f} MB over {gateways} processes;"
        f" {gateway_kb:.1f} KB per connection"
    )
    print(
        f"broadcast latency     p50 {percentile(lat, 0.5) * 1000:.0f} ms,"
        f" p99 {percentile(lat, 0.99) * 1000:.0f} ms ({len(lat)} deliveries)"
    )
    print(
        f"deliveries / CPU-s    {gateway_rate:,.0f} ({report.deliveries} deliveries,"
        f" {cpu:.1f} CPU-s over the gateway processes)"
    )
    if not args.no_storm:
        print(
            f"reconnect storm       {held - report.unconnected} of {held} back and recovered in"
            f" {report.storm_s:.1f} s; {args.storm_messages} published meanwhile;"
            f" {report.reloads} told to reload"
        )
    print(
        f"lost                  {report.lost}"
        f" (holes applied: {report.holes}, repeats: {report.repeats},"
        f" viewers not back: {report.unconnected})"
    )
    restart = report.restart
    if restart is not None:
        print(
            f"Redis restart         all on the last position {restart.recovered_s:.1f} s after"
            f" the kill; lost {restart.lost}, applied twice {restart.repeats},"
            f" told to reload {restart.reloads}, refused to the source and retried"
            f" {restart.refused}, viewers not back {restart.unconnected}"
        )
    print(
        f"stale shown as current {report.stale_as_current}"
        f" ({report.state_values} state values shown; {report.stale_shown} turned stale on time)"
    )
    for why in report.why_unconnected:
        print(f"  not back: {why}")
    timeouts = sum(int(h["handshake_timeouts"]) for h in gateway_stats.values())
    print(
        f"handshakes cut        {report.handshakes_cut} closed before the upgrade's answer"
        f" (each dialled again); the gateways dropped {timeouts} unfinished in their"
        f" handshake timeout ({len(gateway_stats)} of {gateways} processes answered /health)"
    )
    print(f"load average          {seen['connected-load']:.1f} when connected,"
          f" {_load_average()} at the end; the run took {wall:.0f} s")  # fmt: skip
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ws_impl import measure as measure_bare

    share = max(1, held // gateways)
    bare = measure_bare("websockets", share, args.messages)
    print(
        f"bare sans-I/O server  {bare['connections']:.0f} connections (one gateway process's"
        f" share): {bare['kb_per_conn']:.1f} KB per connection,"
        f" {bare['deliveries_per_cpu_s']:,.0f} deliveries / CPU-s; gateway / bare:"
        f" memory x{gateway_kb / bare['kb_per_conn']:.2f},"
        f" deliveries per CPU-s x{gateway_rate / bare['deliveries_per_cpu_s']:.2f}"
    )
    flags = " --no-storm" * args.no_storm + " --no-restart" * args.no_restart
    print(
        f"command: {sys.executable} bench/gateway.py --connections {args.connections}"
        f" --gateways {gateways} --processes {processes} --messages {args.messages}"
        f" --storm-messages {args.storm_messages} --interval {args.interval}"
        f" --arrival {args.arrival} --admission-rate {args.admission_rate:g}"
        f" --admission-burst {args.admission_burst}{flags}"
    )


if __name__ == "__main__":
    main()
