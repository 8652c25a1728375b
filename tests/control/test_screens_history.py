"""An account's past sessions: a start never reads them, and they are purged after retention.

The plans are those of the statements a start really runs while it goes through the API, for
an account with 12,800 ended sessions: on SQLite the statements are traced and explained; on
PostgreSQL auto_explain reports the plan of each one as it runs (and of each statement a
database function runs), with statistics gathered and sequential scans off, so that a plan
shows which index there is for each filter rather than what a small table makes cheapest.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.util import await_

from streamplane.config import SettingsError
from streamplane.control import create_app
from streamplane.control.store import Screen, Store
from streamplane.steering import GeoLocator

from .conftest import Control, Db, control_settings, running, write_title

HISTORY = 12_800
DAY = 86_400.0


def _store(control: Control) -> Store:
    store = control.app.state.plane.store
    assert isinstance(store, Store)
    return store


async def _account_id(control: Control, auth: dict[str, str]) -> str:
    r = await control.client.get("/v1/account", headers=auth)
    return str(r.json()["account_id"])


async def _add_history(store: Store, account_id: str, now: float) -> None:
    """``HISTORY`` ended sessions, the latest a minute ago, on the devices it still uses."""
    rows = [
        {
            "id": str(uuid.uuid4()),
            "account_id": account_id,
            "title": "demo",
            "device": ("tv", "phone", "laptop")[i % 3],
            "started_at": now - 60 - 5 * i,
            "last_seen": now - 60 - 5 * i + 1,
            "ended": True,
        }
        for i in range(HISTORY)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(Screen), rows)
        if store.is_postgres:
            await conn.exec_driver_sql("ANALYZE screens")


@asynccontextmanager
async def _traced(store: Store) -> AsyncIterator[list[Any]]:
    """What the database is asked meanwhile: on SQLite each statement, parameters written in;
    on PostgreSQL the plan of each statement (and of each one a function runs), from
    auto_explain on every connection of the pool, with sequential scans off."""
    seen: list[Any] = []
    if store.is_sqlite:
        # Hot transactions run on the inline engine's one sqlite3 connection.
        assert store._inline is not None
        driver = store._inline.raw_connection().driver_connection
        driver.set_trace_callback(seen.append)
        try:
            yield seen
        finally:
            driver.set_trace_callback(None)
        return

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        driver = dbapi_connection.driver_connection
        await_(driver.execute(_AUTO_EXPLAIN))  # this session only, outside any transaction
        driver.add_log_listener(lambda _conn, message: seen.append(message.message))

    sync: Engine = store.engine.sync_engine
    event.listen(sync, "connect", on_connect)
    await store.engine.dispose()  # the pool's next connections explain what they run
    try:
        yield seen
    finally:
        event.remove(sync, "connect", on_connect)
        await store.engine.dispose()


_AUTO_EXPLAIN = """
LOAD 'auto_explain';
SET auto_explain.log_min_duration = 0;
SET auto_explain.log_nested_statements = on;
SET auto_explain.log_level = notice;
SET auto_explain.log_format = json;
SET enable_seqscan = off;
"""


Read = tuple[str, str, str | None]  # a table, how the plan reads it, what is wrong with that


def _sqlite_reads(store: Store, sql: str) -> list[Read]:
    assert store._inline is not None
    driver = store._inline.raw_connection().driver_connection
    indexes = dict(
        driver.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall()
    )
    reads: list[Read] = []
    for *_ids, detail in driver.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall():
        m = re.match(r"(SCAN|SEARCH) (\w+)(?: USING (?:COVERING )?INDEX (\w+))?", detail)
        if m is None or detail == "SCAN CONSTANT ROW":
            continue
        how, table, index = m.groups()
        problem = None
        if how == "SCAN":
            problem = "the whole table"
        elif table == "screens" and index is not None and not _live_only(indexes[index]):
            problem = "an index over every session, ended ones too"
        reads.append((table, detail, problem))
    return reads


def _live_only(index_sql: str | None) -> bool:
    """Whether an index holds only sessions not ended (or is the primary key's)."""
    if index_sql is None:  # SQLite's own index of the primary key
        return True
    return re.search(r"WHERE \(?(NOT ended|ended = 0)\)?$", index_sql) is not None


async def _postgres_reads(db: Db, notices: list[str]) -> list[Read]:
    conn = await asyncpg.connect(db.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        indexes = {
            name: definition
            for name, definition in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", db.schema
            )
        }
    finally:
        await conn.close()
    reads: list[Read] = []
    for notice in notices:
        explained = json.loads(notice[notice.index("{") :])
        # A start deletes nothing: a DELETE is the purge an earlier start set off.
        if not explained["Query Text"].lstrip().upper().startswith("DELETE"):
            _walk(explained["Plan"], indexes, reads)
    # The fleet's and the catalog's reloads may fall in the window: they are not the start's.
    return [read for read in reads if read[0] in ("accounts", "resume", "screens")]


def _walk(node: dict[str, Any], indexes: dict[str, str], reads: list[Read]) -> None:
    kind, table, index = node["Node Type"], node.get("Relation Name"), node.get("Index Name")
    if index in indexes:  # (not one of the system catalogue's, which asyncpg reads)
        table = indexes[index].split(" ON ")[1].split()[0].rpartition(".")[2]
    if table is not None and kind != "ModifyTable":
        problem = None
        if kind == "Seq Scan":
            problem = "the whole table"
        elif table == "screens" and index is not None and not _pk_or_live(indexes[index]):
            problem = "an index over every session, ended ones too"
        reads.append((table, f"{kind} on {table} using {index}", problem))
    for child in node.get("Plans", ()):
        _walk(child, indexes, reads)


def _pk_or_live(definition: str) -> bool:
    return "CREATE UNIQUE INDEX pk_screens" in definition or definition.endswith(
        "WHERE (NOT ended)"
    )


async def test_a_start_reads_none_of_the_accounts_ended_sessions(control: Control, db: Db) -> None:
    store = _store(control)
    await control.edge("e1", ("demo",))
    auth = await control.account("premium")
    account_id = await _account_id(control, auth)
    await _add_history(store, account_id, control.clock.now)
    assert (await control.play(auth, "demo", device="phone")).status_code == 200
    async with _traced(store) as seen:
        # the tv starts again: the store gives up its screen (none live) and takes one
        assert (await control.play(auth, "demo", device="tv")).status_code == 200
    if store.is_sqlite:
        # The start's own statements: those about this account (not a purge, not the
        # fleet's), explained on the same database.
        reads = [
            read
            for sql in seen
            if re.match(r"\s*(SELECT|UPDATE|INSERT|DELETE|WITH)\b", sql) and account_id in sql
            for read in _sqlite_reads(store, sql)
        ]
    else:
        reads = await _postgres_reads(db, seen)
    assert {"accounts", "screens"} <= {table for table, _, _ in reads}, reads
    assert [(how, problem) for _, how, problem in reads if problem] == []


async def _log_in(control: Control, creds: dict[str, str]) -> dict[str, str]:
    r = await control.client.post(
        "/v1/auth/login", json={"email": creds["email"], "password": creds["password"]}
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _count_screens(db: Db) -> int:
    store = Store(db.url, schema=db.schema)
    try:
        async with store.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(Screen))).scalar_one())
    finally:
        await store.dispose()


async def test_sessions_are_deleted_a_retention_after_their_last_heartbeat(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    """The default retention is a day: ended, stopped and timed-out sessions go a day after
    they were last heard from; live ones, and ended ones heard from within the day, stay."""
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    async with running(db, catalog, geo) as control:
        await control.edge("e1", ("demo",))
        creds = {"email": "long@example.com", "password": "correct horse", "plan": "premium"}
        assert (await control.client.post("/v1/accounts", json=creds)).status_code == 201
        auth = await _log_in(control, creds)
        await _add_history(_store(control), await _account_id(control, auth), control.clock.now)
        stopped = (await control.play(auth, "demo", device="tv")).json()["session_id"]
        r = await control.client.delete(f"/v1/playback/{stopped}", headers=auth)
        assert r.status_code == 204
        assert (await control.play(auth, "demo", device="phone")).status_code == 200  # left
        assert (await control.play(auth, "demo", device="laptop")).status_code == 200  # again:
        assert (await control.play(auth, "demo", device="laptop")).status_code == 200  # ended
        control.clock.advance(DAY - 120)
        await control.edge("e1", ("demo",))
        auth = await _log_in(control, creds)
        tablet = (await control.play(auth, "demo", device="tablet")).json()["session_id"]
        radio = (await control.play(auth, "demo", device="radio")).json()["session_id"]
        r = await control.client.delete(f"/v1/playback/{radio}", headers=auth)
        assert r.status_code == 204
        for _ in range(3):  # a day since the tv, phone and laptop were last heard
            control.clock.advance(60)
            hb = {"session_id": tablet, "events": []}
            r = await control.client.post("/v1/heartbeat", json=hb, headers=auth)
            assert r.status_code == 200  # the tablet plays on
        await control.edge("e1", ("demo",))
        assert (await control.play(auth, "demo", device="console")).status_code == 200
        # a late heartbeat of a session ended within the day still learns it ended
        r = await control.client.post(
            "/v1/heartbeat", json={"session_id": radio, "events": []}, headers=auth
        )
        assert r.status_code == 410
    # Shut down, so the purge a start set off has finished: left are the tablet, the console
    # and the radio (stopped three minutes ago); the rest was last heard from a day ago.
    assert await _count_screens(db) == 3


async def test_the_retention_cannot_be_shorter_than_the_screen_timeout(
    db: Db, tmp_path: Path
) -> None:
    settings = control_settings(db, tmp_path, screen_timeout_s=90.0, screen_retention_s=60.0)
    with pytest.raises(SettingsError, match=r"screen_retention_s \(60\) must be at least"):
        create_app(settings)
