"""A live surge on one edge: origin requests per object, the edge against nginx's cache lock.

Method: a live channel's origin (streamplane's own, blocking reloads and preload hints) gets a
part every 0.5 s (synthetic bytes of a 480 kbps rung, so no encoder competes for the CPU). In
front of it, on the same machine and in the same run, one streamplane edge (two workers) and
one nginx proxy cache (two workers, ``proxy_cache_lock on``: waiters wait for the whole object,
looking again every 500 ms). ``--viewers`` simulated LL-HLS viewers join each in turn at the
live edge and, for ``--parts`` parts, do what hls.js does: a blocking playlist reload for the
next part (``_HLS_msn``/``_HLS_part``), then that part. Printed for each side: the origin
requests per object (the goal: exactly one per object per edge), and how long after a part
landed at the origin the viewers had it (p50, p95, max), and failures. Each viewer has its own
client and connection, as a player does; a request sent on a keep-alive connection the server
had closed as idle is retried once, as a browser does, and counted apart (``retried``), and
``lag max s`` is how late the client's own event loop woke at worst: seconds there mean the
client, not the server, was starved, and its times are not the servers'. ``CPU s``: the
server's processes' CPU time over its surge (the edge's supervisor and workers, nginx's),
split into user space and the kernel (``sys``: sockets, sendfile, the cache's files).
``--before CHECKOUT`` puts the edge of another checkout (``CHECKOUT/src`` first on its path)
through the same surge in the same run, after nginx: the edge's CPU then has a peer measured
minutes apart, not hours, on this shared machine.

Glass to glass (``--glass-s``, before the surge): a real channel (``streamplane live start``,
one 240p rung, no audio) fed by ``streamplane live feed`` over SRT on loopback, whose every
frame carries the wall clock at the moment the feed made it (``live/feed.py``: a strip of 32
black or white blocks, the milliseconds' bits), and one streamplane edge (two workers) in
front of it. ``--glass-viewers`` headless LL-HLS viewers (``player/viewer.py``: blocking
reloads, parts, the target latency held with the play-out rate) play it through the edge;
afterwards each part they received is decoded (PyAV) and every frame's clock read back:
glass to glass is the time from the feed making a frame to a viewer having it (the part
holding it received whole), p50 / p95 / max over every frame every viewer received; the
viewers' own latency to the live edge and their stalls are printed beside it.

    python bench/live.py --viewers 1000 --parts 8 --glass-s 30 --glass-viewers 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import quantiles
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import edge as edge_bench  # bench/edge.py: nginx as a proxy cache, wait_up

from streamplane.live import Rung, SyntheticOrigin
from streamplane.live.feed import read_clock_code
from streamplane.media.fmp4 import read_fragment
from streamplane.player import Viewer, ViewerConfig
from streamplane.player.live import LivePart
from streamplane.stack import free_port

PART_S = 0.5
PART_BYTES = 30_000  # 480 kbps


class _Viewer:
    """One simulated player: its own HTTP client and connection, as a browser tab has.

    One client shared by all viewers made the bench measure itself: httpcore's pool scans
    every connection for every idle one on each request (quadratic in the connections), and
    with 1,000 of them a starved process fell tens of seconds behind the servers, long enough
    for their keep-alive timeouts to close most connections between two requests.
    """

    def __init__(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=30, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        self.connected = False  # a connection was made during the request under way
        self.retried = 0

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.connected = True

    async def get(self, url: str) -> httpx.Response:
        """GET, retried once when the server had closed the idle keep-alive connection it
        was sent on before answering: a browser does the same (RFC 9112, 9.3.1), so hls.js
        never sees it. A server's idle timeout doing its job is counted apart, not failed."""
        self.connected = False
        try:
            return await self.client.get(url, extensions={"trace": self._trace})
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            if self.connected:  # a fresh connection cut: a failure
                raise
        self.retried += 1
        return await self.client.get(url)


async def _viewer(
    viewer: _Viewer, base: str, start: tuple[int, int], parts: int,
    got: dict[tuple[int, int], list[float]], failures: list[str],
) -> None:  # fmt: skip
    msn, part = start
    for _ in range(parts):
        try:
            r = await viewer.get(f"{base}/ch/v240/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
            if r.status_code != 200:
                failures.append(f"playlist {r.status_code}")
                return
            r = await viewer.get(f"{base}/ch/v240/seg_{msn}.{part}.m4s")
            if r.status_code != 200 or len(r.content) != PART_BYTES:
                failures.append(f"part {r.status_code}")
                return
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
            return
        got.setdefault((msn, part), []).append(time.monotonic())
        msn, part = (msn + 1, 0) if part == 3 else (msn, part + 1)


async def _lag(worst: list[float]) -> None:
    """How late the client's own loop wakes: a starved client shows here, not in a server."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.1)
        worst[0] = max(worst[0], time.monotonic() - t - 0.1)


async def _surge(origin: SyntheticOrigin, base: str, viewers: int, parts: int) -> dict[str, Any]:
    origin.requests.clear()
    newest = origin.track.window().last_part()
    assert newest is not None
    start = (newest[0] + 1, 0) if newest[1] == 3 else (newest[0], newest[1] + 1)
    got: dict[tuple[int, int], list[float]] = {}
    failures: list[str] = []
    players = [_Viewer() for _ in range(viewers)]
    lag = [0.0]
    monitor = asyncio.create_task(_lag(lag))
    watchers = [asyncio.create_task(_viewer(v, base, start, parts, got, failures)) for v in players]
    await asyncio.sleep(PART_S)  # every viewer asked for the next part, and waits
    for _ in range(parts + 1):
        await asyncio.to_thread(origin.land, PART_BYTES)
        await asyncio.sleep(PART_S)
    await asyncio.wait_for(asyncio.gather(*watchers), 600)
    monitor.cancel()
    await asyncio.gather(*(v.client.aclose() for v in players))
    delays = [t - origin.landed[k] for k, times in got.items() for t in times]
    objects = [k for k in origin.requests if "/ch/" in k]
    per_object = [origin.requests[k] for k in objects]
    return {
        "objects": len(objects),
        "max_per_object": max(per_object, default=0),
        "mean_per_object": sum(per_object) / max(1, len(per_object)),
        "delays": delays,
        "failures": failures,
        "served": len(delays),
        "retried": sum(v.retried for v in players),
        "client_lag": lag[0],
    }


def _row(name: str, result: dict[str, Any]) -> str:
    delays = sorted(result["delays"])
    if len(delays) >= 2:
        cuts = quantiles(delays, n=100)
        p50, p95 = cuts[49], cuts[94]
    else:
        p50 = p95 = float("nan")
    worst = delays[-1] if delays else float("nan")
    return (
        f"{name:<22} {result['objects']:>7} {result['mean_per_object']:>8.2f} "
        f"{result['max_per_object']:>6} {p50 * 1000:>8.0f} {p95 * 1000:>8.0f} "
        f"{worst * 1000:>8.0f} {result['served']:>8} {len(result['failures']):>6} "
        f"{result['retried']:>7} {result['client_lag']:>10.1f} {result['cpu_s']:>6.2f} "
        f"{result['user_s']:>6.2f} {result['sys_s']:>6.2f}"
    )


def _edge_config(work: Path, name: str, origin: str, port: int) -> Path:
    conf = work / f"{name}.toml"
    conf.write_text(
        f'[edge]\norigin = "{origin}"\ncache_dir = "{work / (name + "-cache")}"\n'
        f'port = {port}\nhost = "127.0.0.1"\nworkers = 2\naccess_log = false\n'
        "require_token = false\nlive_playlist_ttl_s = 0.5\n"
    )
    return conf


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamplane", *args]


def _frame_clocks(received: list[tuple[LivePart, str, bytes, float]], init: dict[str, bytes]
                  ) -> tuple[list[float], int]:  # fmt: skip
    """Glass to glass of every frame a viewer received (arrival of its part less the clock
    burnt into it), and how many frames had no readable clock (a slate)."""
    import av

    out: list[float] = []
    unreadable = 0
    runs: list[list[tuple[LivePart, str, bytes, float]]] = []
    for item in received:  # consecutive parts of one encoder run decode as one stream
        if runs and runs[-1][-1][1] == item[1]:
            runs[-1].append(item)
        else:
            runs.append([item])
    for run in runs:
        arrivals: list[float] = []
        for _part, _init, body, arrived in run:
            arrivals += [arrived] * read_fragment(body).sample_count
        data = init[run[0][1]] + b"".join(body for _, _, body, _ in run)
        with av.open(io.BytesIO(data)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k >= len(arrivals):
                    break
                arrived_ms = int(arrivals[k] * 1000)
                made_ms = read_clock_code(frame.to_ndarray(format="gray"), arrived_ms)
                delay = (arrived_ms - made_ms) / 1000
                if 0 <= delay < 60:
                    out.append(delay)
                else:
                    unreadable += 1
    return out, unreadable


async def _watch(edge: str, seconds: float, viewers: int) -> list[tuple[Any, list[Any]]]:
    """``viewers`` headless LL-HLS viewers on channel ``ch`` through ``edge``, each with its
    parts as received."""
    offer = {
        "session_id": "bench",
        "live": True,
        "edges": [{"edge_id": "edge", "base_url": edge, "hls": f"{edge}/ch/master.m3u8"}],
    }
    out = []
    async with httpx.AsyncClient(timeout=30) as client:
        players = []
        for k in range(viewers):
            received: list[tuple[LivePart, str, bytes, float]] = []
            player = Viewer(
                client,
                ViewerConfig(control_url="http://127.0.0.1:9", title="ch", duration_s=seconds),
                {},
                index=k,
                offer=offer,
                on_part=lambda *item, into=received: into.append(item),  # type: ignore[misc]
            )
            players.append((player, received))
        results = await asyncio.gather(*(p.run() for p, _ in players))
        for (_, received), result in zip(players, results, strict=True):
            out.append((result, received))
    return out


def glass(work: Path, seconds: float, viewers: int) -> dict[str, Any]:
    """Glass to glass through one edge (see the module docstring)."""
    http, edge_port = free_port(), free_port()
    srt = free_port(socket.SOCK_DGRAM)
    key = "bench-stream-key"
    root = work / "live"
    channel = subprocess.Popen(
        _cli("live", "start", "ch", "--srt-listen", str(srt), "--port", str(http),
             "--root", str(root), "--stream-key", key, "--no-audio", "--rungs", "240:400"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    origin = f"http://127.0.0.1:{http}"
    conf = _edge_config(work, "glass-edge", origin, edge_port)
    edge = subprocess.Popen(
        _cli("edge", "--config", str(conf)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    feed = None
    try:
        edge_bench.wait_up(f"{origin}/ch/status.json")
        edge_bench.wait_up(f"http://127.0.0.1:{edge_port}/healthz")
        feed_args = _cli("live", "feed", "ch", "--to", f"srt://127.0.0.1:{srt}",
                         "--stream-key", key, "--seconds", str(seconds + 30))  # fmt: skip
        deadline = time.monotonic() + 60
        while not (root / "ch" / "v240" / "seg_2.m4s").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the channel made no segment in 60 s")
            if feed is None or feed.poll() is not None:  # the listener was not up yet
                feed = subprocess.Popen(
                    feed_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            time.sleep(0.5)
        load = os.getloadavg()[0]
        watched = asyncio.run(_watch(f"http://127.0.0.1:{edge_port}", seconds, viewers))
        load = max(load, os.getloadavg()[0])
        init = {
            path: httpx.get(f"http://127.0.0.1:{edge_port}/ch/{path}", timeout=10).content
            for _, received in watched
            for path in {item[1] for item in received}
        }
    finally:
        for p in (feed, edge, channel):
            if p is not None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(15)
    delays: list[float] = []
    unreadable = 0
    for _, received in watched:
        frames, bad = _frame_clocks(received, init)
        delays += frames
        unreadable += bad
    results = [r for r, _ in watched]
    return {
        "delays": delays,
        "unreadable": unreadable,
        "results": results,
        "load": load,
    }


def _glass_report(seconds: float, viewers: int, g: dict[str, Any]) -> None:
    delays = sorted(g["delays"])
    print(f"\nglass to glass, LL-HLS through one edge: {viewers} viewers x {seconds:g} s, "
          f"load average up to {g['load']:.1f}")  # fmt: skip
    if len(delays) >= 2:
        cuts = quantiles(delays, n=100)
        print(f"  frames {len(delays)} (unreadable {g['unreadable']}): p50 {cuts[49]:.2f} s, "
              f"p95 {cuts[94]:.2f} s, max {delays[-1]:.2f} s")  # fmt: skip
    for r in g["results"]:
        p50 = "-" if r.latency_p50_s is None else f"{r.latency_p50_s:.2f}"
        p95 = "-" if r.latency_p95_s is None else f"{r.latency_p95_s:.2f}"
        print(f"  viewer {r.viewer}: parts {r.segments}, latency to live p50 {p50} s "
              f"p95 {p95} s, stalls {r.rebuffer_events} ({r.rebuffer_s:.2f} s), "
              f"error {r.error}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--glass-s", type=float, default=30.0, help="0: no glass-to-glass run")
    parser.add_argument("--glass-viewers", type=int, default=3)
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout whose edge (CHECKOUT/src first on its path) takes the same surge too",
    )
    parser.add_argument("--before-first", action="store_true", help="surge the other edge first")
    args = parser.parse_args()
    # a SIGTERM (a timeout) unwinds like Ctrl-C, so the edge and nginx are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user
        g = glass(work, args.glass_s, args.glass_viewers) if args.glass_s > 0 else None
        if not args.viewers:
            if g is not None:
                _glass_report(args.glass_s, args.glass_viewers, g)
            print(f"command: python {shlex.join(sys.argv)}")
            return
        origin = SyntheticOrigin(work / "origin", "ch", Rung(240, 480))
        for _ in range(4):
            origin.land(PART_BYTES)
        origin_url = f"http://127.0.0.1:{origin.port}"
        edges = [("streamplane edge", None)]
        if args.before is not None:
            edges.append(("edge before", args.before.resolve() / "src"))
        servers: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        for name, src in edges:
            port = free_port()
            label = "surge-edge" if src is None else "surge-before"
            conf = _edge_config(work, label, origin_url, port)
            env = dict(os.environ)
            if src is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
            process = subprocess.Popen(
                [sys.executable, "-m", "streamplane", "edge", "--config", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            servers.append((name, port, process))
        (work / "proxy").mkdir()
        proxy_port = free_port()
        proxy = edge_bench.start_nginx_proxy(origin.port, work / "proxy", proxy_port)
        servers.insert(1, ("nginx proxy_cache_lock", proxy_port, proxy))
        if args.before_first:  # the order of the surges, so that its effect can be seen
            servers.reverse()
        processes = [process for _, _, process in servers]
        try:
            for name, port, _ in servers:
                path = "/" if name.startswith("nginx") else "/healthz"
                edge_bench.wait_up(f"http://127.0.0.1:{port}{path}")
            results = {}
            loads = []
            for name, port, server in servers:
                user, system = edge_bench.tree_cpu_times(server.pid)
                results[name] = asyncio.run(
                    _surge(origin, f"http://127.0.0.1:{port}", args.viewers, args.parts)
                )
                user_after, system_after = edge_bench.tree_cpu_times(server.pid)
                results[name]["user_s"] = user_after - user
                results[name]["sys_s"] = system_after - system
                results[name]["cpu_s"] = results[name]["user_s"] + results[name]["sys_s"]
                loads.append(os.getloadavg()[0])
        finally:
            for p in processes:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            origin.stop()
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print(f"\n{args.viewers} viewers, {args.parts} parts each; {platform.node()}, 2 cores shared, "
          f"load average after each surge {', '.join(f'{x:.1f}' for x in loads)}")  # fmt: skip
    print(f"{'':<22} {'objects':>7} {'req/obj':>8} {'max':>6} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'max ms':>8} {'served':>8} {'failed':>6} {'retried':>7} "
          f"{'lag max s':>10} {'CPU s':>6} {'user':>6} {'sys':>6}")  # fmt: skip
    for name, result in results.items():
        print(_row(name, result))
    for name, result in results.items():
        if result["failures"]:
            kinds = collections.Counter(result["failures"]).most_common()
            print(f"{name} failures: " + ", ".join(f"{k} x{n}" for k, n in kinds))
    edge, nginx = results["streamplane edge"], results["nginx proxy_cache_lock"]
    if "edge before" in results and results["edge before"]["cpu_s"] > 0:
        before = results["edge before"]
        to_nginx = before["cpu_s"] / max(1e-9, nginx["cpu_s"])
        print(f"CPU over the surge, edge / edge before: {edge['cpu_s'] / before['cpu_s']:.2f}x; "
              f"edge before / nginx: {to_nginx:.1f}x")  # fmt: skip
    if nginx["delays"] and edge["delays"]:
        ratio = quantiles(sorted(nginx["delays"]), n=100)[94] / max(
            1e-9, quantiles(sorted(edge["delays"]), n=100)[94]
        )
        print(f"\np95 time to the part, nginx / edge: {ratio:.2f}x")
    if nginx["cpu_s"] > 0:
        print(f"CPU over the surge, edge / nginx: {edge['cpu_s'] / nginx['cpu_s']:.1f}x")
    if g is not None:
        _glass_report(args.glass_s, args.glass_viewers, g)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
