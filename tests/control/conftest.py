"""Fixtures of the control plane's tests: the same suite on SQLite and on PostgreSQL.

Every test that takes ``db`` runs twice: on a fresh SQLite file, and on a fresh schema of a
PostgreSQL database created for this test run (dropped at the end). PostgreSQL tests skip,
saying why, only when no server answers at ``STREAMPLANE_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI

from streamplane.config import (
    ControlSettings,
    EdgeRegistration,
    Plan,
    RealtimeSettings,
    Settings,
    TelemetrySettings,
    TokenSettings,
)
from streamplane.control import create_app
from streamplane.edge import HeartbeatSigner, edge_key
from streamplane.media.title import Rung, Title, encode_title
from streamplane.stack import free_port
from streamplane.steering import GeoLocator, RoutingTable, Steering

PG_DSN = os.environ.get("STREAMPLANE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY_ID = "k1"
KEY_HEX = "a1" * 32
ADMIN = "admin-secret"
T0 = 1_800_000_000.0  # the fake clock's start
# The edges every test control plane knows, each with its own key (``heartbeat`` gives
# edge ``eN`` the base URL registered here).
EDGE_KEYS = {f"e{i}": f"{i:02x}" * 32 for i in range(1, 5)}


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a loop of its own (the caller may be inside the test's loop)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


def _pg_reachable() -> str | None:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        await conn.close()

    try:
        _run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as err:
        return f"PostgreSQL is not reachable at {PG_DSN}: {err}"
    return None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of this test run's own; yields its SQLAlchemy URL."""
    why = _pg_reachable()
    if why is not None:
        pytest.skip(why)
    name = f"streamplane_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        _run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class Db:
    engine: str
    url: str
    schema: str = ""


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        yield Db("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'control.db'}")
        return
    url = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    yield Db("postgresql", url, schema)


class Clock:
    """A clock the test moves: epoch seconds."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def geo() -> GeoLocator:
    return GeoLocator()


def rung(i: int = 0) -> Rung:
    return Rung(
        id=f"v{i}",
        codec="h264",
        codec_string="avc1.64001f",
        width=1280,
        height=720,
        frame_rate="25",
        average_bitrate_bps=2_000_000 + i,
        peak_bitrate_bps=3_000_000,
        vmaf=93.5,
        vmaf_harmonic=92.0,
        psnr_y=41.0,
        init=f"v/v{i}/init.mp4",
        playlist=f"v/v{i}/index.m3u8",
        segment_bytes=(1000, 1000),
        shots=(),
    )


def title_doc(name: str, duration_s: float = 120.0) -> Title:
    return Title(
        schema=1,
        title=name,
        duration_s=duration_s,
        frame_rate="25",
        width=1280,
        height=720,
        video_timescale=12800,
        shots=(),
        segments=(),
        rungs=(rung(0), rung(1)),
        audio=(),
        artwork=("poster.jpg",),
    )


def write_title(catalog: Path, name: str, **kw: Any) -> Path:
    d = catalog / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "title.json").write_bytes(encode_title(title_doc(name, **kw)))
    return d


def heartbeat(edge_id: str, titles: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
    hb: dict[str, Any] = {
        "edge_id": edge_id,
        "base_url": f"http://{edge_id}.example:8081",
        "site": "site-a",
        "throughput_bps": 1e8,
        "capacity_bps": 1e9,
        "connections": 10,
        "disk_used_bytes": 10**9,
        "disk_total_bytes": 10**12,
        "titles": list(titles),
        "healthy": True,
        "draining": False,
        "sent_at": T0,
    }
    hb.update(kw)
    return hb


@dataclass
class Control:
    """A running control plane and an HTTP client on it."""

    app: FastAPI
    client: httpx.AsyncClient
    clock: Clock
    settings: Settings
    catalog: Path
    _accounts: int = field(default=0)
    signers: dict[str, HeartbeatSigner] = field(default_factory=dict)

    async def settled(self) -> None:
        """Wait until every heartbeat taken so far is written to the store."""
        consumer = self.app.state.plane.heartbeats.consumer
        if consumer is not None:
            await consumer.settle(timeout_s=30)

    async def account(self, plan: str = "standard") -> dict[str, str]:
        """Sign up and log in; the Authorization header of the new account."""
        self._accounts += 1
        email = f"viewer{self._accounts}-{uuid.uuid4().hex[:6]}@example.com"
        r = await self.client.post(
            "/v1/accounts", json={"email": email, "password": "correct horse", "plan": plan}
        )
        assert r.status_code == 201, r.text
        r = await self.client.post(
            "/v1/auth/login", json={"email": email, "password": "correct horse"}
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def signed(self, body: bytes, edge_id: str = "e1") -> dict[str, str]:
        """Headers of heartbeat ``body`` signed now by registered edge ``edge_id``."""
        signer = self.signers.get(edge_id)
        if signer is None:
            key = edge_key(self.settings.control.edges[edge_id].key)
            signer = self.signers[edge_id] = HeartbeatSigner(edge_id, key)
        return {
            "Authorization": signer.authorization(body, self.clock()),
            "Content-Type": "application/json",
        }

    async def beat(self, body: dict[str, Any] | bytes, edge_id: str = "e1") -> httpx.Response:
        """Post a heartbeat signed by ``edge_id`` (unsigned if it is not registered)."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        if edge_id in self.signers or edge_id in self.settings.control.edges:
            headers = self.signed(content, edge_id)
        else:
            headers = {"Content-Type": "application/json"}
        return await self.client.post("/v1/fleet/heartbeat", content=content, headers=headers)

    async def register(self, edge_id: str, base_url: str, site: str = "") -> bytes:
        """Register ``edge_id`` through the admin API; its new key, which ``beat`` signs with."""
        r = await self.client.put(
            f"/v1/fleet/edges/{edge_id}",
            json={"base_url": base_url, "site": site},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 201, r.text
        key = bytes.fromhex(r.json()["key"])
        self.signers[edge_id] = HeartbeatSigner(edge_id, key)
        return key

    async def edge(self, edge_id: str, titles: tuple[str, ...] = (), **kw: Any) -> httpx.Response:
        """A heartbeat from ``edge_id``, registered (through the admin API) if it is not yet."""
        hb = heartbeat(edge_id, titles, **kw)
        registered = edge_id in self.signers or edge_id in self.settings.control.edges
        if not registered and not self.settings.control.dev_mode:
            await self.register(edge_id, hb["base_url"])
        r = await self.beat(hb, edge_id)
        assert r.status_code == 200, r.text
        return r

    async def play(self, auth: dict[str, str], title: str, device: str = "tv") -> httpx.Response:
        # Heartbeats are written behind, within milliseconds; a test's next start comes
        # sooner than that, so it waits for them as a real start would have.
        await self.settled()
        return await self.client.post(
            "/v1/playback", json={"title": title, "device": device}, headers=auth
        )


def control_settings(
    db: Db, catalog: Path, telemetry: dict[str, Any] | None = None, **control: Any
) -> Settings:
    defaults: dict[str, Any] = {
        "database_url": db.url,
        "database_schema": db.schema,
        "catalog_dir": str(catalog),
        "admin_token": ADMIN,
        "jwt_secret": "b2" * 32,
        # cheap password hashes: the tests hash hundreds (argon2id all the same)
        "password_time_cost": 1,
        "password_memory_kib": 1024,
        "public_url": "http://control.test",
        "plans": {
            "basic": Plan(screens=1),
            "standard": Plan(screens=2),
            "premium": Plan(screens=4),
        },
        "slow_start_s": 60.0,
        "slow_start_floor": 0.1,
        "edge_timeout_s": 6.0,
        "screen_timeout_s": 90.0,
        "edges": {
            edge_id: EdgeRegistration(key=key, base_url=f"http://{edge_id}.example:8081")
            for edge_id, key in EDGE_KEYS.items()
        },
    }
    defaults.update(control)
    return Settings(
        tokens=TokenSettings(keys={KEY_ID: KEY_HEX}, signing_kid=KEY_ID, ttl_s=3600),
        control=ControlSettings(**defaults),
        # each control plane's own stream (beside its catalog): an embedded stream serves one
        # process, and some tests run two instances side by side
        telemetry=TelemetrySettings(
            **{"stream_dir": f"{catalog}-telemetry-{uuid.uuid4().hex[:8]}", **(telemetry or {})}
        ),
    )


@asynccontextmanager
async def running(
    db: Db,
    catalog: Path,
    geo: GeoLocator,
    clock: Clock | None = None,
    *,
    monotonic: Clock | None = None,
    telemetry: dict[str, Any] | None = None,
    realtime: dict[str, Any] | None = None,
    tokens: TokenSettings | None = None,
    **control: Any,
) -> AsyncIterator[Control]:
    """Start a control plane (lifespan included) on ``db``; stop it on exit."""
    settings = control_settings(db, catalog, telemetry, **control)
    if realtime is not None:
        settings = msgspec.structs.replace(settings, realtime=RealtimeSettings(**realtime))
    if tokens is not None:  # signing for real edges, which have keys of their own
        settings = msgspec.structs.replace(settings, tokens=tokens)
    clock = clock or Clock()
    app = create_app(
        settings,
        clock=clock,
        monotonic=monotonic or time.monotonic,
        steering=Steering(RoutingTable(), geo),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://control.test") as client:
            yield Control(app, client, clock, settings, catalog)


@pytest.fixture
async def control(db: Db, tmp_path: Path, geo: GeoLocator) -> AsyncIterator[Control]:
    """A control plane on a catalog holding ``demo`` and ``short``."""
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    write_title(catalog, "short", duration_s=30.0)
    async with running(db, catalog, geo) as c:
        yield c


@contextmanager
def serving(app: FastAPI, config: uvicorn.Config | None = None) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a thread (its own loop, lifespan and pools);
    yields its base URL. ``config``: how to serve it (default: loopback, a free port)."""
    if config is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        srv.should_exit = True
        thread.join(10)


_PG_BIN = "/usr/lib/postgresql/15/bin"


class PrivatePostgres:
    """A PostgreSQL server of one test's own, on a free port, that the test may stop and
    start (the shared one on 5432 must never be stopped). Run as the ``postgres`` user when
    the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="sp-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._pg_ctl("initdb", "-o", "-A trust -U postgres -E UTF8 --no-sync")
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self._as, f"{_PG_BIN}/pg_ctl", "-D", str(self.data), "-s", *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", opts, "-l", str(self.data / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop at once, as an outage would: sessions are cut, new connections refused."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [*self._as, f"{_PG_BIN}/pg_ctl", "-D", str(self.data), "-s", "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server, started; skips (saying why) where there is none to run."""
    if not os.path.exists(f"{_PG_BIN}/pg_ctl"):
        pytest.skip(f"no PostgreSQL 15 binaries in {_PG_BIN} (Debian: apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL will not run as root")
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()
