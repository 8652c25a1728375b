"""The fleet rules as pure functions: who is offered, and the slow-start share."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.control.errors import ApiError
from streamplane.control.fleet import (
    EdgeView,
    FleetPolicy,
    _offer_shape,
    candidates,
    check_heartbeat,
    exclusion,
    next_up_since,
    share,
    state,
)
from streamplane.edge import EdgeHeartbeat
from streamplane.steering import SiteInfo

POLICY = FleetPolicy(timeout_s=6.0, slow_start_s=60.0, slow_start_floor=0.1)


def view(**kw: Any) -> EdgeView:
    base: dict[str, Any] = {
        "edge_id": "e1",
        "site": "ams",
        "base_url": "http://e1:8081",
        "lat": None,
        "lon": None,
        "throughput_bps": 1e8,
        "capacity_bps": 1e9,
        "connections": 1,
        "disk_used_bytes": 0,
        "disk_total_bytes": 1,
        "titles": frozenset({"demo"}),
        "healthy": True,
        "draining": False,
        "sent_at": 0.0,
        "received_at": 100.0,
        "up_since": 0.0,
    }
    base.update(kw)
    return EdgeView(**base)


def hb(**kw: Any) -> EdgeHeartbeat:
    base: dict[str, Any] = {
        "edge_id": "e1",
        "base_url": "http://e1:8081",
        "site": "ams",
        "throughput_bps": 1e8,
        "capacity_bps": 1e9,
        "connections": 1,
        "disk_used_bytes": 0,
        "disk_total_bytes": 1,
        "titles": ("demo",),
        "healthy": True,
        "draining": False,
        "sent_at": 0.0,
    }
    base.update(kw)
    return EdgeHeartbeat(**base)


@pytest.mark.parametrize(
    ("changes", "now", "word"),
    [
        ({}, 106.0, None),  # exactly at the timeout: still fresh
        ({}, 106.5, "stale"),
        ({"healthy": False}, 101.0, "unhealthy"),
        ({"draining": True}, 101.0, "draining"),
        ({"throughput_bps": 1e9}, 101.0, "overloaded"),  # at capacity is full
        ({"throughput_bps": 2e9}, 101.0, "overloaded"),
    ],
)
def test_exclusions(changes: dict[str, Any], now: float, word: str | None) -> None:
    edge = view(**changes)
    why = exclusion(edge, now, POLICY)
    assert (why is None) == (word is None)
    if word is not None:
        assert why is not None and why.startswith(word)
        assert state(edge, now, POLICY) == word
        assert candidates([edge], now, POLICY, {}) == []


def test_slow_start_ramps_linearly_from_the_floor() -> None:
    assert share(100.0, 100.0, POLICY) == pytest.approx(0.1)
    assert share(100.0, 130.0, POLICY) == pytest.approx(0.55)
    assert share(100.0, 160.0, POLICY) == 1.0
    assert share(None, 160.0, POLICY) == 0.0
    assert share(0.0, 1.0, FleetPolicy(timeout_s=1, slow_start_s=0, slow_start_floor=0)) == 1.0
    assert state(view(up_since=99.0), 101.0, POLICY) == "slow-start"
    assert state(view(up_since=0.0), 101.0, POLICY) == "up"


@given(
    up=st.floats(0, 1e6),
    a=st.floats(0, 1e6),
    b=st.floats(0, 1e6),
    floor=st.floats(0, 1),
    ramp=st.floats(0, 1e4),
)
def test_share_is_monotone_and_bounded(
    up: float, a: float, b: float, floor: float, ramp: float
) -> None:
    policy = FleetPolicy(timeout_s=6, slow_start_s=ramp, slow_start_floor=floor)
    lo, hi = sorted((a, b))
    s_lo, s_hi = share(up, lo, policy), share(up, hi, policy)
    assert 0 < s_lo <= s_hi <= 1.0


def test_up_since_is_kept_while_offerable_and_restarts_on_recovery() -> None:
    steady = view(received_at=100.0, up_since=10.0)
    assert next_up_since(steady, hb(), 102.0, POLICY) == 10.0
    # silent past the timeout, then back: slow start again from now
    assert next_up_since(steady, hb(), 120.0, POLICY) == 120.0
    # was unhealthy (so not offered) and reports healthy: slow start
    sick = view(received_at=100.0, healthy=False, up_since=None)
    assert next_up_since(sick, hb(), 102.0, POLICY) == 102.0
    # new edge: slow start too
    assert next_up_since(None, hb(), 50.0, POLICY) == 50.0
    # reports draining / unhealthy / overloaded: not offerable at all
    assert next_up_since(steady, hb(draining=True), 102.0, POLICY) is None
    assert next_up_since(steady, hb(healthy=False), 102.0, POLICY) is None
    assert next_up_since(steady, hb(throughput_bps=5e9), 102.0, POLICY) is None


def test_candidates_carry_load_share_and_site_coordinates() -> None:
    edges = [
        view(edge_id="b", up_since=95.0, throughput_bps=5e8),
        view(edge_id="a", lat=1.0, lon=2.0),
        view(edge_id="c", draining=True),
    ]
    sites = {"ams": SiteInfo("ams", 52.37, 4.9)}
    out = candidates(edges, 101.0, POLICY, sites)
    assert [c.edge_id for c in out] == ["a", "b"]
    a, b = out
    assert (a.lat, a.lon) == (1.0, 2.0)  # the edge's own coordinates first
    assert (b.lat, b.lon) == (52.37, 4.9)  # else its site's
    assert b.load == pytest.approx(0.5)
    assert b.share == pytest.approx(0.1 + 0.9 * 6 / 60)
    assert a.share == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"edge_id": "../x"}, "edge_id"),
        ({"site": ""}, "site"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "http://x/path"}, "base_url"),
        ({"base_url": "http://x:99999"}, "bad port"),
        ({"lat": 91.0, "lon": 0.0}, "lat"),
        ({"lat": 1.0}, "both lat and lon"),
        ({"capacity_bps": 0.0}, "capacity_bps"),
        ({"throughput_bps": -1.0}, "throughput_bps"),
        ({"throughput_bps": float("inf")}, "throughput_bps"),
        ({"connections": -1}, "connections"),
        ({"titles": ("ok", "../../etc")}, "invalid title ids"),
    ],
)
def test_heartbeats_no_edge_can_mean_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError, match=message) as caught:
        check_heartbeat(hb(**changes))
    assert caught.value.status == 422


def test_a_good_heartbeat_passes() -> None:
    good = hb(lat=52.0, lon=4.0, base_url="https://edge-1.example:8443/")
    assert check_heartbeat(good) is good
    assert msgspec.json.decode(msgspec.json.encode(good), type=EdgeHeartbeat) == good


# What each EdgeView field does to the prepared candidates: "shape" fields decide whether
# and where an edge is offered, so a change must bump the fleet's generation (Playback then
# regroups at once); "load" fields reach the ranking within the prepared set's second.
_FIELD_ROLE = {
    "edge_id": "key",
    "site": "shape",
    "base_url": "shape",
    "lat": "shape",
    "lon": "shape",
    "throughput_bps": "load",
    "capacity_bps": "load",
    "connections": "load",
    "disk_used_bytes": "load",
    "disk_total_bytes": "load",
    "titles": "shape",
    "healthy": "shape",
    "draining": "shape",
    "sent_at": "load",
    "received_at": "load",
    "up_since": "shape",
}
_CHANGED: dict[str, Any] = {
    "site": "fra",
    "base_url": "http://e1:9999",
    "lat": 52.4,
    "lon": 4.9,
    "throughput_bps": 5e8,
    "capacity_bps": 2e9,
    "connections": 9,
    "disk_used_bytes": 5,
    "disk_total_bytes": 9,
    "titles": frozenset({"demo", "other"}),
    "healthy": False,
    "draining": True,
    "sent_at": 1.0,
    "received_at": 101.0,
    "up_since": 50.0,
}


def test_every_edge_field_is_known_to_move_the_fleet_generation_or_not() -> None:
    # A field added to EdgeView must be placed here: one that shapes offers but is left out
    # of _offer_shape would leave Playback ranking a stale set.
    assert set(_FIELD_ROLE) == {field.name for field in msgspec.structs.fields(EdgeView)}
    base = view()
    for name, role in _FIELD_ROLE.items():
        if role == "key":
            continue
        changed = msgspec.structs.replace(base, **{name: _CHANGED[name]})
        assert (_offer_shape(changed) != _offer_shape(base)) == (role == "shape"), name
    # Load within capacity regroups nothing; crossing the capacity does (the edge leaves).
    over = msgspec.structs.replace(base, throughput_bps=base.capacity_bps)
    assert _offer_shape(over) != _offer_shape(base)
