"""Pre-warming a scheduled event: the control plane plans the channel's edges from the fleet
heartbeating now, places the channel on them while the event is warming or live, and reports
readiness (GET /v1/live/plan)."""

from __future__ import annotations

import os
import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamplane.config import SettingsError
from streamplane.control.realtime import viewer_channels
from streamplane.realtime import (
    ADMISSION_CHANNEL,
    Admission,
    AdmissionPlan,
    AdmissionWindow,
    sign_realtime_token,
)
from streamplane.realtime.admission import decode_admission_plan
from streamplane.steering import GeoLocator

from .conftest import ADMIN, T0, Control, Db, running


def _events(path: Path, viewers: int, start: float) -> Path:
    when = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(
        f'[[event]]\nchannel = "ch1"\nstart = "{when}"\nexpected_viewers = {viewers}\n'
        "bitrate_kbps = 1000\nsites = { site-a = 0.5, site-b = 0.5 }\n"
    )
    return path


def _planning(
    db: Db, tmp_path: Path, geo: GeoLocator, events: Path
) -> AbstractAsyncContextManager[Control]:
    """A control plane with channel ch1 and its scheduled events; its edges are not real, so
    none is warmed (see test_live_warm.py)."""
    return running(
        db,
        tmp_path / "catalog",
        geo,
        live_channels=("ch1",),
        live_events=str(events),
        live_warm_every_s=3600,
    )


async def test_an_event_is_placed_on_its_planned_edges_and_reported_ready(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    # 1,000 viewers x 1 Mb/s, half at each site: 0.5 Gb/s a site, one 1 Gb/s edge at 70 %
    events = _events(tmp_path / "events.toml", 1000, T0 + 600)  # warming from T0 - 300
    (tmp_path / "catalog").mkdir()
    async with _planning(db, tmp_path, geo, events) as control:
        auth = await control.account()
        for edge, site in (("e1", "site-a"), ("e2", "site-a"), ("e3", "site-b")):
            assert (await control.edge(edge, (), site=site)).status_code == 200
        admin = {"authorization": f"Bearer {ADMIN}"}
        assert (await control.client.get("/v1/live/plan")).status_code in (401, 403)
        r = await control.client.get("/v1/live/plan", headers=admin)
        assert r.status_code == 200, r.text
        [event] = r.json()["events"]
        # placed and up, not warmed: not ready until the warm-up has reached them
        assert event["phase"] == "warming" and event["ready"] is False, event
        assert event["edges_cold"] == ["e1", "e3"] and "not warm yet" in event["why"]
        assert event["warm_at"] == T0 - 300
        assert sorted(event["edges_up"]) == ["e1", "e3"]
        assert {s["site"]: s["edges"] for s in event["sites"]} == {
            "site-a": ["e1"],
            "site-b": ["e3"],
        }
        assert event["gateway"] == {
            "admission_per_s": 9,  # 1,000 viewers joining within 2 minutes
            "admission_burst": 90,  # the first 10 s of them at once
            "max_connections": 1200,
            "processes": 1,
            "per_process": {"rate": 9, "burst": 90, "max_connections": 1200},
        }
        assert "500 viewers" in event["sites"][0]["reason"]
        # playback of the channel offers the planned edges only, while it is warming
        body = (await control.play(auth, "ch1")).json()
        assert sorted(e["edge_id"] for e in body["edges"]) == ["e1", "e3"]

        # a planned edge that stops heartbeating: not ready, and said why
        control.clock.now = T0 + 30  # past the heartbeat timeout for e1, e2, e3...
        for edge, site in (("e2", "site-a"), ("e3", "site-b")):
            await control.edge(edge, (), site=site, sent_at=control.clock.now)
        [event] = (await control.client.get("/v1/live/plan", headers=admin)).json()["events"]
        assert event["ready"] is False and event["edges_down"] == ["e1"], event
        assert "e1" in event["why"]


async def test_before_its_warm_up_the_channel_is_served_by_every_edge(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    events = _events(tmp_path / "events.toml", 1000, T0 + 7200)
    (tmp_path / "catalog").mkdir()
    async with _planning(db, tmp_path, geo, events) as control:
        auth = await control.account()
        for edge, site in (("e1", "site-a"), ("e2", "site-a"), ("e3", "site-b")):
            await control.edge(edge, (), site=site)
        [event] = (
            await control.client.get("/v1/live/plan", headers={"authorization": f"Bearer {ADMIN}"})
        ).json()["events"]
        assert event["phase"] == "scheduled"
        body = (await control.play(auth, "ch1")).json()
        assert sorted(e["edge_id"] for e in body["edges"]) == ["e1", "e2", "e3"]


async def test_an_audience_no_site_can_carry_is_not_ready(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    events = _events(tmp_path / "events.toml", 10_000, T0 + 600)  # 5 Gb/s a site
    (tmp_path / "catalog").mkdir()
    async with _planning(db, tmp_path, geo, events) as control:
        await control.edge("e1", (), site="site-a")
        await control.edge("e3", (), site="site-b")
        [event] = (
            await control.client.get("/v1/live/plan", headers={"authorization": f"Bearer {ADMIN}"})
        ).json()["events"]
        assert event["ready"] is False and "short of throughput" in event["why"]


async def test_a_bad_events_file_stops_the_control_plane_saying_what_is_wrong(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    bad = tmp_path / "events.toml"
    bad.write_text('[[event]]\nchannel = "ch1"\nstart = "2026-01-01T00:00:00"\n')
    (tmp_path / "catalog").mkdir()
    with pytest.raises(SettingsError, match=r"control\.live_events.*event 1"):
        async with running(db, tmp_path / "catalog", geo, live_events=str(bad)):
            pass


async def test_the_gateways_admission_plan_is_theirs_alone_and_follows_the_schedule(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    key = bytes.fromhex("5e" * 32)
    start = T0 + 7200
    events = _events(tmp_path / "events.toml", 1000, start)
    (tmp_path / "catalog").mkdir()
    async with running(
        db,
        tmp_path / "catalog",
        geo,
        live_channels=("ch1",),
        live_events=str(events),
        realtime={"token_key": key.hex(), "total_processes": 4},
    ) as control:
        url = "/v1/live/admission"
        assert (await control.client.get(url)).status_code == 401

        def bearer(channels: dict[str, list[str]]) -> dict[str, str]:
            token = sign_realtime_token(
                key, user="gw", channels=channels, now=int(control.clock.now), ttl_s=60
            )
            return {"authorization": f"Bearer {token}"}

        viewer = bearer(viewer_channels("ch1"))
        assert (await control.client.get(url, headers=viewer)).status_code == 403
        gateway = bearer({ADMISSION_CHANNEL: ["read"]})
        r = await control.client.get(url, headers=gateway)
        assert r.status_code == 200, r.text
        plan = decode_admission_plan(r.content)
        # 1,000 viewers: 9 joins/s, 90 at once, 1,200 connections, split among 4 processes
        assert plan == AdmissionPlan(
            processes=4,
            windows=[
                AdmissionWindow(
                    channel="ch1",
                    start=start - 900,
                    end=start + 4 * 3600,
                    limits=Admission(rate=3, burst=23, max_connections=300),
                )
            ],
        )
        # the operator moves the event and doubles its audience: no restart needed
        _events(events, 2000, start + 60)
        os.utime(events, ns=(time.time_ns(), time.time_ns() + 10**9))
        plan = decode_admission_plan((await control.client.get(url, headers=gateway)).content)
        assert plan.windows[0].start == start + 60 - 900
        assert plan.windows[0].limits.max_connections == 600
        # a broken file keeps the schedule read last
        events.write_text("[[event]]\nchannel = 3\n")
        os.utime(events, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        again = decode_admission_plan((await control.client.get(url, headers=gateway)).content)
        assert again == plan
