"""``streamplane gateway`` as a user starts it: a real process, a real client, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

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
    assert "connection open" not in out, "no log line per connection: a storm would write 100k"


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


async def test_a_gateway_killed_mid_stream_makes_its_clients_reconnect_and_reload() -> None:
    """kill -9 takes the in-memory streams with it: back on the same port, the clients come back
    on their own and reload (a new epoch), rather than trusting positions from the old one."""
    port = free_port()
    proc = _gateway("--port", str(port))
    token = sign_realtime_token(
        bytes.fromhex(KEY),
        user="ann",
        channels={"chat:*": ["read", "publish"]},
        now=int(time.time()),
        ttl_s=120,
    )
    client = RealtimeClient(
        f"ws://127.0.0.1:{port}", token, channels=["chat:final"], backoff_base=0.05, backoff_cap=0.5
    )
    client.start()
    try:
        await asyncio.wait_for(client.synced.wait(), 30)
        first = await client.publish("chat:final", {"text": "before"})
        assert first.position is not None
        proc.kill()
        proc.wait(10)
        await asyncio.wait_for(_until(lambda: not client.connected.is_set()), 10)
        proc = _gateway("--port", str(port))
        await asyncio.wait_for(_until(lambda: client.views["chat:final"].reloads == 2), 30)
        again = await client.publish("chat:final", {"text": "after"})
        assert again.position is not None and again.position.epoch != first.position.epoch
        assert client.cursor.position("chat:final") is not None
    finally:
        await client.stop()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.02)


def test_gateway_load_on_its_own_redis_and_gateways_survives_a_redis_restart() -> None:
    """--gateways: a private redis-server and two gateway processes on one port; the surge
    meets admission (503 + Retry-After), then fan-out, a storm, and Redis killed and restarted
    empty mid-stream: nothing lost, nothing applied twice, no stale value shown as current."""
    args = ["--port", str(free_port()), "--connections", "40", "--processes", "2"]
    args += ["--gateways", "2", "--messages", "3", "--storm-messages", "3", "--interval", "0.05"]
    args += ["--admission-rate", "5", "--admission-burst", "5"]
    load = subprocess.run(
        [sys.executable, "-m", "streamplane", "gateway-load", *args],
        env={**os.environ, "COLUMNS": "200"},  # one line per row; --gateways signs its own
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = load.stdout + load.stderr
    assert load.returncode == 0, out
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in load.stdout.splitlines()
        if line.count("│") == 3
    }
    assert rows["connections held"] == "40"
    refused = int(rows["surge: all admitted in"].split("(")[1].split()[0])
    assert refused > 0, "past the admission rate, handshakes are answered 503"
    assert rows["surge: a 503 answered in p50 / p99"].endswith("(0 without Retry-After)")
    alive, _, started = rows["gateway processes still running"].partition(" of ")
    assert alive == started == "2", "refused fast, never fallen over (and only gateways counted)"
    assert rows["stale shown as current"] == "0"
    assert rows["Redis restart: lost / applied twice"] == "0 / 0"
    assert int(rows["Redis restart: told to reload"]) >= 40, "an emptied Redis is a new epoch"
