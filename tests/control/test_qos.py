"""QoS aggregates in the store (SQLite and PostgreSQL): the consumer's group of its own,
redelivery, the hour roll-up, retention, ``GET /v1/qos`` and ``/metrics``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from streamplane.control.plane import ControlPlane
from streamplane.control.qos import QosRetention, QosService
from streamplane.control.store import Store, migrate
from streamplane.steering import GeoLocator, RoutingTable, Steering
from streamplane.telemetry import (
    HOUR,
    MINUTE,
    DemotionPolicy,
    EventBatch,
    PlayerEvent,
    SessionIdentity,
    rollup_qos,
    to_events,
)
from streamplane.telemetry.qos import Qos
from streamplane.telemetry.qos_consumer import samples as to_samples
from streamplane.telemetry.stream_embedded import EmbeddedStream

from .conftest import ADMIN, T0, Control, Db

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
NET = "203.0.113.0/24"  # the client address's /24: no route covers it in these tests


def _plane(control: Control) -> ControlPlane:
    plane: ControlPlane = control.app.state.plane
    return plane


def viewer(
    session: str, edge: str, *beats: tuple[float, float, int], startup: float = 1.2
) -> list[EventBatch]:
    """A session's batches as ingest appends them: (seconds after T0, rebuffer s since the
    start, switches) per heartbeat."""
    who = SessionIdentity(account="acc", session=session, device=f"d-{session}", title="demo")
    return [
        to_events(
            who,
            [
                PlayerEvent(
                    at=T0 + t,
                    position_s=t,
                    seq=i,
                    edge=edge,
                    rebuffer_s=reb,
                    switches=sw,
                    bitrate_kbps=3000.0,
                    startup_s=startup,
                )
            ],
            T0 + t,
            client="203.0.113.50",
        )
        for i, (t, reb, sw) in enumerate(beats)
    ]


async def test_heartbeats_become_minute_and_hour_rows_once(
    control: Control, tmp_path: Path
) -> None:
    plane = _plane(control)
    stream = EmbeddedStream(tmp_path / "stream", partitions=4)
    try:
        batches = [
            *viewer("a", "e1", (0, 0.0, 0), (20, 3.0, 1), (50, 6.0, 1)),
            *viewer("b", "e1", (5, 0.0, 0), (45, 0.0, 2)),
            *viewer("c", "e2", (70, 0.0, 0), (100, 1.0, 0)),
        ]
        for b in batches:
            await stream.append(b)
        # A consumer that takes batches and dies before acknowledging them: they come back
        # to the QoS group, and are written once.
        stray = await stream.group("qos", ack_wait_s=0.2)
        assert await stray.fetch(3, timeout_s=1.0)
        await stray.close()
        consumer = await plane.qos.consume(stream, ack_wait_s=0.2)
        await consumer.settle()
        # Everything again, as a redelivery after a crash between write and ack would.
        for b in batches:
            await stream.append(b)
        await consumer.settle()
        control.clock.advance(120)

        r = await control.client.get(
            "/v1/qos", params={"edge": "e1", "since": T0}, headers=ADMIN_AUTH
        )
        assert r.status_code == 200, r.text
        (row,) = r.json()["rows"]
        assert (row["start"], row["edge"], row["title"], row["network"]) == (T0, "e1", None, None)
        assert row["viewers"] == 2
        assert row["watch_s"] == 50 + 40
        assert row["rebuffer_s"] == 6.0
        assert row["rebuffer_ratio"] == pytest.approx(6 / 90)
        assert row["switches"] == 3
        assert row["mean_bitrate_kbps"] == 3000.0
        assert row["startups"] == 2
        assert row["startup_p50_s"] == pytest.approx(1.2, rel=0.01)

        r = await control.client.get(
            "/v1/qos", params={"edge": "e2", "network": NET, "since": T0}, headers=ADMIN_AUTH
        )
        (row,) = r.json()["rows"]
        assert (row["start"], row["network"], row["asn"], row["rebuffer_s"]) == (
            T0 + 60,
            NET,
            0,
            1.0,
        )

        r = await control.client.get(
            "/v1/qos", params={"title": "demo", "since": T0, "span": "hour"}, headers=ADMIN_AUTH
        )
        (hour,) = r.json()["rows"]
        assert (hour["viewers"], hour["viewer_minutes"], hour["rebuffer_s"]) == (2, 3, 7.0)

        # Stored hour rows are the roll-up of their stored minutes.
        store = plane.qos.store
        minutes = await store.rows(span=MINUTE, since=T0, until=T0 + HOUR, title="demo")
        (stored_hour,) = await store.rows(span=HOUR, since=T0, until=T0 + HOUR, title="demo")
        rolled = Qos()
        for _, q in minutes:
            rolled = rollup_qos(rolled, q)
        assert stored_hour[1] == rolled

        # Steering's snapshot and the metrics.
        await plane.qos.refresh()
        text = (await control.client.get("/metrics", headers=ADMIN_AUTH)).text
        assert 'streamplane_qos_viewers{edge="e2"} 1' in text
        assert 'streamplane_qos_rebuffer_ratio{edge="e2"} 0.0333333' in text
        # 7 heartbeats appended twice, some handed out again: every delivery folded
        (events,) = [
            line for line in text.splitlines() if line.startswith("streamplane_qos_events_total")
        ]
        assert int(events.split()[1]) >= 14
    finally:
        await stream.close()


async def test_retention_purges_minutes_hours_and_marks(control: Control) -> None:
    plane = _plane(control)
    store = plane.qos.store
    samples = to_samples(viewer("a", "e1", (0, 0.0, 0), (30, 1.0, 0)), lambda a: (NET, 0))
    await store.write(samples)
    retention = QosRetention(minutes_s=600, hours_s=7200, marks_s=300)
    assert await store.purge(T0 + 100, retention) == 0
    assert len(await store.rows(span=MINUTE, since=0, until=T0 + HOUR, edge=None)) == 1
    gone = await store.purge(T0 + 1000, retention)  # minutes and the mark past retention
    assert gone == 4 + 1  # title, edge, network, edge for a network; one mark
    assert await store.rows(span=MINUTE, since=0, until=T0 + HOUR, title="demo") == []
    assert len(await store.rows(span=HOUR, since=0, until=T0 + HOUR, title="demo")) == 1
    assert await store.purge(T0 + 8000, retention) == 4


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "name an edge, a title, a network or an asn"),
        ({"title": "demo", "edge": "e1"}, "title goes alone"),
        ({"by": "title", "edge": "e1"}, "edge does not go with by=title"),
    ],
)
async def test_a_query_the_aggregates_cannot_answer_is_refused(
    control: Control, params: dict[str, str], problem: str
) -> None:
    r = await control.client.get("/v1/qos", params=params, headers=ADMIN_AUTH)
    assert r.status_code == 422 and problem in r.text
    assert (await control.client.get("/v1/qos", params={"edge": "e1"})).status_code in (401, 403)


async def test_an_edge_the_fleet_does_not_know_gets_no_rows(
    control: Control, tmp_path: Path
) -> None:
    plane = _plane(control)
    stream = EmbeddedStream(tmp_path / "stream", partitions=2)
    try:
        for b in viewer("a", "made-up", (0, 0.0, 0), (30, 1.0, 2)):
            await stream.append(b)
        consumer = await plane.qos.consume(stream, ack_wait_s=0.5)
        await consumer.settle()
        store = plane.qos.store
        assert await store.rows(span=MINUTE, since=0, until=T0 + HOUR, edge=None) == []
        ((_, title),) = await store.rows(span=MINUTE, since=0, until=T0 + HOUR, title="demo")
        assert (title.viewers, title.switches, title.rebuffer_ms) == (1, 2, 1000)
    finally:
        await stream.close()


async def test_rows_per_client_as_in_the_api_and_the_metrics(control: Control) -> None:
    plane = _plane(control)
    # one session from a prefix of AS 64500, one from another prefix of it
    beats = [
        *to_samples(viewer("a", "e1", (0, 0.0, 0), (40, 2.0, 0)), lambda a: (NET, 64500)),
        *to_samples(
            viewer("b", "e1", (0, 0.0, 0), (40, 0.0, 0)), lambda a: ("198.51.100.0/24", 64500)
        ),
    ]
    await plane.qos.store.write(beats)
    since = {"since": T0 - 60, "until": T0 + 120}
    r = await control.client.get("/v1/qos", params={"asn": 64500, **since}, headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["by"] == "as"
    (row,) = body["rows"]
    assert (row["network"], row["asn"], row["viewers"], row["watch_s"]) == ("AS64500", 64500, 2, 80)
    assert row["rebuffer_ratio"] == 2 / 80
    r = await control.client.get("/v1/qos", params={"by": "edge_as", **since}, headers=ADMIN_AUTH)
    assert [(x["edge"], x["network"]) for x in r.json()["rows"]] == [("e1", "AS64500")]
    # the prefixes' rows stay apart from the AS's
    r = await control.client.get("/v1/qos", params={"by": "network", **since}, headers=ADMIN_AUTH)
    assert sorted(x["network"] for x in r.json()["rows"]) == ["198.51.100.0/24", NET]
    r = await control.client.get(
        "/v1/qos", params={"asn": 64500, "network": NET}, headers=ADMIN_AUTH
    )
    assert r.status_code == 422
    control.clock.now = T0 + 61  # the rows' minute is the last whole one
    await plane.qos.refresh()
    metrics = (await control.client.get("/metrics", headers=ADMIN_AUTH)).text
    assert 'streamplane_qos_as_viewers{asn="64500"} 2' in metrics
    assert 'streamplane_qos_as_rebuffer_ratio{asn="64500"} 0.025' in metrics


async def _judged(service: QosService) -> None:
    """Until ``service``'s loop has judged once (the clock then stays put: no race with it)."""
    async with asyncio.timeout(10):
        while service.judgements < 1:
            await asyncio.sleep(0.01)


def _session(name: str, edge: str, start: float, watch_s: int, rebuffer_s: float) -> list[Any]:
    """A session's heartbeats every 10 s over ``watch_s``, stalled ``rebuffer_s`` in all."""
    steps = watch_s // 10
    return to_samples(
        viewer(
            name,
            edge,
            *((start - T0 + 10 * i, rebuffer_s * i / steps, 0) for i in range(steps + 1)),
        ),
        lambda a: (NET, 0),
    )


async def test_a_restarted_control_plane_keeps_the_demotions_and_their_hysteresis(
    db: Db, geo: GeoLocator
) -> None:
    store = Store(db.url, schema=db.schema)
    await migrate(store)
    now = [T0 + 70.0]
    # 3x to demote, 1.5x to stay, a 3-minute window; a 5-minute hold
    policy = DemotionPolicy(hold_s=300.0)

    def service() -> QosService:
        steering = Steering(RoutingTable(), geo)
        return QosService(
            store, steering, clock=lambda: now[0], steering_policy=policy, judge_every_s=3600
        )

    first = service()
    try:
        # slow: 20 % of the time stalled; fast: 0.5 %
        for i in range(2):
            await first.store.write(_session(f"s{i}", "slow", T0, 60, 12.0))
            await first.store.write(_session(f"f{i}", "fast", T0, 60, 0.3))
        await first.refresh()
        assert set(first.verdicts) == {(NET, "slow")}
        since = first.verdicts[NET, "slow"].since

        # Restarted: steering has the demotion before any judgement runs.
        now[0] = T0 + 80.0
        second = service()
        await second.start()
        assert set(second.steering.demoted.get(NET, {})) == {"slow"}
        await _judged(second)  # its loop's first judgement, on the first rows: still bad

        # Minutes later the first rows have left the window; now slow stalls 2x as much as
        # fast: not enough to demote an edge afresh (3x), enough to keep it demoted (1.5x).
        # Forgotten at the restart, the edge would have flapped back to full rank.
        now[0] = T0 + 470.0
        for i in range(2):
            await second.store.write(_session(f"s2{i}", "slow", T0 + 400, 60, 6.0))
            await second.store.write(_session(f"f2{i}", "fast", T0 + 400, 60, 3.0))
        await second.refresh()
        assert set(second.verdicts) == {(NET, "slow")}
        assert second.verdicts[NET, "slow"].since == since
        await second.stop()

        # And again, with no evidence at all in the window: held for the hold, from the last
        # judgement that found it bad, across the restart.
        now[0] = T0 + 470.0 + 200.0  # the rows past the window, the hold not over
        third = service()
        await third.start()
        await _judged(third)
        assert set(third.verdicts) == {(NET, "slow")}
        now[0] = T0 + 470.0 + policy.hold_s + 1
        await third.refresh()
        assert third.verdicts == {} and third.steering.demoted == {}
        await third.stop()
        fourth = service()  # and the let-go is what a restart finds
        await fourth.start()
        assert fourth.steering.demoted == {}
        await fourth.stop()
    finally:
        await first.stop()
        await store.dispose()
