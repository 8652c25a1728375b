"""Edges prove who they are: a heartbeat counts only when signed by the key of the edge it
names, for the base URL (and site) that edge was registered with, and only once.

The attacks are those found against the control plane with its default settings: a forged
edge at an attacker's address, a real edge's id claimed from elsewhere (its viewers' signed
URLs then pointed there), and a forged ``"draining": true`` that took a real edge out.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from msgspec.structs import replace as msgspec_replace

from streamplane.config import (
    ControlSettings,
    EdgeRegistration,
    Settings,
    SettingsError,
    TokenSettings,
    load_settings,
)
from streamplane.control import create_app
from streamplane.control.errors import ApiError
from streamplane.control.fleet import (
    EdgeCredential,
    FleetPolicy,
    Signed,
    authenticate,
    check_claims,
    replay_problem,
    same_base_url,
)
from streamplane.edge import EdgeHeartbeat, heartbeat_authorization
from streamplane.steering import GeoLocator

from .conftest import ADMIN, EDGE_KEYS, KEY_HEX, T0, Control, Db, heartbeat, running, write_title

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
ATTACKER = "http://203.0.113.66:8081"
E1_URL = "http://e1.example:8081"


def _body(hb: dict[str, Any]) -> bytes:
    return json.dumps(hb).encode()


def _signed_by(key: bytes, edge_id: str, body: bytes, ts_ms: int) -> dict[str, str]:
    auth = heartbeat_authorization(key, edge_id, ts_ms, body)
    return {"Authorization": auth, "Content-Type": "application/json"}


async def _post(control: Control, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await control.client.post("/v1/fleet/heartbeat", content=body, headers=headers)


def _now_ms(control: Control) -> int:
    return int(control.clock() * 1000) + 500  # later than the test edges' last heartbeat


def _key(edge_id: str) -> bytes:
    return bytes.fromhex(EDGE_KEYS[edge_id])


async def _fleet(control: Control) -> dict[str, dict[str, Any]]:
    r = await control.client.get("/v1/fleet", headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    return {e["edge_id"]: e for e in r.json()["edges"]}


async def _ranked(control: Control, auth: dict[str, str]) -> list[dict[str, Any]]:
    r = await control.play(auth, "demo", device="probe")
    assert r.status_code == 200, r.text
    edges: list[dict[str, Any]] = r.json()["edges"]
    return edges


# -- the attacks -------------------------------------------------------------------------------


async def test_a_forged_heartbeat_for_a_new_edge_is_refused(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    # idle, nearer and holding the title: it would rank first if it were believed
    body = _body(heartbeat("rogue", ("demo",), base_url=ATTACKER, throughput_bps=0.0))
    r = await _post(control, body, {"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated_edge", r.text
    assert "StreamplaneEdge" in r.json()["detail"]
    made_up = secrets.token_bytes(32)
    r = await _post(control, body, _signed_by(made_up, "rogue", body, _now_ms(control)))
    assert r.status_code == 401 and r.json()["error"] == "unknown_edge", r.text
    assert "[control.edges.rogue]" in r.json()["detail"]
    r = await _post(control, body, _signed_by(made_up, "e1", body, _now_ms(control)))
    assert r.status_code == 401 and r.json()["error"] == "bad_edge_signature", r.text
    assert set(await _fleet(control)) == {"e1"}
    assert [e["base_url"] for e in await _ranked(control, auth)] == [E1_URL]


async def test_claiming_a_real_edges_id_leaves_its_url_alone(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    await control.edge("e2", ("demo",))
    body = _body(heartbeat("e1", ("demo",), base_url=ATTACKER, throughput_bps=0.0))
    attempts = [
        ({"Content-Type": "application/json"}, 401, "unauthenticated_edge"),
        (_signed_by(secrets.token_bytes(32), "e1", body, _now_ms(control)), 401, None),
        (_signed_by(_key("e2"), "e1", body, _now_ms(control)), 401, "bad_edge_signature"),
        # another real edge's own key, signing as itself: it still speaks only for itself
        (_signed_by(_key("e2"), "e2", body, _now_ms(control)), 403, "edge_id_mismatch"),
    ]
    for headers, status, error in attempts:
        r = await _post(control, body, headers)
        assert r.status_code == status, r.text
        assert error is None or r.json()["error"] == error, r.text
    assert (await _fleet(control))["e1"]["base_url"] == E1_URL
    for _ in range(10):
        ranked = {e["edge_id"]: e for e in await _ranked(control, auth)}
        assert ranked["e1"]["base_url"] == E1_URL
        assert ranked["e1"]["hls"].startswith(f"{E1_URL}/demo/master.m3u8?")
        assert not any(ATTACKER in e["hls"] for e in ranked.values())


async def test_a_forged_drain_does_nothing(control: Control) -> None:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    await control.edge("e2", ("demo",))
    body = _body(heartbeat("e1", ("demo",), draining=True))
    for headers in (
        {"Content-Type": "application/json"},
        _signed_by(secrets.token_bytes(32), "e1", body, _now_ms(control)),
        _signed_by(_key("e2"), "e2", body, _now_ms(control)),
    ):
        r = await _post(control, body, headers)
        assert r.status_code in (401, 403), r.text
    fleet = await _fleet(control)
    assert fleet["e1"]["offered"] is True and fleet["e1"]["state"] != "draining"
    assert {e["edge_id"] for e in await _ranked(control, auth)} == {"e1", "e2"}
    await control.edge("e1", ("demo",), draining=True)  # the edge itself may drain
    assert (await _fleet(control))["e1"]["state"] == "draining"


async def test_one_edges_key_cannot_heartbeat_as_another(control: Control) -> None:
    body = _body(heartbeat("e2", ("demo",)))  # even with e2's own base URL
    r = await _post(control, body, control.signed(body, "e1"))
    assert r.status_code == 403 and r.json()["error"] == "edge_id_mismatch", r.text
    assert "'e1'" in r.json()["detail"] and "'e2'" in r.json()["detail"]
    r = await _post(control, body, _signed_by(_key("e1"), "e2", body, _now_ms(control)))
    assert r.status_code == 401 and r.json()["error"] == "bad_edge_signature", r.text
    assert await _fleet(control) == {}


async def test_a_heartbeat_must_name_the_registered_base_url_and_site(control: Control) -> None:
    r = await control.beat(heartbeat("e1", ("demo",), base_url=ATTACKER))
    assert r.status_code == 403 and r.json()["error"] == "base_url_mismatch", r.text
    assert E1_URL in r.json()["detail"] and ATTACKER in r.json()["detail"]
    assert await _fleet(control) == {}
    r = await control.beat(heartbeat("e1", ("demo",), base_url="http://E1.example:8081/"))
    assert r.status_code == 200, r.text  # the same place, written differently
    await control.register("e9", "https://e9.example", site="ams-1")
    r = await control.beat(heartbeat("e9", base_url="https://e9.example:443", site="lon-1"), "e9")
    assert r.status_code == 403 and r.json()["error"] == "site_mismatch", r.text
    r = await control.beat(heartbeat("e9", base_url="https://e9.example:443", site="ams-1"), "e9")
    assert r.status_code == 200, r.text


async def test_a_replayed_heartbeat_is_refused(control: Control) -> None:
    recorded = _body(heartbeat("e1", ("demo",)))
    headers = control.signed(recorded)
    assert (await _post(control, recorded, headers)).status_code == 200
    r = await _post(control, recorded, headers)
    assert r.status_code == 401 and r.json()["error"] == "replayed_heartbeat", r.text
    # the edge drains; the recorded heartbeat sent again must not bring it back
    await control.edge("e1", ("demo",), draining=True)
    r = await _post(control, recorded, headers)
    assert r.status_code == 401 and r.json()["error"] == "replayed_heartbeat", r.text
    assert (await _fleet(control))["e1"]["state"] == "draining"
    # signed long ago, or for later: refused by this clock, whatever the edge's last one was
    skew_ms = int(control.settings.control.edge_clock_skew_s * 1000) + 1000
    for ts in (int(T0 * 1000) - skew_ms, int(T0 * 1000) + skew_ms):
        r = await _post(control, recorded, _signed_by(_key("e1"), "e1", recorded, ts))
        assert r.status_code == 401 and r.json()["error"] == "edge_clock_skew", r.text


async def test_a_replay_to_another_instance_is_refused(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    write_title(tmp_path / "catalog", "demo")
    async with (
        running(db, tmp_path / "catalog", geo) as one,
        running(db, tmp_path / "catalog", geo) as two,
    ):
        body = _body(heartbeat("e1", ("demo",)))
        headers = one.signed(body)
        assert (await _post(one, body, headers)).status_code == 200
        r = await _post(two, body, headers)
        assert r.status_code == 401 and r.json()["error"] == "replayed_heartbeat", r.text


async def test_development_mode_accepts_unsigned_heartbeats_from_unregistered_edges_only(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    async with running(db, tmp_path / "catalog", geo, dev_mode=True) as control:
        r = await control.beat(heartbeat("laptop-edge", ("demo",)), "laptop-edge")
        assert r.status_code == 200, r.text
        r = await _post(control, _body(heartbeat("e1")), {"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"] == "unsigned_heartbeat", r.text
        await control.edge("e1")  # signed: as always
        assert set(await _fleet(control)) == {"laptop-edge", "e1"}


# -- registrations through the admin API --------------------------------------------------------


async def test_registering_an_edge_through_the_admin_api(control: Control) -> None:
    put = {"base_url": "http://e9.example:8081", "site": ""}
    r = await control.client.put("/v1/fleet/edges/e9", json=put)
    assert r.status_code == 401
    r = await control.client.put("/v1/fleet/edges/e9", json=put, headers=ADMIN_AUTH)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert len(bytes.fromhex(key)) == 32 and r.json()["source"] == "api"
    body = _body(heartbeat("e9", ("demo",)))
    assert (
        await _post(control, body, _signed_by(bytes.fromhex(key), "e9", body, _now_ms(control)))
    ).status_code == 200
    # listed, without keys; the settings file's edges beside them
    listed = (await control.client.get("/v1/fleet/edges", headers=ADMIN_AUTH)).json()
    by_id = {e["edge_id"]: e for e in listed}
    assert by_id["e9"]["base_url"] == "http://e9.example:8081" and by_id["e9"]["key"] is None
    assert by_id["e1"]["source"] == "settings"
    assert key not in json.dumps(listed)
    # changed again without a key: it keeps its own
    r = await control.client.put("/v1/fleet/edges/e9", json=put, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["key"] is None, r.text
    ts = _now_ms(control) + 1
    assert (
        await _post(control, body, _signed_by(bytes.fromhex(key), "e9", body, ts))
    ).status_code == 200
    refused = [
        ("e1", put, 409, "registered_in_settings"),
        ("bad!id", put, 422, "invalid_edge_id"),
        ("e9", {"base_url": "ftp://e9.example"}, 422, "invalid_registration"),
        ("e9", {"base_url": "http://e9.example", "key": "abcd"}, 422, "invalid_registration"),
        ("e9", {"base_url": "http://e9.example", "site": "no site"}, 422, "invalid_registration"),
    ]
    for edge_id, payload, status, error in refused:
        r = await control.client.put(f"/v1/fleet/edges/{edge_id}", json=payload, headers=ADMIN_AUTH)
        assert r.status_code == status and r.json()["error"] == error, (edge_id, r.text)


async def test_moving_an_edge_takes_it_out_until_it_reports_from_there(control: Control) -> None:
    auth = await control.account()
    await control.register("e9", "http://old.example:8081")
    await control.edge("e9", ("demo",), base_url="http://old.example:8081")
    assert [e["edge_id"] for e in await _ranked(control, auth)] == ["e9"]
    r = await control.client.put(
        "/v1/fleet/edges/e9", json={"base_url": "http://new.example:8081"}, headers=ADMIN_AUTH
    )
    assert r.status_code == 200, r.text
    assert (await control.play(auth, "demo", device="probe")).status_code == 503
    r = await control.beat(heartbeat("e9", ("demo",), base_url="http://old.example:8081"), "e9")
    assert r.status_code == 403 and r.json()["error"] == "base_url_mismatch"
    await control.edge("e9", ("demo",), base_url="http://new.example:8081")
    assert [e["base_url"] for e in await _ranked(control, auth)] == ["http://new.example:8081"]


async def test_rotating_an_edges_key(control: Control) -> None:
    first = await control.register("e9", "http://e9.example:8081")
    r = await control.client.post(
        "/v1/fleet/edges/e9/rotate", json={"keep_previous_s": 60}, headers=ADMIN_AUTH
    )
    assert r.status_code == 200, r.text
    second = bytes.fromhex(r.json()["key"])
    assert r.json()["previous_key_until"] == T0 + 60
    body = _body(heartbeat("e9"))

    async def beat(key: bytes) -> int:
        control.clock.advance(1)  # each heartbeat later than the last
        r = await _post(control, body, _signed_by(key, "e9", body, int(control.clock() * 1000)))
        return r.status_code

    assert await beat(first) == 200 and await beat(second) == 200  # while the edge moves over
    control.clock.advance(60)
    assert await beat(first) == 401 and await beat(second) == 200
    r = await control.client.post("/v1/fleet/edges/e9/rotate", json={}, headers=ADMIN_AUTH)
    third = bytes.fromhex(r.json()["key"])
    assert await beat(second) == 401 and await beat(third) == 200  # a leaked key: gone at once
    r = await control.client.post("/v1/fleet/edges/e1/rotate", json={}, headers=ADMIN_AUTH)
    assert r.status_code == 409
    r = await control.client.post("/v1/fleet/edges/nobody/rotate", json={}, headers=ADMIN_AUTH)
    assert r.status_code == 404 and r.json()["error"] == "unknown_edge"


async def test_revoking_an_edge(control: Control) -> None:
    auth = await control.account()
    await control.register("e9", "http://e9.example:8081")
    await control.edge("e9", ("demo",))
    await control.edge("e1", ("demo",))
    r = await control.client.delete("/v1/fleet/edges/e9", headers=ADMIN_AUTH)
    assert r.status_code == 204
    assert [e["edge_id"] for e in await _ranked(control, auth)] == ["e1"]  # at once
    r = await control.beat(heartbeat("e9", ("demo",)), "e9")
    assert r.status_code == 401 and r.json()["error"] == "unknown_edge"
    listed = (await control.client.get("/v1/fleet/edges", headers=ADMIN_AUTH)).json()
    assert "e9" not in {e["edge_id"] for e in listed}
    assert (
        await control.client.delete("/v1/fleet/edges/e9", headers=ADMIN_AUTH)
    ).status_code == 404
    assert (
        await control.client.delete("/v1/fleet/edges/e1", headers=ADMIN_AUTH)
    ).status_code == 409


# -- settings ------------------------------------------------------------------------------------


def _settings(tmp_path: Path, **control: Any) -> Settings:
    return Settings(
        tokens=TokenSettings(keys={"k1": KEY_HEX}),
        control=ControlSettings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", **control),
    )


def test_no_start_without_edge_credentials_outside_development_mode(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"no edge can prove who it is.*\[control\.edges\."):
        create_app(_settings(tmp_path))
    create_app(_settings(tmp_path, dev_mode=True))
    create_app(_settings(tmp_path, admin_token="a"))  # edges are registered through the API
    reg = EdgeRegistration(key=EDGE_KEYS["e1"], base_url=E1_URL)
    create_app(_settings(tmp_path, edges={"e1": reg}))


@pytest.mark.parametrize(
    ("edge_id", "registration", "message"),
    [
        ("e1", {"key": "abcd"}, "control.edges.e1: key: the key is 2 bytes"),
        ("e1", {"key": "xyz"}, "control.edges.e1: key: the key is not an even-length hex"),
        ("e1", {"previous_key": "00"}, "control.edges.e1: previous_key: the key is 1 bytes"),
        ("e1", {"base_url": "http://e1.example/path"}, "control.edges.e1: base_url must be"),
        ("e1", {"site": "two words"}, "control.edges.e1: site"),
        ("-e1", {}, "control.edges.-e1: edge id"),
    ],
)
def test_bad_edge_registrations_are_named(
    tmp_path: Path, edge_id: str, registration: dict[str, str], message: str
) -> None:
    reg = EdgeRegistration(**{"key": EDGE_KEYS["e1"], "base_url": E1_URL, **registration})
    with pytest.raises(SettingsError, match=message):
        create_app(_settings(tmp_path, edges={edge_id: reg}))


def test_the_shared_fleet_token_is_gone_and_says_what_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[control]\nfleet_token = "shared"\n')
    with pytest.raises(
        SettingsError, match=r"control\.fleet_token .*\[control\.edges\.<edge id>\]"
    ):
        load_settings(path, {})
    with pytest.raises(SettingsError, match=r"STREAMPLANE_EDGE_FLEET_TOKEN: .*edge\.fleet_key"):
        load_settings(None, {"STREAMPLANE_EDGE_FLEET_TOKEN": "shared"})
    path.write_text(
        f'[control.edges.e1]\nkey = "{EDGE_KEYS["e1"]}"\nbase_url = "{E1_URL}"\nsite = "ams-1"\n'
    )
    s = load_settings(path, {"STREAMPLANE_EDGE_FLEET_KEY": EDGE_KEYS["e1"]})
    assert s.control.edges["e1"].site == "ams-1" and s.edge.fleet_key == EDGE_KEYS["e1"]


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://e1.example:8081", "http://E1.EXAMPLE:8081/", True),
        ("https://e1.example", "https://e1.example:443", True),
        ("http://e1.example", "http://e1.example:80", True),
        ("http://e1.example", "https://e1.example", False),
        ("http://e1.example:8081", "http://e1.example:8082", False),
        ("http://e1.example", "http://e1.example.evil", False),
        ("http://[2001:db8::1]:8081", "http://[2001:DB8::1]:8081", True),
    ],
)
def test_same_base_url(a: str, b: str, same: bool) -> None:
    assert same_base_url(a, b) is same


def test_authentication_as_a_pure_function() -> None:
    policy = FleetPolicy(timeout_s=6, slow_start_s=0, slow_start_floor=1, clock_skew_s=30)
    new, old = b"n" * 16, b"o" * 16
    creds = {
        "e1": EdgeCredential(
            edge_id="e1",
            key=new,
            base_url=E1_URL,
            site="ams-1",
            source="api",
            previous_key=old,
            previous_until=1000.0,
        )
    }
    body = b'{"any": "bytes"}'

    def auth(key: bytes, ts_ms: int, now: float, edge_id: str = "e1") -> Signed | None:
        header = heartbeat_authorization(key, edge_id, ts_ms, body)
        return authenticate(header, body, creds, now, policy)

    assert auth(new, 999_000, 999.0) == Signed("e1", 999_000)
    assert auth(old, 999_000, 999.0) == Signed("e1", 999_000)
    for key, ts_ms, now, error in [
        (old, 1_000_000, 1000.0, "bad_edge_signature"),  # the replaced key's time is up
        (b"x" * 16, 999_000, 999.0, "bad_edge_signature"),
        (new, 969_000, 999.5, "edge_clock_skew"),
    ]:
        with pytest.raises(ApiError) as refused:
            auth(key, ts_ms, now)
        assert (refused.value.status, refused.value.code) == (401, error)
    with pytest.raises(ApiError, match="no edge is registered as 'e2'"):
        auth(new, 999_000, 999.0, "e2")
    with pytest.raises(ApiError, match="sign heartbeats"):
        authenticate(None, body, creds, 999.0, policy)
    assert authenticate(None, body, creds, 999.0, msgspec_replace(policy, dev_mode=True)) is None

    hb = EdgeHeartbeat(**{**heartbeat("e1"), "site": "ams-1"})
    check_claims(hb, Signed("e1", 1), creds)
    for claimed, signer, error in [
        ({}, None, "unsigned_heartbeat"),
        ({}, Signed("e2", 1), "edge_id_mismatch"),
        ({"base_url": ATTACKER}, Signed("e1", 1), "base_url_mismatch"),
        ({"site": "lon-1"}, Signed("e1", 1), "site_mismatch"),
    ]:
        with pytest.raises(ApiError) as refused:
            check_claims(msgspec_replace(hb, **claimed), signer, creds)
        assert refused.value.code == error
    assert replay_problem(2, None) is None and replay_problem(2, 1) is None
    assert "replay" in (replay_problem(1, 1) or "")


def test_a_replaced_key_is_accepted_until_its_time() -> None:
    cred = EdgeCredential(
        edge_id="e1",
        key=b"n" * 16,
        base_url=E1_URL,
        site="",
        source="api",
        previous_key=b"o" * 16,
        previous_until=100.0,
    )
    assert cred.keys(99.9) == (b"n" * 16, b"o" * 16)
    assert cred.keys(100.0) == (b"n" * 16,)
    forever = EdgeCredential(
        edge_id="e1",
        key=b"n" * 16,
        base_url=E1_URL,
        site="",
        source="settings",
        previous_key=b"o" * 16,
    )
    assert forever.keys(1e12) == (b"n" * 16, b"o" * 16)


# -- the local stack (as the demo runs it) ---------------------------------------------------------


def test_the_local_stack_gives_each_edge_its_own_key(tmp_path: Path) -> None:
    from streamplane.stack import LocalStack

    write_title(tmp_path / "catalog", "demo")
    with LocalStack(tmp_path / "catalog", tmp_path / "stack", edges=2) as stack:
        assert len(set(stack.edge_keys.values())) == 2
        for index in range(2):
            own = (tmp_path / "stack" / f"edge-{index + 1}.toml").read_text()
            assert list(stack.edge_keys.values())[index] in own
            assert list(stack.edge_keys.values())[1 - index] not in own
        assert (tmp_path / "stack" / "settings.toml").stat().st_mode & 0o077 == 0
        fleet = {e["edge_id"]: e for e in stack.fleet()}  # their signed heartbeats count
        assert fleet["edge-1"]["offered"] and fleet["edge-1"]["base_url"] == stack.edge_url(0)
        body = _body(heartbeat("edge-1", ("demo",), base_url=ATTACKER))
        key2 = bytes.fromhex(stack.edge_keys["edge-2"])
        for headers in (
            {"Content-Type": "application/json"},
            _signed_by(key2, "edge-2", body, int(time.time() * 1000)),
        ):
            r = httpx.post(stack.control_url + "/v1/fleet/heartbeat", content=body, headers=headers)
            assert r.status_code in (401, 403), r.text
        assert {e["edge_id"]: e for e in stack.fleet()}["edge-1"]["base_url"] == stack.edge_url(0)
