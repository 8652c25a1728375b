from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from streamplane.stack import free_port

KEY = "test-stream-key-1"


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamplane", *args]


@dataclass
class LiveChannel:
    """A `streamplane live start` process and how to reach it."""

    name: str
    srt_port: int
    http_port: int
    root: Path
    process: subprocess.Popen[bytes]
    rtmp_port: int | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/{self.name}"

    def status(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.base}/status.json", timeout=5).json())

    def feed(
        self, seconds: float, key: str = KEY, source: str = "testsrc", *, rtmp: bool = False
    ) -> subprocess.Popen[bytes]:
        to = f"rtmp://127.0.0.1:{self.rtmp_port}" if rtmp else f"srt://127.0.0.1:{self.srt_port}"
        return subprocess.Popen(
            _cli(
                "live",
                "feed",
                self.name,
                "--to",
                to,
                "--stream-key",
                key,
                "--seconds",
                str(seconds),
                "--source",
                source,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )


@pytest.fixture
def start_channel(tmp_path: Path) -> Iterator[Callable[..., LiveChannel]]:
    started: list[LiveChannel] = []

    def start(name: str = "ch1", *extra: str, rtmp: bool = False) -> LiveChannel:
        srt, http = free_port(socket.SOCK_DGRAM), free_port()
        rtmp_port = free_port() if rtmp else None
        if rtmp_port is not None:
            extra = (*extra, "--rtmp-listen", str(rtmp_port))
        process = subprocess.Popen(
            _cli(
                "live",
                "start",
                name,
                "--srt-listen",
                str(srt),
                "--port",
                str(http),
                "--root",
                str(tmp_path / "live"),
                "--stream-key",
                KEY,
                *extra,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        channel = LiveChannel(name, srt, http, tmp_path / "live", process, rtmp_port)
        started.append(channel)

        def answering() -> bool:
            try:
                return httpx.get(f"{channel.base}/status.json", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                return False

        wait_for(answering, 20, "the live origin")
        return channel

    yield start
    for channel in started:
        if channel.process.poll() is None:
            channel.process.send_signal(signal.SIGTERM)
            try:
                channel.process.wait(15)
            except subprocess.TimeoutExpired:
                channel.process.kill()
                channel.process.wait()


def status_problems(channel: LiveChannel) -> list[str]:
    problems = channel.status()["problems"]
    assert isinstance(problems, list)
    return [json.dumps(p) for p in problems]
