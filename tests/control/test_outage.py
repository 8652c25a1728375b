"""The store goes away and comes back: clients get a 503 saying so, /healthz says what is down,
and the service recovers by itself.

PostgreSQL runs as a private server the test stops and starts (``private_pg``), the control
plane under a real uvicorn server, so that what a client sees on the wire is checked: JSON
503s with Retry-After, no plain-text 500s, no reset connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from streamplane.control import create_app
from streamplane.edge import HeartbeatSigner, edge_key
from streamplane.steering import GeoLocator, RoutingTable, Steering

from .conftest import (
    EDGE_KEYS,
    Clock,
    Db,
    PrivatePostgres,
    control_settings,
    heartbeat,
    running,
    serving,
    write_title,
)


def _assert_unavailable(r: httpx.Response, what: str) -> None:
    assert r.status_code == 503, (what, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", (what, r.text)
    assert r.headers["retry-after"] == "2", what
    body = r.json()
    assert body["error"] == "store_unavailable", (what, body)
    assert "database is unavailable" in body["detail"], (what, body)


def _requests(token: str, hb_token: str, session: str) -> list[tuple[str, str, str, object]]:
    """(what, method, path, json) of requests that need the store, with their credentials."""
    return [
        (
            "sign up",
            "POST",
            "/v1/accounts",
            {"email": "new@example.com", "password": "pw-pw-pw-pw"},
        ),
        (
            "log in",
            "POST",
            "/v1/auth/login",
            {"email": "ada@example.com", "password": "pw-pw-pw-pw"},
        ),
        ("playback", "POST", f"/v1/playback#{token}", {"title": "demo", "device": "phone"}),
        ("account", "GET", f"/v1/account#{token}", None),
        ("heartbeat", "POST", f"/v1/heartbeat#{hb_token}", {"session_id": session, "events": []}),
        ("edge", "POST", "/v1/fleet/heartbeat", heartbeat("e1", ("demo",), sent_at=time.time())),
    ]


_EDGE = HeartbeatSigner("e1", edge_key(EDGE_KEYS["e1"]))


def _send(client: httpx.Client, method: str, path: str, body: object) -> httpx.Response:
    path, _, token = path.partition("#")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    content = json.dumps(body).encode()
    if path == "/v1/fleet/heartbeat":  # signed with edge e1's own key
        headers = {"Authorization": _EDGE.authorization(content, time.time())}
    return client.request(
        method, path, content=content, headers={**headers, "Content-Type": "application/json"}
    )


def test_postgresql_stopped_is_503_and_healthz_says_so_then_it_recovers(
    private_pg: PrivatePostgres, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    monotonic = Clock(0.0)  # the health check's cache expires when the test says
    settings = control_settings(Db("postgresql", private_pg.url), catalog)
    app = create_app(settings, monotonic=monotonic, steering=Steering(RoutingTable(), geo))
    with serving(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        body = {"email": "ada@example.com", "password": "pw-pw-pw-pw"}
        assert client.post("/v1/accounts", json=body).status_code == 201
        token = client.post("/v1/auth/login", json=body).json()["access_token"]
        assert _send(client, *_requests(token, "", "")[-1][1:]).status_code == 200
        started = _send(client, "POST", f"/v1/playback#{token}", {"title": "demo", "device": "tv"})
        assert started.status_code == 200, started.text
        hb_token = started.json()["heartbeat"]["token"]
        session = started.json()["session_id"]
        r = client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok", "store": {"status": "ok"}})

        private_pg.stop()
        for what, method, path, json in _requests(token, hb_token, session):
            t0 = time.monotonic()
            r = _send(client, method, path, json)
            if what == "heartbeat":
                # taken into the telemetry stream: it waits there for the store
                assert r.status_code == 200, r.text
                continue
            _assert_unavailable(r, what)
            assert time.monotonic() - t0 < 5, f"{what}: a dead store must fail fast"
        during = {"session_id": session, "events": [{"at": time.time(), "position_s": 42.0}]}
        r = _send(client, "POST", f"/v1/heartbeat#{hb_token}", during)
        assert r.status_code == 200 and r.json()["resume_position_s"] == 42.0, r.text
        # many at once, on fresh connections: every one a JSON 503, none reset
        with httpx.Client(base_url=base, timeout=10) as other:
            for r in [_send(other, "GET", f"/v1/account#{token}", None) for _ in range(20)]:
                _assert_unavailable(r, "account")
        # what needs no store still answers
        assert client.get("/v1/titles/demo").status_code == 200
        monotonic.advance(1.5)
        r = client.get("/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "down"
        assert r.json()["store"]["status"] == "down", r.text
        assert "connect" in r.json()["store"]["problems"][0], r.text

        private_pg.start()
        monotonic.advance(1.5)
        r = client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok", "store": {"status": "ok"}})
        # no restart: every request works again, the first one included
        for what, method, path, json in _requests(token, hb_token, session):
            r = _send(client, method, path, json)
            assert r.status_code in (200, 201), (what, r.text)
        # the heartbeat taken during the outage reached the store once it came back
        deadline = time.monotonic() + 10
        while asyncio.run(_stored_positions(private_pg.url)) != [42.0]:
            assert time.monotonic() < deadline, "the heartbeat of the outage was not written"
            time.sleep(0.05)


async def _stored_positions(url: str) -> list[float]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT position_s FROM resume"))
            return [float(r[0]) for r in rows]
    finally:
        await engine.dispose()


async def test_sqlite_file_removed_is_503_not_writes_into_the_removed_file(
    tmp_path: Path, geo: GeoLocator
) -> None:
    # The open connections would go on writing into the removed file (lost at the next
    # start), and new ones find an empty database: the store says it is unavailable instead.
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    database = tmp_path / "control.db"
    monotonic = Clock(0.0)
    async with running(
        Db("sqlite", f"sqlite+aiosqlite:///{database}"), catalog, geo, monotonic=monotonic
    ) as control:
        auth = await control.account()
        await control.edge("e1", ("demo",))
        assert (await control.play(auth, "demo")).status_code == 200
        database.unlink()
        _assert_unavailable(await control.play(auth, "demo", device="phone"), "playback")
        _assert_unavailable(await control.beat(heartbeat("e1", ("demo",))), "edge")
        _assert_unavailable(await control.client.get("/v1/account", headers=auth), "account")
        monotonic.advance(1.5)
        r = await control.client.get("/healthz")
        assert r.status_code == 503
        assert r.json() == {
            "status": "down",
            "store": {"status": "down", "problems": [f"the database file {database} was removed"]},
        }


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs of the test's own, to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a filesystem of its own needs root (mount -t tmpfs)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing has nothing to write
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


async def test_sqlite_disk_full_is_503_and_recovers_when_room_is_made(
    small_filesystem: Path, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    monotonic = Clock(0.0)
    db = Db("sqlite", f"sqlite+aiosqlite:///{small_filesystem / 'control.db'}")
    async with running(db, catalog, geo, monotonic=monotonic, slow_start_s=0.0) as control:
        accounts = [await control.account("premium") for _ in range(2)]
        await control.edge("e1", ("demo",))
        filler = _fill(small_filesystem)
        refused = 0
        for i in range(40):  # new screens need new pages, until the WAL has no room
            r = await control.play(accounts[i % 2], "demo", device=f"tv-{i}")
            if r.status_code != 200:
                _assert_unavailable(r, "playback")
                refused += 1
        assert refused, "the full filesystem never refused a write"
        monotonic.advance(1.5)
        r = await control.client.get("/healthz")
        assert r.status_code == 503 and "is full" in r.json()["store"]["problems"][0], r.text

        filler.unlink()
        monotonic.advance(1.5)
        r = await control.client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok", "store": {"status": "ok"}})
        r = await control.play(accounts[0], "demo", device="after")
        assert r.status_code == 200, r.text


async def test_a_statement_held_behind_a_lock_is_503_after_the_statement_timeout(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    """A session that takes a table's lock and hangs (a stuck job, an operator's manual LOCK)
    must not hold every request that needs the table, and its pooled connection, for as long:
    past ``database_statement_timeout_s`` the statement is cancelled and the answer a 503."""
    if db.engine != "postgresql":
        pytest.skip("the statement timeout is PostgreSQL's (SQLite's writers wait a busy timeout)")
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    async with running(db, catalog, geo, database_statement_timeout_s=1.0) as control:
        dsn = db.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        holder = await asyncpg.connect(dsn, server_settings={"search_path": db.schema})
        try:
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
            body = {"email": "ada@example.com", "password": "pw-pw-pw-pw"}
            t0 = time.monotonic()
            r = await asyncio.wait_for(control.client.post("/v1/accounts", json=body), 30)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "store_unavailable", r.text
            assert time.monotonic() - t0 < 15
            await locked.rollback()
        finally:
            await holder.close()
        r = await control.client.post("/v1/accounts", json=body)
        assert r.status_code == 201, r.text
