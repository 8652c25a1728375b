"""The catalog: titles from the catalog directory and from admin registration; availability."""

from __future__ import annotations

from pathlib import Path

import msgspec

from streamplane.media.title import encode_title
from streamplane.steering import GeoLocator

from .conftest import ADMIN, Control, Db, running, title_doc, write_title

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def test_titles_from_the_catalog_directory(control: Control) -> None:
    r = await control.client.get("/v1/titles")
    body = r.json()
    assert body["total"] == 2
    assert [t["id"] for t in body["titles"]] == ["demo", "short"]
    demo = body["titles"][0]
    assert demo["duration_s"] == 120.0
    assert demo["artwork"] == ["poster.jpg"]
    assert [g["id"] for g in demo["rungs"]] == ["v0", "v1"]
    assert demo["hls"] == "master.m3u8" and demo["dash"] == "manifest.mpd"
    assert (await control.client.get("/v1/titles/short")).json()["duration_s"] == 30.0
    r = await control.client.get("/v1/titles/missing")
    assert r.status_code == 404 and r.json()["error"] == "unknown_title"


async def test_search_by_name(control: Control) -> None:
    for name in ("The-Big-Race", "big-sleep", "Nothing"):
        r = await control.client.post(
            "/v1/titles", content=encode_title(title_doc(name)), headers=ADMIN_AUTH
        )
        assert r.status_code == 201, r.text
    r = await control.client.get("/v1/titles", params={"q": "BIG"})
    assert [t["id"] for t in r.json()["titles"]] == ["big-sleep", "The-Big-Race"]
    r = await control.client.get("/v1/titles", params={"q": "big", "limit": 1, "offset": 1})
    assert r.json()["total"] == 2 and [t["id"] for t in r.json()["titles"]] == ["The-Big-Race"]
    assert (await control.client.get("/v1/titles", params={"q": "zzz"})).json()["total"] == 0


async def test_registration_is_for_admins_and_checks_the_document(control: Control) -> None:
    doc = encode_title(title_doc("new"))
    r = await control.client.post("/v1/titles", content=doc)
    assert r.status_code == 401
    r = await control.client.post(
        "/v1/titles", content=doc, headers={"Authorization": "Bearer guess"}
    )
    assert r.status_code == 403
    r = await control.client.post("/v1/titles", content=b'{"title": "x"}', headers=ADMIN_AUTH)
    assert r.status_code == 422 and "Title" in r.json()["detail"]
    r = await control.client.post("/v1/titles", content=b"{not json", headers=ADMIN_AUTH)
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    bad_id = msgspec.structs.replace(title_doc("x"), title="../etc")
    r = await control.client.post("/v1/titles", content=encode_title(bad_id), headers=ADMIN_AUTH)
    assert r.status_code == 422 and r.json()["error"] == "invalid_title_id"
    r = await control.client.post("/v1/titles?plans=gold", content=doc, headers=ADMIN_AUTH)
    assert r.status_code == 422 and "gold" in r.json()["detail"]
    r = await control.client.post("/v1/titles", content=doc, headers=ADMIN_AUTH)
    assert r.status_code == 201 and r.json()["id"] == "new"
    assert (await control.client.get("/v1/titles/new")).status_code == 200


async def test_sizes_the_store_cannot_hold_are_refused(control: Control) -> None:
    """A width past 32 bits was a 500 from the store (found by the OpenAPI fuzzing)."""
    for field, size in (("width", 2**125), ("height", 2**31)):
        huge = msgspec.structs.replace(title_doc("x"), **{field: size})
        r = await control.client.post("/v1/titles", content=encode_title(huge), headers=ADMIN_AUTH)
        assert r.status_code == 422 and r.json()["error"] == "invalid_title", r.text
        assert field in r.json()["detail"]


async def test_admin_routes_are_off_without_an_admin_token(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    async with running(db, tmp_path / "empty", geo, admin_token="") as control:
        r = await control.client.post(
            "/v1/titles", content=encode_title(title_doc("x")), headers=ADMIN_AUTH
        )
        assert r.status_code == 403 and r.json()["error"] == "admin_disabled"
        assert (await control.client.get("/v1/fleet", headers=ADMIN_AUTH)).status_code == 403


async def test_availability_from_heartbeats_and_placement(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    placement = tmp_path / "placement.json"
    placement.write_bytes(
        msgspec.json.encode(
            {
                "format": "streamplane.placement/1",
                "inputs": {},
                "sites": {},
                "titles": {"demo": ["e2", "e9"]},
                "catalog": {"demo": [1000, 1.0]},
            }
        )
    )
    async with running(db, catalog, geo, placement=str(placement)) as control:
        await control.edge("e1", ("demo",))
        await control.edge("e2", ())  # placed there, not (yet) reported as held
        await control.edge("e3", ("demo",), draining=True)
        r = await control.client.get("/v1/titles/demo/availability")
        body = r.json()
        assert body["offered"] == 2 and body["origin"] is False
        by_id = {e["edge_id"]: e for e in body["edges"]}
        assert by_id["e1"]["sources"] == ["heartbeat"] and by_id["e1"]["offered"]
        assert by_id["e2"]["sources"] == ["placement"] and by_id["e2"]["offered"]
        assert by_id["e3"]["state"] == "draining" and not by_id["e3"]["offered"]
        assert by_id["e9"]["state"] == "unknown"  # placed on an edge never heard from
        # playback offers exactly the offered holders
        auth = await control.account()
        edges = (await control.play(auth, "demo")).json()["edges"]
        assert sorted(e["edge_id"] for e in edges) == ["e1", "e2"]
