"""The load tool against a real gateway: what it counts as admitted and subscribed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from streamplane.realtime.load import run_load
from streamplane.stack import free_port
from tests.realtime.fault_proxy import FaultProxy

KEY = bytes.fromhex("5d" * 32)


@pytest.fixture
def gateway_port() -> Iterator[int]:
    """``streamplane gateway`` on the memory engine, as a user starts it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamplane", "gateway", "--port", str(port)],
        env={**os.environ, "STREAMPLANE_REALTIME_TOKEN_KEY": KEY.hex()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_handshake_closed_before_its_answer_is_dialled_again_not_counted_admitted(
    gateway_port: int,
) -> None:
    """A gateway drops a handshake it did not get whole in time, with no answer. The viewer was
    not admitted: it must dial again and end subscribed, and the cut is counted, not taken for
    a viewer that connected and was never answered."""
    loop = asyncio.new_event_loop()
    proxy = FaultProxy(("127.0.0.1", gateway_port))
    proxy.hang_up_from, proxy.hang_ups = "127.0.0.2", 4  # the load process's viewers
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(30)
        report = run_load(
            proxy.port,
            KEY,
            connections=12,
            processes=1,
            messages=2,
            storm_messages=0,
            interval=0.05,
            storm=False,
            quiet_s=5.0,
        )
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    assert proxy.hang_ups == 0, "the viewers' first four dials were hung up"
    # at least those four: on a starved machine the gateway's own timer may cut one more
    assert report.handshakes_cut >= 4
    assert report.held == 12, report.why_unconnected
    assert report.unconnected == 0, report.why_unconnected
    assert report.lost == 0 and report.holes == 0 and report.repeats == 0
