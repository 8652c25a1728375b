"""Malformed requests are refused clearly: bad JSON, oversized bodies, wrong shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from .conftest import ADMIN, Control, heartbeat


async def test_bad_json_is_400_naming_the_problem(control: Control) -> None:
    for path in ("/v1/accounts", "/v1/playback", "/v1/fleet/heartbeat"):
        r = await control.client.post(
            path, content=b'{"email": ', headers={"Content-Type": "application/json"}
        )
        assert r.status_code in (400, 401), (path, r.text)
        if r.status_code == 400:
            assert r.json()["error"] == "bad_json"
            assert "not valid JSON" in r.json()["detail"]
    r = await control.client.post(
        "/v1/accounts", content=b"[1, 2", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    # an edge's heartbeat is read once its signature checks out
    r = await control.beat(b'{"edge_id": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = await control.beat(b"")
    assert r.status_code == 400 and "empty" in r.json()["detail"]


async def test_wrong_shapes_are_422_naming_the_field(control: Control) -> None:
    r = await control.client.post("/v1/accounts", json={"email": "a@b.co"})
    assert r.status_code == 422
    assert r.json()["error"] == "invalid" and "body.password" in r.json()["detail"]
    r = await control.client.post("/v1/accounts", json=[1, 2])
    assert r.status_code == 422


async def test_text_with_a_nul_character_is_422_naming_the_field(control: Control) -> None:
    # PostgreSQL cannot store a NUL in text, SQLite can: found as a 500 on PostgreSQL by
    # the OpenAPI fuzzing. On both stores it is the same 422, and nothing is written.
    nul = "\u0000"
    auth = await control.account()
    refused = [
        ("/v1/accounts", {"email": f"a{nul}@b.co", "password": "correct horse"}, "body.email"),
        ("/v1/auth/login", {"email": f"a{nul}@b.co", "password": "x"}, "body.email"),
        ("/v1/playback", {"title": "t", "device": f"tv{nul}"}, "body.device"),
        # (a NUL in one event refuses that event only: tests/telemetry/test_events.py)
        ("/v1/heartbeat", {"session_id": f"s{nul}", "events": []}, "$.session_id"),
    ]
    for path, body, field_name in refused:
        r = await control.client.post(path, json=body, headers=auth)
        assert r.status_code == 422, (path, r.text)
        assert field_name in r.json()["detail"] and "NUL" in r.json()["detail"], r.text
    r = await control.beat(heartbeat("e1", base_url=f"http://edge{nul}.example"))
    assert r.status_code == 422 and "base_url" in r.json()["detail"], r.text
    r = await control.client.get("/v1/fleet", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["edges"] == [], r.text


async def test_oversized_bodies_are_413(control: Control) -> None:
    limit = control.settings.control.max_body_bytes
    big = b'{"email": "' + b"a" * limit + b'"}'
    r = await control.client.post(
        "/v1/accounts", content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json() == {
        "error": "body_too_large",
        "detail": f"the request body is over the limit of {limit} bytes",
    }

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    r = await control.client.post(
        "/v1/accounts", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    # edge heartbeats and title documents may be larger (many titles), up to their own limit
    hb = heartbeat("e1", tuple(f"title-{i:07d}" for i in range(20_000)))
    r = await control.beat(hb)
    assert r.status_code == 200
    huge = b" " * (control.settings.control.max_bulk_body_bytes + 1)
    r = await control.client.post(
        "/v1/titles", content=huge, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 413


async def test_unknown_routes_and_methods(control: Control) -> None:
    r = await control.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await control.client.get("/v1/playback")
    assert r.status_code == 405


async def test_openapi_is_served(control: Control) -> None:
    doc = (await control.client.get("/openapi.json")).json()
    for path in ("/v1/playback", "/v1/heartbeat", "/v1/fleet/heartbeat", "/v1/titles"):
        assert path in doc["paths"]
    assert "EdgeHeartbeat" in doc["components"]["schemas"]
    assert (await control.client.get("/docs")).status_code == 200


async def _post(
    control: Control, path: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """``body`` to ``path``; to the edge heartbeat route signed by edge e1."""
    if path == "/v1/fleet/heartbeat":
        return await control.beat(body)
    return await control.client.post(
        path, content=body, headers={**headers, "Content-Type": "application/json"}
    )


def _nested(depth: int, opener: bytes = b"[", closer: bytes = b"]", inner: bytes = b"") -> bytes:
    return opener * depth + inner + closer * depth


async def test_a_lone_surrogate_is_400_naming_it(control: Control) -> None:
    # JSON may spell a UTF-16 surrogate half on its own ("\ud800"); no Unicode text holds
    # one. Accepted, it reached the 422 handler (which could not encode it) or the store.
    auth = await control.account()
    refused = [
        ("/v1/accounts", rb'{"email": "\ud800@x.io", "password": "correct horse"}'),
        ("/v1/accounts", rb'{"email": "b@x.io", "password": "correct \udfffhorse"}'),
        ("/v1/auth/login", rb'{"email": "b@x.io", "password": "correct \ud800horse"}'),
        ("/v1/playback", rb'{"title": "demo", "device": "tv\udc00"}'),
        ("/v1/heartbeat", rb'{"session_id": "\ud83d", "events": []}'),
        ("/v1/fleet/heartbeat", rb'{"edge_id": "e\ud800"}'),
    ]
    for path, body in refused:
        r = await _post(control, path, body, auth)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"] == "bad_json" and "surrogate" in r.json()["detail"], r.text
    # a surrogate pair is one character, and fine
    r = await control.client.post(
        "/v1/accounts",
        content=rb'{"email": "\ud83d\ude00@x.io", "password": "correct horse"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 201 and r.json()["email"] == "\U0001f600@x.io", r.text


async def test_nan_and_infinity_are_400_naming_them(control: Control) -> None:
    # JSON has no NaN or Infinity; Python's json module reads them, and a NaN latitude
    # then failed the range check and crashed the 422 handler (JSON cannot carry it back).
    auth = await control.account()
    await control.edge("e1", ("demo",))
    for bad, named in [
        (b"NaN", b"NaN"),
        (b"Infinity", b"Infinity"),
        (b"-Infinity", b"Infinity"),
        (b"1e400", b"out of range"),
    ]:
        body = b'{"title": "demo", "device": "tv", "lat": ' + bad + b"}"
        r = await control.client.post(
            "/v1/playback", content=body, headers={**auth, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "bad_json", r.text
        assert named.decode() in r.json()["detail"], r.text
    r = await control.play(auth, "demo")
    assert r.status_code == 200, r.text  # no screen was taken by the refused ones


async def test_json_nested_too_deeply_is_400(control: Control) -> None:
    # 30,000 levels exhausted the parser's recursion: a RecursionError and a 500.
    auth = {"Authorization": f"Bearer {ADMIN}"}
    objects = _nested(30_000, b'{"a":', b"}", b"1")  # 150 kB: only bulk routes take it
    for path, bodies in [
        ("/v1/fleet/heartbeat", (_nested(30_000), objects)),
        ("/v1/titles", (_nested(30_000), objects)),
        ("/v1/accounts", (_nested(30_000),)),
        ("/v1/playback", (_nested(30_000),)),
    ]:
        for body in bodies:
            r = await _post(control, path, body, auth)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"] == "bad_json", r.text
            assert "nested too deeply" in r.json()["detail"], r.text
    # a reasonable depth is a wrong shape, not a parse error
    r = await control.beat(_nested(50))
    assert r.status_code == 422 and r.json()["error"] == "invalid", r.text
