"""A real edge process on a real port, a real HTTP origin, and a signer for its tokens."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamplane.edge import sign
from streamplane.stack import free_port

KEY_ID = "k1"
KEY_HEX = "5f" * 32
FLEET_KEY_HEX = "6e" * 32  # an edge's own heartbeat key (edge.fleet_key)


def token(acl: str = "/*", ttl: int = 600, ip: str | None = None, key_hex: str = KEY_HEX) -> str:
    return sign(
        key_id=KEY_ID,
        key=bytes.fromhex(key_hex),
        acl=[acl],
        expiry=int(time.time()) + ttl,
        ip=ip,
    )


@dataclass
class Edge:
    process: subprocess.Popen[bytes]
    port: int
    cache: Path
    config: Path
    stderr: Path
    stdout: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, tok: str | None = None, **kw: Any) -> httpx.Response:
        params = {"__token__": tok if tok is not None else token()}
        return httpx.get(self.url + path, params=params, timeout=30, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.stderr.read_text()


def start_edge(
    tmp: Path, origin: str | Path, *, workers: int = 2, wait: bool = True, **edge: Any
) -> Edge:
    port = edge.pop("port", None) or free_port()
    cache = Path(edge.pop("cache_dir", tmp / "cache"))
    if "control_url" in edge:  # an edge that heartbeats signs with a key of its own
        edge.setdefault("fleet_key", FLEET_KEY_HEX)
    lines = ["[tokens]", f'keys = {{ {KEY_ID} = "{KEY_HEX}" }}', "[edge]"]
    settings = {
        "origin": str(origin),
        "cache_dir": str(cache),
        "capacity_bytes": 10**9,
        "host": "127.0.0.1",
        "port": port,
        "workers": workers,
        "access_log": False,
        "drain_notice_s": 0.2,
        **edge,
    }
    for name, value in settings.items():
        if isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{name} = {value}")
        elif isinstance(value, list | tuple):  # of strings: a JSON array is a TOML one
            lines.append(f"{name} = {json.dumps(list(value))}")
        else:
            lines.append(f'{name} = "{value}"')
    config = tmp / f"edge-{port}.toml"
    config.write_text("\n".join(lines) + "\n")
    stderr, stdout = tmp / f"edge-{port}.err", tmp / f"edge-{port}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLANE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamplane", "edge", "--config", str(config)],
        stdout=stdout.open("wb"),
        stderr=stderr.open("wb"),
        env=env,
        # SIGINT as a terminal would deliver it, whatever the test runner inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    result = Edge(process, port, cache, config, stderr, stdout)
    if wait:
        wait_healthy(result)
    return result


def edge_workers(edge: Edge) -> set[int]:
    """The edge's worker processes: those started by multiprocessing's spawn that hold the
    edge's stderr file open (they inherit it), whoever their parent is now."""
    target = str(edge.stderr)
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"multiprocessing.spawn" not in (proc / "cmdline").read_bytes():
                continue
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.add(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, exited but not reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_healthy(edge: Edge, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if edge.process.poll() is not None:
            raise AssertionError(f"edge exited {edge.process.returncode}: {edge.log()}")
        try:
            if httpx.get(edge.url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"edge did not come up: {edge.log()}")


def make_origin(root: Path) -> Path:
    """A catalog with one title: a playlist and segments of random bytes."""
    (root / "t1" / "v" / "1").mkdir(parents=True)
    (root / "t1" / "master.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:7\n")
    for n, size in enumerate((2_000_000, 300_000, 12_000_000), start=1):
        (root / "t1" / "v" / "1" / f"seg_{n}.m4s").write_bytes(os.urandom(size))
    (root / "t1" / "v" / "1" / "init.mp4").write_bytes(os.urandom(900))
    return root


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A filesystem of its own at ``path``, ``size`` large: a disk that fills up, and another
    filesystem than the origin's. Mounting needs root; the test is skipped without it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def origin_dir(tmp_path: Path) -> Path:
    return make_origin(tmp_path / "origin")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, Path]]:
    """One edge for the tests that only read: starting a process per test costs seconds."""
    tmp = tmp_path_factory.mktemp("edge")
    origin = make_origin(tmp / "origin")
    e = start_edge(tmp, origin, header_timeout_s=1.0, send_timeout_s=5.0)
    yield e, origin
    e.stop(signal.SIGKILL)


@pytest.fixture
def edge(shared: tuple[Edge, Path]) -> Edge:
    return shared[0]


@pytest.fixture
def shared_origin(shared: tuple[Edge, Path]) -> Path:
    return shared[1]


@dataclass
class CountingOrigin:
    """A real HTTP origin that counts requests and can trickle bodies slowly or hang."""

    root: Path
    server: http.server.ThreadingHTTPServer
    requests: dict[str, int] = field(default_factory=dict)
    trickle_s: float = 0.0  # pause between 64 KB chunks
    hang: bool = False
    # Every answer waits for this: a test holds the origin until its requests reached the edge.
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def http_origin(origin_dir: Path) -> Iterator[CountingOrigin]:
    state: dict[str, CountingOrigin] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            o = state["o"]
            with o.lock:
                o.requests[self.path] = o.requests.get(self.path, 0) + 1
            if o.hang:
                time.sleep(30)
                return
            o.gate.wait(30)
            path = o.root / self.path.lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
            self.end_headers()
            for i in range(0, len(data), 65536):
                self.wfile.write(data[i : i + 65536])
                if o.trickle_s:
                    self.wfile.flush()
                    time.sleep(o.trickle_s)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["o"] = CountingOrigin(origin_dir, server)
    state["o"].gate.set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state["o"]
    server.shutdown()
