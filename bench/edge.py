"""The edge against nginx on the same files, loaded by wrk in the same run.

For 2 MB segments (throughput) and a 4 KB playlist (requests/s), each server is loaded in
turn, several rounds interleaved so that both see the same machine, and the best round of
each is kept. Printed: requests/s, throughput, p99 latency, CPU seconds per GB served (all
processes of the server, from /proc), and the ratio edge / nginx.

nginx runs as Debian packages it (``sendfile on``, ``tcp_nopush on``, two workers, no access
log); the edge with two workers, its cache warm, verifying a real token on every request.

    python bench/edge.py [--seconds 10] [--rounds 2] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from streamplane.edge import sign
from streamplane.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY_HEX = "6b" * 32
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (living ones)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pids.extend(int(c) for c in children)
    return total


def start_nginx(docroot: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    types {{ video/iso.segment m4s; application/vnd.apple.mpegurl m3u8; }}
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {docroot};
    }}
}}
"""
    )
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])


def start_edge(cache: Path, origin: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    conf = work / "edge.toml"
    conf.write_text(
        f'[tokens]\nkeys = {{ k1 = "{KEY_HEX}" }}\n[edge]\norigin = "{origin}"\n'
        f'cache_dir = "{cache}"\nport = {port}\nhost = "127.0.0.1"\nworkers = 2\n'
        "access_log = false\n"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "streamplane", "edge", "--config", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p99": p99, "errors": float(errors.group(1)) if errors else 0.0}


def measure(
    server: subprocess.Popen[bytes], url: str, size: int, seconds: int, connections: int
) -> dict[str, float]:
    cpu0 = tree_cpu_seconds(server.pid)
    result = wrk(url, seconds, connections)
    cpu = tree_cpu_seconds(server.pid) - cpu0
    served_gb = result["rps"] * seconds * size / 1e9
    result["gbps"] = result["rps"] * size * 8 / 1e9
    result["cpu_per_gb"] = cpu / served_gb if served_gb else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}: apt-get install nginx-light wrk")

    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user
        docroot = work / "origin"
        (docroot / "t").mkdir(parents=True)
        objects = {
            "segment (2 MB)": ("t/seg_1.m4s", 2_000_000),
            "playlist (4 KB)": ("t/index.m3u8", 4096),
        }
        for path, size in objects.values():
            (docroot / path).write_bytes(os.urandom(size))
        cache = work / "cache"
        shutil.copytree(docroot, cache)  # warm: every request is a hit
        nginx_port, edge_port = free_port(), free_port()
        (work / "nginx").mkdir()
        nginx = start_nginx(docroot, work / "nginx", nginx_port)
        edge = start_edge(cache, docroot, work, edge_port)
        token = sign(
            key_id="k1", key=bytes.fromhex(KEY_HEX), acl=["/t/*"], expiry=int(time.time()) + 3600
        )
        try:
            wait_up(f"http://127.0.0.1:{nginx_port}/t/index.m3u8")
            wait_up(f"http://127.0.0.1:{edge_port}/healthz")
            best: dict[tuple[str, str], dict[str, float]] = {}
            for round_ in range(args.rounds):
                for label, (path, size) in objects.items():
                    for name, server, url in (
                        ("nginx", nginx, f"http://127.0.0.1:{nginx_port}/{path}"),
                        ("edge", edge, f"http://127.0.0.1:{edge_port}/{path}?__token__={token}"),
                    ):
                        r = measure(server, url, size, args.seconds, args.connections)
                        if r["errors"]:
                            raise SystemExit(f"{name} answered errors on {url}")
                        print(
                            f"round {round_ + 1} {label:16} {name:5} {r['rps']:>9,.0f} req/s "
                            f"{r['gbps']:6.2f} Gbit/s p99 {r['p99'] * 1e3:6.2f} ms "
                            f"{r['cpu_per_gb']:5.2f} CPU s/GB",
                            flush=True,
                        )
                        key = (label, name)
                        if key not in best or r["rps"] > best[key]["rps"]:
                            best[key] = r
        finally:
            for p in (edge, nginx):
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()

    print(
        f"\nbest of {args.rounds} rounds, wrk -t1 -c{args.connections} -d{args.seconds}s, "
        "edge verifying a token per request\n"
    )
    print(
        "| object | nginx | edge | edge / nginx | p99 nginx | p99 edge "
        "| CPU s/GB nginx | CPU s/GB edge |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for label in objects:
        n, e = best[(label, "nginx")], best[(label, "edge")]
        unit = "Gbit/s" if "segment" in label else "req/s"
        nv, ev = (n["gbps"], e["gbps"]) if unit == "Gbit/s" else (n["rps"], e["rps"])
        fmt = "{:,.2f} " + unit if unit == "Gbit/s" else "{:,.0f} " + unit
        print(
            f"| {label} | {fmt.format(nv)} | {fmt.format(ev)} | {ev / nv:.2f}x | "
            f"{n['p99'] * 1e3:.2f} ms | {e['p99'] * 1e3:.2f} ms | "
            f"{n['cpu_per_gb']:.2f} | {e['cpu_per_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
