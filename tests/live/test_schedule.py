"""Pre-warming plans: enough edges, the fewest, warmed before the start; and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.live.schedule import (
    Event,
    event_phase,
    plan_event,
    read_events,
    readiness,
    warm_edges,
)
from streamplane.placement import Server

GBPS = 1e9
servers_st = st.lists(
    st.builds(
        Server,
        id=st.uuids().map(str),
        storage_bytes=st.just(10**12),
        throughput_bps=st.floats(1e9, 100e9),
        site=st.sampled_from(["a", "b"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(servers=servers_st, viewers=st.integers(0, 200_000), mbps=st.floats(0.5, 8))
def test_a_site_gets_the_fewest_edges_that_carry_its_audience(
    servers: list[Server], viewers: int, mbps: float
) -> None:
    event = Event("final", 1_800_000_000.0, viewers, mbps * 1e6)
    plan = plan_event(event, servers, headroom=0.7, lead_s=600)
    assert plan.warm_at == event.start - 600
    assert sum(s.viewers for s in plan.sites) == pytest.approx(viewers, abs=len(plan.sites))
    rated = {s.id: s.throughput_bps * 0.7 for s in servers}
    for site in plan.sites:
        capacity = sum(rated[e] for e in site.edges)
        assert capacity == pytest.approx(site.capacity_bps)
        if site.short_bps == 0:
            assert capacity >= site.demand_bps
            # the fewest: without its smallest chosen edge the site would not be covered
            if site.edges:
                assert capacity - min(rated[e] for e in site.edges) < site.demand_bps
        else:  # short only when the whole site cannot carry it
            here = [s for s in servers if s.site == site.site]
            assert set(site.edges) == {s.id for s in here}
            assert site.short_bps == pytest.approx(site.demand_bps - capacity)
    assert plan.ready == all(s.short_bps == 0 for s in plan.sites)


def test_site_shares_direct_the_audience() -> None:
    servers = [Server("a1", 1, 100 * GBPS, "a"), Server("b1", 1, 100 * GBPS, "b")]
    plan = plan_event(Event("x", 0.0, 1000, 1e6, {"a": 3, "b": 1}), servers)
    assert [(s.site, s.viewers) for s in plan.sites] == [("a", 750), ("b", 250)]
    with pytest.raises(ValueError):
        plan_event(Event("x", 0.0, 1000, 1e6, {"a": 0}), servers)


def test_events_are_read_with_clear_errors() -> None:
    [event] = read_events(
        '[[event]]\nchannel = "f"\nstart = "2026-12-12T20:00:00Z"\nexpected_viewers = 10\n'
    )
    assert event.start == 1_797_105_600.0 and event.bitrate_bps == 3e6
    with pytest.raises(ValueError, match="expected_viewers is missing"):
        read_events('[[event]]\nchannel = "f"\nstart = "2026-12-12T20:00:00Z"\n')
    with pytest.raises(ValueError, match="time zone"):
        read_events('[[event]]\nchannel="f"\nstart="2026-12-12T20:00:00"\nexpected_viewers=1\n')


def test_live_plan_prints_the_plan_and_fails_when_short(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    cmd = [
        sys.executable,
        "-m",
        "streamplane",
        "live",
        "plan",
        "--servers",
        str(root / "servers.toml"),
    ]
    ok = subprocess.run(
        [*cmd, "--events", str(root / "events.toml")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "final" in ok.stdout and "warm from 2026-12-12 19:45 UTC" in ok.stdout
    big = tmp_path / "big.toml"
    big.write_text(
        '[[event]]\nchannel = "final"\nstart = "2026-12-12T20:00:00Z"\n'
        "expected_viewers = 10000000\nbitrate_kbps = 5000\n"
    )
    short = subprocess.run([*cmd, "--events", str(big)], capture_output=True, text=True)
    assert short.returncode == 1 and "cannot carry" in short.stderr


def test_the_phase_readiness_and_placement_of_an_event_follow_its_clock() -> None:
    servers = [Server("e1", 10**12, 10 * GBPS, "a"), Server("e2", 10**12, 10 * GBPS, "a")]
    plan = plan_event(Event("ch", 10_000.0, 1000, 3e6), servers, lead_s=900)  # 3 Gb/s: e1
    assert [event_phase(plan, t) for t in (9_000.0, 9_100.0, 10_000.0, 10_000.0 + 5 * 3600)] == [
        "scheduled",
        "warming",
        "live",
        "over",
    ]
    assert warm_edges([plan], "ch", 9_000.0) is None  # not yet: every edge serves it
    assert warm_edges([plan], "ch", 9_500.0) == {"e1"}
    assert warm_edges([plan], "other", 9_500.0) is None
    ready = readiness(plan, {"e1", "e2"}, 9_500.0, warm={"e1"})
    assert ready.ready and ready.phase == "warming" and ready.edges_up == ("e1",)
    # warming, but its edge not warmed (yet, or its warming failed): not ready, and said so
    cold = readiness(plan, {"e1", "e2"}, 9_500.0)
    assert not cold.ready and cold.edges_cold == ("e1",) and "not warm yet: e1" in cold.why
    # before the warm-up no edge is expected warm; once live, the viewers keep them warm
    assert readiness(plan, {"e1"}, 9_000.0).ready
    assert readiness(plan, {"e1"}, 10_100.0).ready
    down = readiness(plan, {"e2"}, 9_500.0)
    assert not down.ready and down.edges_down == ("e1",) and "e1" in down.why


def test_live_plan_needs_a_plan_source(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "streamplane", "live", "plan"]
    neither = subprocess.run(cmd, capture_output=True, text=True)
    assert neither.returncode == 2 and "--control" in neither.stderr
    away = subprocess.run(
        [*cmd, "--control", "http://127.0.0.1:9", "--admin-token", "x"],
        capture_output=True,
        text=True,
    )
    assert away.returncode == 2 and "cannot reach the control plane" in away.stderr
