"""Private ``redis-server`` processes for the tests that restart or cluster Redis.

The shared Redis (127.0.0.1:6379) is never stopped or reconfigured: a test that needs a Redis it
may kill starts its own here, on a free loopback port, without persistence (as the realtime
engines are meant to run). Each process gets PR_SET_PDEATHSIG so that even a pytest killed with
-9 leaves no server behind, and every helper kills what it started in ``finally``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from streamplane.lifetime import child_setup
from streamplane.stack import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SHARED_REDIS = ("127.0.0.1", 6379)


def reachable(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, 0.5):
        return True
    return False


def have_redis_server() -> bool:
    return Path(REDIS_SERVER).exists()


class RedisServer:
    """One ``redis-server`` of the test's own; ``kill``/``start`` again is a restart on the same
    port that comes back empty (no persistence), as a crashed Redis does."""

    def __init__(self, workdir: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.cluster = cluster
        self.bus_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            # The bus port defaults to port + 10000, past 65535 for a high free port.
            self.bus_port = self.bus_port or free_port()
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
            # The other shards keep serving while one is down (what the realtime engine wants).
            args += ["--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_setup(signal.SIGTERM),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited: {self.log_tail()}")
            if self.cli("PING", check=False).strip() == "PONG":
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on {self.port} did not answer: {self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "redis.log").read_text().splitlines()[-10:])
        return ""


class RedisClusterServers:
    """A real Redis Cluster: three primaries (``--cluster-enabled yes``), slots split by
    ``redis-cli --cluster create``, no replicas."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(size)]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    def start(self, timeout: float = 20.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create"]
                + [f"127.0.0.1:{node.port}" for node in self.nodes]
                + ["--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                check=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every node says the cluster is up (all slots served, the nodes agree)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()
