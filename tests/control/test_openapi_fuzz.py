"""Fuzz every operation of the OpenAPI document: no input makes the service answer 5xx.

The control plane runs under a real uvicorn server in a thread (so its lifespan, pools and
loop are its own), once per engine; schemathesis generates requests from /openapi.json, with
a valid user token (an admin token for admin routes) so that the requests get past auth.
Edge heartbeats go unsigned to a control plane in development mode, so that their bodies,
not only their signatures, are what is fuzzed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from streamplane.config import ControlSettings, Settings, TokenSettings
from streamplane.control import create_app

from .conftest import ADMIN, Db, control_settings, heartbeat, serving, write_title

_doc = create_app(
    Settings(
        tokens=TokenSettings(keys={"k": "00"}),
        control=ControlSettings(database_url="sqlite+aiosqlite:///unused.db", dev_mode=True),
    )
).openapi()
schema = schemathesis.openapi.from_dict(_doc)
_ADMIN_ROUTES = {
    ("POST", "/v1/titles"),
    ("GET", "/v1/fleet"),
    ("GET", "/v1/fleet/edges"),
    ("PUT", "/v1/fleet/edges/{edge_id}"),
    ("POST", "/v1/fleet/edges/{edge_id}/rotate"),
    ("DELETE", "/v1/fleet/edges/{edge_id}"),
}
_EDGE_ROUTES = {("POST", "/v1/fleet/heartbeat")}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A running control plane; yields its base URL and a user's access token."""
    tmp = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        db = Db("sqlite", f"sqlite+aiosqlite:///{tmp / 'fuzz.db'}")
    else:
        url = request.getfixturevalue("pg_database")
        name = f"fuzz_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(url.replace("+asyncpg", ""))
            await conn.execute(f"CREATE SCHEMA {name}")
            await conn.close()

        asyncio.run(create())
        db = Db("postgresql", url, name)
    catalog = tmp / "catalog"
    write_title(catalog, "demo")
    app = create_app(control_settings(db, catalog, public_url="", dev_mode=True))
    with serving(app) as base, httpx.Client(base_url=base) as client:
        email = f"fuzz-{secrets.token_hex(4)}@example.com"
        client.post("/v1/accounts", json={"email": email, "password": "fuzz password"})
        token = client.post(
            "/v1/auth/login", json={"email": email, "password": "fuzz password"}
        ).json()["access_token"]
        hb = heartbeat("fuzz-edge", ("demo",), sent_at=time.time())
        client.post("/v1/fleet/heartbeat", json=hb).raise_for_status()
        yield base, token


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_makes_a_server_error(case: schemathesis.Case, server: tuple[str, str]) -> None:
    base, token = server
    route = (case.method.upper(), case.path)
    headers = {"Authorization": f"Bearer {ADMIN if route in _ADMIN_ROUTES else token}"}
    if route in _EDGE_ROUTES:
        headers = {}
    case.call_and_validate(base_url=base, headers=headers, checks=[not_a_server_error])


def test_the_document_covers_the_api() -> None:
    paths = set(_doc["paths"])
    assert {"/v1/playback", "/v1/heartbeat", "/v1/fleet/heartbeat", "/v1/accounts"} <= paths
