"""A gateway's admission limits raised for a planned event's window: the pure rule, and one
gateway process over real WebSockets whose clock moves through the window."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from streamplane.config import RealtimeSettings
from streamplane.realtime.admission import (
    ADMISSION_CHANNEL,
    Admission,
    AdmissionPlan,
    AdmissionWindow,
    admission_at,
    decode_admission_plan,
)
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.serve import poll_admission
from streamplane.realtime.tokens import rights_on, sign_realtime_token, verify_realtime_token

KEY = b"k" * 32
# A rate that refills nothing within a test however slowly the machine runs its surge.
NORMAL = Admission(rate=0.001, burst=5, max_connections=10)

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


async def test_a_raise_past_what_the_process_can_hold_stops_at_its_ceiling() -> None:
    gateway = Gateway(
        MemoryHub().node(),
        GatewaySettings(
            token_key=KEY,
            admission_rate=1,
            admission_burst=5,
            max_connections=10,
            connection_ceiling=30,  # its open-file limit, less what it keeps for itself
        ),
    )
    port = await gateway.start("127.0.0.1", 0)
    now = time.time()
    raised = Admission(rate=100, burst=200, max_connections=100)
    gateway.plan_admission(
        [AdmissionWindow(channel="final", start=now - 1, end=now + 600, limits=raised)]
    )
    try:
        held, refused = await _surge(f"ws://127.0.0.1:{port}", 40)
        assert len(held) == 30 and refused == 10, "a 503 past the ceiling, not a failed accept"
        assert gateway.limits == Admission(rate=100, burst=200, max_connections=30)
        await _close(held)
    finally:
        await gateway.close()


async def test_the_poll_keeps_the_last_plan_when_the_control_plane_fails() -> None:
    """The gateway's poll (serve.poll_admission) against a control plane that answers the plan,
    then errors and garbage: the windows taken stand, and each request carries a token for
    control:admission signed with the gateways' key."""
    window = AdmissionWindow(
        channel="final", start=time.time() - 1, end=time.time() + 600, limits=NORMAL
    )
    answers = [(200, msgspec.json.encode(AdmissionPlan(processes=1, windows=[window])))]
    seen: list[str] = []

    class Control(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = self.headers["authorization"].removeprefix("Bearer ")
            grant = verify_realtime_token(token, KEY, now=int(time.time()))
            seen.append(f"{self.path} {sorted(rights_on(grant, ADMISSION_CHANNEL))}")
            status, body = answers[-1]
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = Gateway(MemoryHub().node(), GatewaySettings(token_key=KEY))
    settings = RealtimeSettings(
        token_key=KEY.hex(),
        control_url=f"http://127.0.0.1:{server.server_address[1]}",
        admission_poll_s=0.05,
    )
    poll = asyncio.create_task(poll_admission(gateway, settings))
    try:
        while gateway.windows != [window]:
            await asyncio.sleep(0.05)
        assert seen[0] == "/v1/live/admission ['read']"
        for failure in ((500, b"oops"), (200, b"<html>")):
            answers.append(failure)
            polled = len(seen)
            while len(seen) < polled + 2:
                await asyncio.sleep(0.05)
            assert gateway.windows == [window], "a failed poll keeps the plan taken last"
    finally:
        poll.cancel()
        server.shutdown()
