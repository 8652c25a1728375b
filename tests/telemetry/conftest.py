"""Streams to test against: the embedded engine in a temp dir and JetStream on the shared
server (a unique stream per test, deleted after); a private ``nats-server`` for restarts."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from streamplane.stack import free_port
from streamplane.telemetry import EventBatch, HeartbeatEvent, Stream
from streamplane.telemetry.stream_embedded import EmbeddedStream
from streamplane.telemetry.stream_nats import NatsStream

SHARED_NATS = "nats://127.0.0.1:4222"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

Opener = Callable[[], Awaitable[Stream]]


def batch(device: str, n: int, at: float = 1_800_000_000.0, **kw: object) -> EventBatch:
    """A batch of one event from ``device``: position ``n`` at ``at + n``, sequence ``n``."""
    event = HeartbeatEvent(
        account=kw.pop("account", "acc"),  # type: ignore[arg-type]
        session=kw.pop("session", f"s-{device}"),  # type: ignore[arg-type]
        device=device,
        title=kw.pop("title", "demo"),  # type: ignore[arg-type]
        received_at=at + n,
        at=at + n,
        seq=n,
        kind=kw.pop("kind", "position"),  # type: ignore[arg-type]
        position_s=float(n),
    )
    return EventBatch(device=device, events=[event])


def _nats_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 4222), 0.5):
        return True
    return False


@pytest.fixture(params=["embedded", "nats"])
async def open_stream(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the same stream each call (a restart of a process is a second call)."""
    opened: list[Stream] = []
    name = f"T{uuid.uuid4().hex[:16]}"
    if request.param == "nats" and not _nats_reachable():
        pytest.skip("no NATS server at 127.0.0.1:4222")

    async def opener() -> Stream:
        stream: Stream
        if request.param == "embedded":
            stream = EmbeddedStream(tmp_path / "stream", partitions=4)
        else:
            stream = await NatsStream.open(SHARED_NATS, name=name, partitions=4)
        opened.append(stream)
        return stream

    yield opener
    if request.param == "nats":
        cleaner = await NatsStream.open(SHARED_NATS, name=name, partitions=4)
        await cleaner.delete()
        await cleaner.close()
    for stream in opened:
        with contextlib.suppress(Exception):
            await stream.close()


class PrivateNats:
    """A ``nats-server -js`` of the test's own, on a free port with its own store."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError("the private nats-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("no nats-server binary")
    server = PrivateNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()
