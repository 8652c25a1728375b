from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamplane.player import (
    PHASES,
    CadenceRule,
    CadenceState,
    heartbeat_due,
    heartbeat_interval,
    next_heartbeat_s,
)


def test_fast_around_events_slow_when_steady() -> None:
    assert heartbeat_interval(CadenceState(3.0, "startup")) == 1.0
    assert heartbeat_interval(CadenceState(50.0, "seek", 0.0)) == 1.0
    assert heartbeat_interval(CadenceState(50.0, "steady", 45.0)) == 2.0  # 5 s after a switch
    assert heartbeat_interval(CadenceState(70.0, "steady", 10.0)) == 30.0  # a calm minute
    assert heartbeat_interval(CadenceState(1000.0, "steady", 10.0)) == 60.0


def test_an_event_after_a_quiet_stretch_is_reported_at_once() -> None:
    quiet = CadenceState(now_s=200.0, phase="steady", last_event_s=0.0, last_heartbeat_s=180.0)
    assert not heartbeat_due(quiet)  # next at 180 + 60
    switched = CadenceState(now_s=200.0, phase="steady", last_event_s=200.0, last_heartbeat_s=180.0)
    assert heartbeat_due(switched)
    assert next_heartbeat_s(CadenceState(5.0, "steady", 0.0, None)) == 5.0


def test_the_rule_is_a_setting() -> None:
    rule = CadenceRule(urgent_s=0.5, max_s=30.0)
    assert heartbeat_interval(CadenceState(1.0, "rebuffering"), rule) == 0.5
    assert heartbeat_interval(CadenceState(1000.0, "steady", 0.0), rule) == 30.0


@given(
    st.floats(0, 10_000),
    st.one_of(st.none(), st.floats(0, 10_000)),
    st.sampled_from(PHASES),
)
def test_interval_bounds(now: float, event: float | None, phase: str) -> None:
    s = CadenceState(now, phase, None if event is None or event > now else event)  # type: ignore[arg-type]
    i = heartbeat_interval(s)
    assert 1.0 <= i <= 60.0
    if phase != "steady":
        assert i == 1.0
    else:
        later = CadenceState(now + 30.0, "steady", s.last_event_s)
        assert heartbeat_interval(later) >= i  # quiet time never speeds heartbeats up
