"""Edges heartbeating the control plane: who is offered, lost and regained, slow start."""

from __future__ import annotations

import pytest

from .conftest import ADMIN, Control, heartbeat

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def _offered(control: Control, auth: dict[str, str]) -> dict[str, float]:
    r = await control.play(auth, "demo", device="probe")
    if r.status_code == 503:
        return {}
    assert r.status_code == 200, r.text
    return {e["edge_id"]: e["share"] for e in r.json()["edges"]}


async def _states(control: Control) -> dict[str, str]:
    r = await control.client.get("/v1/fleet", headers=ADMIN_AUTH)
    assert r.status_code == 200
    return {e["edge_id"]: e["state"] for e in r.json()["edges"]}


async def test_reply_names_the_cadence(control: Control) -> None:
    r = await control.edge("e1", ("demo",))
    assert r.json() == {"interval_s": control.settings.control.edge_heartbeat_s}


async def _beat(control: Control, seconds: float, *edges: str) -> None:
    """Let ``seconds`` pass with ``edges`` heartbeating every 2 s."""
    for _ in range(int(seconds // 2)):
        control.clock.advance(2)
        for e in edges:
            await control.edge(e, ("demo",))


async def test_heartbeats_lost_and_regained_with_slow_start(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    await control.edge("e2", ("demo",))
    assert await _offered(control, auth) == {"e1": pytest.approx(0.1), "e2": pytest.approx(0.1)}
    await _beat(control, 30, "e1", "e2")
    assert await _offered(control, auth) == {"e1": pytest.approx(0.55), "e2": pytest.approx(0.55)}
    await _beat(control, 30, "e1", "e2")  # to the end of the ramp
    assert await _offered(control, auth) == {"e1": 1.0, "e2": 1.0}
    # e2 goes silent: 6 s later it is still offered, past 6 s it is not
    control.clock.advance(6)
    await control.edge("e1", ("demo",))
    assert set(await _offered(control, auth)) == {"e1", "e2"}
    control.clock.advance(1)
    await control.edge("e1", ("demo",))
    assert set(await _offered(control, auth)) == {"e1"}
    assert await _states(control) == {"e1": "up", "e2": "stale"}
    # e2 comes back: offered again, but its share ramps from the floor
    await control.edge("e2", ("demo",))
    shares = await _offered(control, auth)
    assert shares["e1"] == 1.0 and shares["e2"] == pytest.approx(0.1)
    assert (await _states(control))["e2"] == "slow-start"


@pytest.mark.parametrize(
    ("report", "state"),
    [
        ({"healthy": False}, "unhealthy"),
        ({"draining": True}, "draining"),
        ({"throughput_bps": 1.2e9, "capacity_bps": 1e9}, "overloaded"),
    ],
)
async def test_unhealthy_draining_and_overloaded_edges_are_not_offered(
    control: Control, report: dict[str, object], state: str
) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    await control.edge("e2", ("demo",), **report)
    assert set(await _offered(control, auth)) == {"e1"}
    fleet = (await control.client.get("/v1/fleet", headers=ADMIN_AUTH)).json()
    e2 = next(e for e in fleet["edges"] if e["edge_id"] == "e2")
    assert e2["state"] == state and e2["offered"] is False and e2["why_not"]
    assert fleet["offered"] == 1
    # recovering: back, with slow start
    await control.edge("e2", ("demo",))
    assert await _offered(control, auth) == {"e1": pytest.approx(0.1), "e2": pytest.approx(0.1)}


async def test_only_unoffered_holders_means_503(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",), draining=True)
    r = await control.play(auth, "demo")
    assert r.status_code == 503


async def test_an_edge_that_drops_a_title_stops_being_offered_for_it(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo", "short"))
    assert set(await _offered(control, auth)) == {"e1"}
    await control.edge("e1", ("short",))
    assert await _offered(control, auth) == {}


async def test_fleet_view(control: Control) -> None:
    await control.edge("e1", ("demo", "short"), throughput_bps=2.5e8, connections=7)
    r = await control.client.get("/v1/fleet")
    assert r.status_code == 401
    (edge,) = (await control.client.get("/v1/fleet", headers=ADMIN_AUTH)).json()["edges"]
    assert edge["edge_id"] == "e1" and edge["state"] == "slow-start"
    assert edge["load"] == pytest.approx(0.25) and edge["titles"] == 2
    assert edge["connections"] == 7 and edge["heartbeat_age_s"] == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "unknown field"),
        ({"healthy": "yes"}, "Expected `bool`"),
        ({"base_url": "not a url"}, "base_url"),
        ({"capacity_bps": 0}, "capacity_bps"),
    ],
)
async def test_bad_heartbeats_are_refused_with_the_reason(
    control: Control, change: dict[str, object], message: str
) -> None:
    hb = heartbeat("e1", ("demo",))
    hb.update(change)
    r = await control.beat(hb)
    assert r.status_code == 422
    assert message in r.json()["detail"]
    hb = heartbeat("e1")
    del hb["sent_at"]
    r = await control.beat(hb)
    assert r.status_code == 422 and "sent_at" in r.json()["detail"]
    assert (await control.client.get("/v1/fleet", headers=ADMIN_AUTH)).json()["edges"] == []


async def test_load_reports_reach_the_ranking_within_a_second(control: Control) -> None:
    # Steering's candidates are prepared once per fleet change; a load report within capacity
    # is not such a change, so it must still show in the ranking one second later.
    auth = await control.account()

    async def report(e1: float, e2: float) -> None:
        await control.edge("e1", ("demo",), throughput_bps=e1, capacity_bps=1e9)
        await control.edge("e2", ("demo",), throughput_bps=e2, capacity_bps=1e9)

    async def first() -> str:
        r = await control.play(auth, "demo", device="probe")
        assert r.status_code == 200, r.text
        return str(r.json()["edges"][0]["edge_id"])

    await report(9e8, 1e8)
    for _ in range(31):  # past the slow start
        control.clock.advance(2)
        await report(9e8, 1e8)
    assert await first() == "e2"
    await report(1e8, 9e8)
    control.clock.advance(1)
    assert await first() == "e1"
    await control.edge("e1", ("demo",), draining=True)  # a change of state: at once
    assert await first() == "e2"
