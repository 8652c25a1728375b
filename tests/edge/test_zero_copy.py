"""Segment bytes go from the page cache to the socket by sendfile, never through Python.

The edge runs under ``strace -f``; every syscall that moves bytes is logged with its result.
If a body went through user space, its bytes would show up in read/write/send calls.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.edge.conftest import KEY_HEX, free_port, token

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs Debian's strace (apt-get install strace)"
)

# "PID name(fd, ...) = N", or for a call another thread interrupted "PID <... name resumed>...) = N"
_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)(?:\(| resumed>).*\)\s+=\s+(-?\d+)")


def _moved(trace: Path) -> dict[str, int]:
    """Bytes returned by each byte-moving syscall, summed over every process."""
    totals: dict[str, int] = {}
    for line in trace.read_text(errors="replace").splitlines():
        m = _CALL.match(line)
        if m and int(m.group(2)) > 0:
            totals[m.group(1)] = totals.get(m.group(1), 0) + int(m.group(2))
    return totals


def test_segment_bodies_are_sent_by_sendfile(tmp_path: Path) -> None:
    size = 24_000_000
    origin = tmp_path / "origin" / "t"
    origin.mkdir(parents=True)
    (origin / "seg_1.m4s").write_bytes(os.urandom(size))
    port = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[tokens]\nkeys = {{ k1 = "{KEY_HEX}" }}\n[edge]\norigin = "{origin.parent}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\nport = {port}\nhost = "127.0.0.1"\n'
        "workers = 1\naccess_log = false\n"
    )
    trace = tmp_path / "trace.txt"
    edge = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=sendfile,read,write,writev,sendto,sendmsg,pwrite64,pread64",
            sys.executable,
            "-m",
            "streamplane",
            "edge",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/t/seg_1.m4s"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        before = _moved(trace)
        for _ in range(3):  # a miss (pulled from the origin) then hits
            r = httpx.get(url, params={"__token__": token()}, timeout=60)
            assert r.status_code == 200 and len(r.content) == size
        time.sleep(0.5)
        after = _moved(trace)
    finally:
        # signal the edge under strace, not strace (which would detach and leave it running)
        for child in Path(f"/proc/{edge.pid}/task/{edge.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
        try:
            edge.wait(30)
        except subprocess.TimeoutExpired:
            edge.kill()
    grew = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert grew.get("sendfile", 0) >= 3 * size
    copied = sum(n for name, n in grew.items() if name != "sendfile")
    # headers, metrics snapshots and the keeper's messages: kilobytes, not the 72 MB of bodies
    assert copied < 1_000_000, grew
