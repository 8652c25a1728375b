"""Playback: the answer a player starts from, and every refusal, on both engines."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from streamplane.config import SettingsError
from streamplane.control import create_app
from streamplane.edge import ExpiredToken, ForgedToken, PathNotAllowed, key_from_hex, verify
from streamplane.steering import GeoLocator

from .conftest import (
    ADMIN,
    KEY_HEX,
    KEY_ID,
    Clock,
    Control,
    Db,
    control_settings,
    running,
    title_doc,
    write_title,
)

KEYRING = {KEY_ID: key_from_hex(KEY_HEX)}


def _token_and_path(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parse_qs(parts.query)["__token__"][0], parts.path


async def test_playback_answer(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",), site="site-a")
    await control.edge("e2", ("demo", "short"), site="site-b", throughput_bps=5e8)
    await control.edge("e3", ("short",))  # does not hold demo
    r = await control.play(auth, "demo")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["title"] == "demo"
    assert [e["edge_id"] for e in body["edges"]] in (["e1", "e2"], ["e2", "e1"])
    assert [e["rank"] for e in body["edges"]] == [1, 2]
    for edge in body["edges"]:
        assert edge["reason"]
        assert edge["hls"].startswith(f"{edge['base_url']}/demo/master.m3u8?__token__=")
        assert edge["dash"].startswith(f"{edge['base_url']}/demo/manifest.mpd?__token__=")
    assert body["hls"] == body["edges"][0]["hls"]
    assert body["heartbeat"]["url"] == "http://control.test/v1/heartbeat"
    assert body["heartbeat"]["interval_s"] == control.settings.control.player_heartbeat_s
    assert body["resume_position_s"] == 0.0
    assert body["screens"] == {"in_use": 1, "limit": 2}
    assert body["token_expires_at"] == int(control.clock.now) + 3600


async def test_the_edge_accepts_the_token_for_the_title_only(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    body = (await control.play(auth, "demo")).json()
    token, path = _token_and_path(body["edges"][0]["hls"])
    now = int(control.clock.now)
    grant = verify(token, path=path, now=now, client_ip=None, keyring=KEYRING)
    assert grant.session_id == body["session_id"]
    assert grant.acl == ("/demo/*",)
    # every file of the title, not another title, not after expiry, not under another key
    verify(token, path="/demo/v/v0/seg_1.m4s", now=now, client_ip=None, keyring=KEYRING)
    with pytest.raises(PathNotAllowed):
        verify(token, path="/short/master.m3u8", now=now, client_ip=None, keyring=KEYRING)
    with pytest.raises(ExpiredToken):
        verify(token, path=path, now=body["token_expires_at"], client_ip=None, keyring=KEYRING)
    with pytest.raises(ForgedToken):
        verify(token, path=path, now=now, client_ip=None, keyring={KEY_ID: b"another key"})


async def test_refusals(control: Control) -> None:
    auth = await control.account()
    r = await control.play(auth, "nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown_title"
    assert "nope" in r.json()["detail"]
    # no edge holds demo yet
    r = await control.play(auth, "demo")
    assert r.status_code == 503 and r.json()["error"] == "no_edge"
    assert "no healthy edge holds 'demo'" in r.json()["detail"]
    # without a token
    r = await control.client.post("/v1/playback", json={"title": "demo", "device": "tv"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await control.client.post(
        "/v1/playback",
        json={"title": "demo", "device": "tv"},
        headers={"Authorization": "Bearer not.a.jwt"},
    )
    assert r.status_code == 401


async def test_entitlement(control: Control) -> None:
    doc = title_doc("premiere")
    from streamplane.media.title import encode_title

    r = await control.client.post(
        "/v1/titles?plans=premium",
        content=encode_title(doc),
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 201, r.text
    await control.edge("e1", ("premiere",))
    basic = await control.account("basic")
    r = await control.play(basic, "premiere")
    assert r.status_code == 403
    assert r.json()["error"] == "not_entitled"
    assert "plan 'basic' does not include 'premiere'; plans that do: premium" in r.json()["detail"]
    premium = await control.account("premium")
    assert (await control.play(premium, "premiere")).status_code == 200
    # the same account moving to a plan that includes it
    r = await control.client.put("/v1/account/plan", json={"plan": "premium"}, headers=basic)
    assert r.status_code == 200 and r.json()["screens_limit"] == 4
    assert (await control.play(basic, "premiere")).status_code == 200


async def test_screens_limit_and_release(control: Control) -> None:
    await control.edge("e1", ("demo", "short"))
    auth = await control.account("standard")  # two screens
    first = await control.play(auth, "demo", device="tv")
    second = await control.play(auth, "short", device="phone")
    assert first.status_code == second.status_code == 200
    third = await control.play(auth, "demo", device="laptop")
    assert third.status_code == 409
    body = third.json()
    assert body["error"] == "screens_limit" and body["limit"] == 2 and body["in_use"] == 2
    assert "plan 'standard' allows 2 screens at once" in body["detail"]
    # the same device starting again takes its own screen back, not a new one
    again = await control.play(auth, "short", device="phone")
    assert again.status_code == 200 and again.json()["screens"]["in_use"] == 2
    # stopping frees a screen at once
    r = await control.client.delete(f"/v1/playback/{first.json()['session_id']}", headers=auth)
    assert r.status_code == 204
    assert (await control.play(auth, "demo", device="laptop")).status_code == 200
    other = await control.account()
    r = await control.client.delete(f"/v1/playback/{again.json()['session_id']}", headers=other)
    assert r.status_code == 404  # not another account's session


async def test_stale_screens_expire_when_heartbeats_stop(control: Control) -> None:
    auth = await control.account("basic")  # one screen
    await control.edge("e1", ("demo",))
    tv = (await control.play(auth, "demo", device="tv")).json()
    hb = {"Authorization": f"Bearer {tv['heartbeat']['token']}"}
    # heartbeats keep the screen: a second device is refused for as long as they come
    for _ in range(4):
        control.clock.advance(60)
        await control.edge("e1", ("demo",))
        r = await control.client.post(
            "/v1/heartbeat", json={"session_id": tv["session_id"], "events": []}, headers=hb
        )
        assert r.status_code == 200, r.text
        assert (await control.play(auth, "demo", device="phone")).status_code == 409
    # the tv goes quiet past the screen timeout (90 s): its screen is free
    control.clock.advance(91)
    await control.edge("e1", ("demo",))
    assert (await control.play(auth, "demo", device="phone")).status_code == 200
    # and the tv's late heartbeat cannot take it back
    r = await control.client.post(
        "/v1/heartbeat",
        json={"session_id": tv["session_id"], "events": [{"at": 5.0, "position_s": 42.0}]},
        headers=hb,
    )
    assert r.status_code == 410 and r.json()["error"] == "session_ended"
    assert r.json()["resume_position_s"] == 42.0  # its position still counts


async def test_resume_position_latest_event_wins(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    s = (await control.play(auth, "demo")).json()
    hb = {"Authorization": f"Bearer {s['heartbeat']['token']}"}

    async def send(*events: tuple[float, float]) -> float:
        r = await control.client.post(
            "/v1/heartbeat",
            json={
                "session_id": s["session_id"],
                "events": [{"at": at, "position_s": pos, "kind": "position"} for at, pos in events],
            },
            headers=hb,
        )
        assert r.status_code == 200, r.text
        return float(r.json()["resume_position_s"])

    assert await send((100.0, 10.0), (101.0, 11.0)) == 11.0
    assert await send((101.0, 11.0)) == 11.0  # a duplicate
    assert await send((99.0, 3.0)) == 11.0  # a late event from before
    assert await send((110.0, 20.0), (105.0, 15.0)) == 20.0  # out of order in a batch
    # an access token of the same account works too
    r = await control.client.post(
        "/v1/heartbeat",
        json={"session_id": s["session_id"], "events": [{"at": 120.0, "position_s": 30.0}]},
        headers=auth,
    )
    assert r.json()["resume_position_s"] == 30.0
    # the next playback of the title starts there (same device replaces the session)
    again = (await control.play(auth, "demo")).json()
    assert again["resume_position_s"] == 30.0
    # a stop event ends the session and frees its screen
    hb2 = {"Authorization": f"Bearer {again['heartbeat']['token']}"}
    r = await control.client.post(
        "/v1/heartbeat",
        json={
            "session_id": again["session_id"],
            "events": [{"at": 130.0, "position_s": 31.0, "kind": "stop"}],
        },
        headers=hb2,
    )
    assert r.status_code == 200 and r.json()["active"] is False
    account = (await control.client.get("/v1/account", headers=auth)).json()
    assert account["screens"]["in_use"] == 0


async def test_heartbeat_tokens_belong_to_their_session(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    a = (await control.play(auth, "demo", device="a")).json()
    b = (await control.play(auth, "demo", device="b")).json()
    r = await control.client.post(
        "/v1/heartbeat",
        json={"session_id": b["session_id"], "events": []},
        headers={"Authorization": f"Bearer {a['heartbeat']['token']}"},
    )
    assert r.status_code == 403
    # a session token is not an access token
    r = await control.client.post(
        "/v1/playback",
        json={"title": "demo", "device": "c"},
        headers={"Authorization": f"Bearer {a['heartbeat']['token']}"},
    )
    assert r.status_code == 401
    stranger = await control.account()
    r = await control.client.post(
        "/v1/heartbeat", json={"session_id": a["session_id"], "events": []}, headers=stranger
    )
    assert r.status_code == 404


async def test_origin_is_the_last_resort(db: Db, tmp_path: Path, geo: GeoLocator) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    async with running(db, catalog, geo, origin_url="http://origin.example:8000") as control:
        auth = await control.account()
        r = await control.play(auth, "demo")
        assert r.status_code == 200, r.text
        (only,) = r.json()["edges"]
        assert only["edge_id"] == "origin" and only["last_resort"] is True
        assert "no healthy edge holds 'demo'" in only["reason"]
        assert only["hls"].startswith("http://origin.example:8000/demo/master.m3u8?__token__=")
        await control.edge("e1", ("demo",))
        edges = (await control.play(auth, "demo")).json()["edges"]
        assert [e["edge_id"] for e in edges] == ["e1", "origin"]
        assert edges[-1]["rank"] == 2


async def test_steering_follows_the_coverage_zones(db: Db, tmp_path: Path) -> None:
    """A czmap setting feeds steering: the edge of the client's zone ranks first."""
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    czmap = tmp_path / "czmap.json"
    czmap.write_text(
        json.dumps(
            {
                "coverageZones": {
                    "far": {"network": ["203.0.113.0/24"]},
                    # the test client is 198.51.100.7
                    "near": {"network": ["198.51.100.0/24"], "network6": ["2001:db8::/32"]},
                }
            }
        )
    )
    # no slow start here: a new edge outside its share would rank after full-share ones
    settings = control_settings(db, catalog, czmap=str(czmap), slow_start_s=0.0)
    clock = Clock()
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://control.test") as c:
            control = Control(app, c, clock, settings, catalog)
            for edge_id, site in (("a-far", "far"), ("z-near", "near")):
                await control.edge(edge_id, ("demo",), site=site)
            auth = await control.account()
            edges = (await control.play(auth, "demo")).json()["edges"]
            assert [e["edge_id"] for e in edges] == ["z-near", "a-far"]
            assert "198.51.100.0/24" in edges[0]["reason"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SettingsError, match="coverageZones"):
        create_app(control_settings(db, catalog, czmap=str(bad)))
