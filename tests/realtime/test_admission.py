"""A gateway's admission limits raised for a planned event's window: the pure rule, and one
gateway process over real WebSockets whose clock moves through the window."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from streamplane.realtime.admission import (
    Admission,
    AdmissionPlan,
    AdmissionWindow,
    admission_at,
    decode_admission_plan,
)
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.tokens import sign_realtime_token

KEY = b"k" * 32
NORMAL = Admission(rate=1.0, burst=5, max_connections=10)

limits = st.builds(
    Admission,
    rate=st.floats(0, 1e6),
    burst=st.integers(0, 10**6),
    max_connections=st.integers(0, 10**6),
)
windows = st.builds(
    AdmissionWindow,
    channel=st.sampled_from(["a", "b", "c"]),
    start=st.floats(0, 1000),
    end=st.floats(0, 1000),
    limits=limits,
)


@given(limits, st.lists(windows, max_size=5), st.floats(-10, 1010))
def test_limits_are_the_normal_ones_raised_by_the_open_windows_added_up(
    normal: Admission, planned: list[AdmissionWindow], now: float
) -> None:
    got = admission_at(normal, planned, now)
    open_now = [w.limits for w in planned if w.start <= now < w.end]
    assert got.rate >= normal.rate and got.burst >= normal.burst
    assert got.max_connections >= normal.max_connections
    if not open_now:
        assert got == normal
    else:
        assert got.rate == max(normal.rate, sum(a.rate for a in open_now))
        assert got.burst == max(normal.burst, sum(a.burst for a in open_now))
        assert got.max_connections == max(
            normal.max_connections, sum(a.max_connections for a in open_now)
        )


def test_a_malformed_plan_is_refused_saying_so() -> None:
    with pytest.raises(ValueError, match="not an admission plan"):
        decode_admission_plan(b'{"processes": 1, "windows": [{"channel": "x"}]}')
    plan = AdmissionPlan(
        processes=2, windows=[AdmissionWindow(channel="x", start=1, end=2, limits=NORMAL)]
    )
    import msgspec

    assert decode_admission_plan(msgspec.json.encode(plan)) == plan


async def _surge(url: str, n: int) -> tuple[list[ClientConnection], int]:
    """``n`` viewers at once; the connections admitted (held open) and the number refused."""
    token = sign_realtime_token(
        KEY, user="ann", channels={"event:*": ["read"]}, now=int(time.time()), ttl_s=3600
    )

    async def one() -> ClientConnection | None:
        try:
            return await connect(f"{url}/connect?token={token}")
        except InvalidStatus as err:
            assert err.response.status_code == 503
            assert int(err.response.headers["Retry-After"]) >= 1
            return None

    answers = await asyncio.gather(*(one() for _ in range(n)))
    held = [ws for ws in answers if ws is not None]
    return held, n - len(held)


async def _close(held: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in held))


async def test_a_surge_refused_before_the_window_is_admitted_inside_it_and_refused_after() -> None:
    shift = 0.0  # the gateway's clock, moved through the window
    gateway = Gateway(
        MemoryHub().node(),
        GatewaySettings(
            token_key=KEY,
            admission_rate=NORMAL.rate,
            admission_burst=NORMAL.burst,
            max_connections=NORMAL.max_connections,
        ),
        clock=lambda: time.time() + shift,
    )
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}"
    now = time.time()
    raised = Admission(rate=100.0, burst=200, max_connections=100)
    gateway.plan_admission(
        [AdmissionWindow(channel="final", start=now + 600, end=now + 1200, limits=raised)]
    )
    try:
        held, refused = await _surge(url, 40)
        assert len(held) <= NORMAL.burst and refused >= 35, "before the window: normal limits"
        await _close(held)

        shift = 700.0  # inside the window
        held, refused = await _surge(url, 40)
        assert refused == 0 and len(held) == 40, "inside the window, the surge is admitted"
        assert gateway.limits == raised
        # ... up to the raised connection limit: 40 held, 60 more come, the rest wait
        more, refused = await _surge(url, 70)
        assert len(more) == 60 and refused == 10
        await _close(held + more)

        shift = 1300.0  # the event is over: back to normal
        held, refused = await _surge(url, 40)
        assert len(held) <= NORMAL.burst and refused >= 35, "after the window: normal limits"
        assert gateway.limits == NORMAL
        await _close(held)
    finally:
        await gateway.close()


async def test_two_events_at_once_add_their_audiences() -> None:
    gateway = Gateway(
        MemoryHub().node(),
        GatewaySettings(token_key=KEY, admission_rate=1, admission_burst=5, max_connections=10),
    )
    now = time.time()
    a = Admission(rate=10, burst=20, max_connections=30)
    gateway.plan_admission(
        [
            AdmissionWindow(channel="a", start=now - 1, end=now + 600, limits=a),
            AdmissionWindow(channel="b", start=now - 1, end=now + 600, limits=a),
        ]
    )
    assert gateway.admit() is None
    assert gateway.limits == Admission(rate=20, burst=40, max_connections=60)
