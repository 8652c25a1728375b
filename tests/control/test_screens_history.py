"""An account's past sessions: a start never reads them, and they are purged after retention.

The plans are checked on the statements a start really runs, captured from the drivers while
one start goes through the API, against an account with 12,800 ended sessions; on PostgreSQL
with statistics gathered and sequential scans off, so that the plan shows which index exists
for each filter rather than what a small table happens to make cheapest.
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

from streamplane.config import SettingsError
from streamplane.control import create_app
from streamplane.control.store import Screen, Store
from streamplane.steering import GeoLocator

from .conftest import Control, Db, control_settings, running, write_title

HISTORY = 12_800
DAY = 86_400.0

Statement = tuple[str, tuple[Any, ...]]  # SQL and its parameters (none: written in)


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
async def _traced(store: Store) -> AsyncIterator[list[Statement]]:
    """Every statement the store sends to the database meanwhile, whichever way it goes."""
    seen: list[Statement] = []
    if store.is_sqlite:
        # Hot transactions run on the inline engine's one sqlite3 connection; its trace
        # callback gets each statement with its parameters written in.
        assert store._inline is not None
        driver = store._inline.raw_connection().driver_connection
        driver.set_trace_callback(lambda sql: seen.append((sql, ())))
        try:
            yield seen
        finally:
            driver.set_trace_callback(None)
        return

    # PostgreSQL: what goes through SQLAlchemy, and what goes to asyncpg directly (asyncpg
    # logs the queries it is given, not the prepared statements SQLAlchemy runs).
    def through_sqlalchemy(
        _conn: Any, _cursor: Any, sql: str, params: Any, _context: Any, _many: bool
    ) -> None:
        seen.append((sql, tuple(params or ())))

    def logged(record: Any) -> None:
        seen.append((record.query, tuple(record.args or ())))

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(logged)

    sync: Engine = store.engine.sync_engine
    event.listen(sync, "before_cursor_execute", through_sqlalchemy)
    event.listen(sync, "connect", on_connect)
    await store.engine.dispose()  # the pool's next connections log their queries
    try:
        yield seen
    finally:
        event.remove(sync, "before_cursor_execute", through_sqlalchemy)
        event.remove(sync, "connect", on_connect)


def _sqlite_plan_problems(store: Store, sql: str) -> list[str]:
    assert store._inline is not None
    driver = store._inline.raw_connection().driver_connection
    indexes = dict(
        driver.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall()
    )
    problems = []
    for *_ids, detail in driver.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall():
        if detail.startswith("SCAN ") and detail != "SCAN CONSTANT ROW":
            problems.append(detail)  # a whole table
        m = re.match(r"SEARCH screens USING (?:COVERING )?INDEX (\w+)", detail)
        if m and not _live_only(indexes[m.group(1)]):
            problems.append(f"{detail}: an index over every session, ended ones too")
    return problems


def _live_only(index_sql: str | None) -> bool:
    """Whether an index holds only sessions not ended (or is the primary key's)."""
    if index_sql is None:  # SQLite's own index of the primary key
        return True
    return re.search(r"WHERE \(?(NOT ended|ended = 0)\)?$", index_sql) is not None


async def _postgres_plan_problems(db: Db, statements: list[Statement]) -> dict[str, list[str]]:
    conn = await asyncpg.connect(
        db.url.replace("postgresql+asyncpg://", "postgresql://"),
        server_settings={"search_path": db.schema, "enable_seqscan": "off"},
    )
    try:
        indexes = {
            name: definition
            for name, definition in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", db.schema
            )
        }
        out = {}
        for sql, args in statements:
            plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
            problems: list[str] = []
            _walk(plan[0]["Plan"], indexes, problems)
            out[sql] = problems
        return out
    finally:
        await conn.close()


def _walk(node: dict[str, Any], indexes: dict[str, str], problems: list[str]) -> None:
    kind = node["Node Type"]
    if kind == "Seq Scan":
        problems.append(f"Seq Scan on {node['Relation Name']}")
    index = node.get("Index Name")
    if index is not None and "screens" in indexes[index] and not _pk_or_live(indexes[index]):
        problems.append(f"{kind} using {index}: an index over every session, ended ones too")
    for child in node.get("Plans", ()):
        _walk(child, indexes, problems)


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
    # The start's own statements: those about this account (not a purge, not the fleet's).
    statements = [
        (sql, args)
        for sql, args in seen
        if re.match(r"\s*(SELECT|UPDATE|INSERT|DELETE|WITH)\b", sql, re.IGNORECASE)
        and (account_id in sql or account_id in args)
    ]
    touched = " ".join(sql for sql, _ in statements)
    assert "screens" in touched and "accounts" in touched, statements
    if store.is_sqlite:
        problems = {sql: _sqlite_plan_problems(store, sql) for sql, _ in statements}
    else:
        problems = await _postgres_plan_problems(db, statements)
    assert {sql: p for sql, p in problems.items() if p} == {}


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
