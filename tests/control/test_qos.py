"""QoS aggregates in the store (SQLite and PostgreSQL): the consumer's group of its own,
redelivery, the hour roll-up, retention, ``GET /v1/qos`` and ``/metrics``."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.control.plane import ControlPlane
from streamplane.control.qos import QosRetention
from streamplane.telemetry import (
    HOUR,
    MINUTE,
    EventBatch,
    PlayerEvent,
    SessionIdentity,
    rollup_qos,
    to_events,
)
from streamplane.telemetry.qos import Qos
from streamplane.telemetry.qos_consumer import samples as to_samples
from streamplane.telemetry.stream_embedded import EmbeddedStream

from .conftest import ADMIN, T0, Control

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
        ({}, "name an edge, a title or a network"),
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
