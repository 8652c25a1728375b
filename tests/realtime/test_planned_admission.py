"""The control plane raises the realtime gateways' admission for a scheduled event: two gateway
processes (one port, Redis between them) poll GET /v1/live/admission; a surge of viewers is
refused before the event's window, admitted inside it, and refused again once it is over."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from streamplane.stack import LocalStack
from tests.realtime.test_admission import KEY, _close, _surge

pytestmark = pytest.mark.timeout(180)

POLL_S = 0.3


def _schedule(path: Path, start: float, viewers: int) -> None:
    when = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(
        f'[[event]]\nchannel = "ch1"\nstart = "{when}"\nexpected_viewers = {viewers}\n'
        "bitrate_kbps = 1000\n"
    )


def _refused(url: str, n: int) -> int:
    async def surge() -> int:
        held, refused = await _surge(url, n)
        await _close(held)
        return refused

    return asyncio.run(surge())


def _raised_on_every_process(stack: LocalStack, raised: bool) -> None:
    """Wait until every gateway process says so: /health answers from either process (the
    kernel picks), so 20 answers in a row must agree."""
    deadline = time.monotonic() + 60
    agreed = 0
    while agreed < 20:
        health = httpx.get(f"http://127.0.0.1:{stack.gateway_port}/health", timeout=10).json()
        admission = health["admission"]
        ok = admission["windows"] == 1 and (admission["raised_for"] == ["ch1"]) == raised
        agreed = agreed + 1 if ok else 0
        assert time.monotonic() < deadline, f"the gateways did not take the plan: {health}"
        time.sleep(POLL_S / 4)


def test_gateways_refuse_a_surge_before_the_event_and_admit_it_inside_its_window(
    tmp_path: Path,
) -> None:
    events = tmp_path / "events.toml"
    # 24,000 viewers over 120 s: 200 joins/s, 2,000 at once, 28,800 connections in all;
    # each of the 2 processes takes half
    _schedule(events, time.time() + 7200, 24_000)  # its warm-up starts in 1 h 45 min
    (tmp_path / "catalog").mkdir()
    with LocalStack(
        tmp_path / "catalog",
        tmp_path / "work",
        edges=1,
        control_settings={"live_channels": ["ch1"], "live_events": str(events)},
        realtime_settings={
            "token_key": KEY.hex(),  # the surge signs with it
            "broker": "redis://127.0.0.1:6379",
            "processes": 2,
            "admission_rate": 0.001,  # no refill within the test, however slow
            "admission_burst": 5,
            "max_connections": 10,
            "admission_poll_s": POLL_S,
        },
    ) as stack:
        url = stack.gateway_url

        _raised_on_every_process(stack, raised=False)  # the plan taken, its window not open
        refused = _refused(url, 40)
        assert refused >= 40 - 2 * 5, "before the window each process admits its burst of 5"

        _schedule(events, time.time() + 600, 24_000)  # warming now: the window is open
        _raised_on_every_process(stack, raised=True)
        health = httpx.get(f"http://127.0.0.1:{stack.gateway_port}/health", timeout=10).json()
        assert health["admission"]["rate"] == 100 and health["admission"]["burst"] == 1000
        assert health["admission"]["max_connections"] == 14_400
        refused = _refused(url, 40)
        assert refused == 0, "inside the window every process admits the surge"

        _schedule(events, time.time() - 5 * 3600, 24_000)  # over
        _raised_on_every_process(stack, raised=False)
        refused = _refused(url, 40)
        assert refused >= 40 - 2 * 5, "once the event is over, the normal limits again"
