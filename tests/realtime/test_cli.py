"""``streamplane gateway`` as a user starts it: a real process, a real client, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from streamplane.realtime.client import RealtimeClient
from streamplane.realtime.tokens import sign_realtime_token
from streamplane.stack import free_port

KEY = "3c" * 32


def _gateway(*args: str, key: str = KEY) -> subprocess.Popen[str]:
    env = {**os.environ, "STREAMPLANE_REALTIME_TOKEN_KEY": key}
    return subprocess.Popen(
        [sys.executable, "-m", "streamplane", "gateway", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_settings_that_cannot_run_are_refused_with_what_to_set() -> None:
    no_key = _gateway("--port", "0", key="")
    out, _ = no_key.communicate(timeout=60)
    assert no_key.returncode == 2 and "realtime.token_key is not set" in out
    split = _gateway("--port", "0", "--processes", "2")
    out, _ = split.communicate(timeout=60)
    assert split.returncode == 2 and "needs a broker shared by the processes" in out


async def test_the_gateway_serves_a_client_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = _gateway("--port", str(port))
    try:
        token = sign_realtime_token(
            bytes.fromhex(KEY),
            user="ann",
            channels={"chat:*": ["read", "publish"]},
            now=int(time.time()),
            ttl_s=60,
        )
        client = RealtimeClient(f"ws://127.0.0.1:{port}", token, channels=["chat:final"])
        client.start()
        try:
            await asyncio.wait_for(client.synced.wait(), 30)
            reply = await client.publish("chat:final", {"text": "hi"})
            assert reply.position is not None and reply.position.offset == 1
        finally:
            await client.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "open-file limit" in out, "the limit it runs with is logged"


def test_gateway_load_runs_fan_out_and_a_storm_and_finds_nothing_lost() -> None:
    port = free_port()
    proc = _gateway("--port", str(port))
    try:
        env = {**os.environ, "STREAMPLANE_REALTIME_TOKEN_KEY": KEY}
        args = ["--port", str(port), "--connections", "60", "--processes", "2"]
        args += ["--messages", "3", "--storm-messages", "3"]
        load = subprocess.run(
            [sys.executable, "-m", "streamplane", "gateway-load", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert load.returncode == 0, load.stdout + load.stderr
        assert "connections held" in load.stdout and "60" in load.stdout
        lost_row = next(line for line in load.stdout.splitlines() if "lost" in line)
        assert lost_row.split()[-2] == "0", lost_row
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
