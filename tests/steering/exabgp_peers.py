"""Real ExaBGP routers for tests: an ISP's router on loopback, announcing what a test tells
it, and the process helpers the supervision tests use."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from streamplane.steering import find_exabgp

ISP, SITE = "127.0.0.2", "127.0.0.3"
ISP_AS, SITE_AS = 64500, 64512
COMMANDS = Path(__file__).with_name("isp_commands.py")


def free_port() -> int:
    """A port free on both loopback addresses (each speaker listens on its own)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((ISP, 0))
            port = int(probe.getsockname()[1])
            with socket.socket() as other:
                try:
                    other.bind((SITE, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on both loopback addresses")


class IspRouter:
    """An ExaBGP announcing what the test writes to its command FIFO."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.fifo = workdir / "commands"
        self.process: asyncio.subprocess.Process | None = None
        self._writer: int | None = None

    async def start(self) -> None:
        os.mkfifo(self.fifo)
        self._writer = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        config = self.workdir / "isp.conf"
        config.write_text(
            f"process commands {{\n  run {sys.executable} {COMMANDS} {self.fifo};\n"
            "  encoder json;\n}\n"
            f"neighbor {SITE} {{\n  router-id {ISP};\n  local-address {ISP};\n"
            f"  local-as {ISP_AS};\n  peer-as {SITE_AS};\n"
            "  family { ipv4 unicast; ipv6 unicast; }\n"
            "  api { processes [ commands ]; }\n}\n"
        )
        env = {
            **os.environ,
            "exabgp_tcp_port": str(self.port),
            "exabgp_tcp_bind": ISP,
            "exabgp_daemon_user": getpass.getuser(),
            "exabgp_api_cli": "false",
        }
        with (self.workdir / "isp.log").open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(find_exabgp()),
                str(config),
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    def send(self, command: str) -> None:
        assert self._writer is not None
        os.write(self._writer, (command + "\n").encode())

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Seconds until ``check()`` holds; fails the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead, only not yet reaped by its parent.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


@asynccontextmanager
async def isp_router(workdir: Path) -> AsyncIterator[IspRouter]:
    """An ISP router running on a free port, stopped at the end."""
    router = IspRouter(workdir, free_port())
    await router.start()
    try:
        yield router
    finally:
        await router.stop()
