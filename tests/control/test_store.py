"""Store.transaction and Store.run: all or nothing on both engines; on SQLite, never blocking
the loop; on PostgreSQL, a lost connection is not used again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import Connection, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError

from streamplane.control.store import Account, Script, Store, StoreUnavailable, migrate

from .conftest import Db


def _add(conn: Connection, account_id: str) -> None:
    conn.execute(
        insert(Account).values(
            id=account_id,
            email=f"{account_id}@example.com",
            password_hash="x",
            plan="basic",
            created_at=0.0,
        )
    )


def _count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(Account)).scalar_one())


async def test_a_transaction_commits_what_returns_and_nothing_of_what_raises(db: Db) -> None:
    store = Store(db.url, schema=db.schema)
    try:
        await migrate(store)
        await store.transaction(lambda conn: _add(conn, "a1"))

        def add_then_fail(conn: Connection) -> None:
            _add(conn, "a2")
            raise RuntimeError("refused")

        with pytest.raises(RuntimeError, match="refused"):
            await store.transaction(add_then_fail)
        assert await store.transaction(_count) == 1
    finally:
        await store.dispose()


async def test_sqlite_waits_for_another_process_lock_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "control.db"
    store = Store(f"sqlite+aiosqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)  # another process, as far as SQLite knows
    try:
        await migrate(store)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        started = asyncio.create_task(store.transaction(lambda conn: _add(conn, "a1")))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not started.done()  # still waiting for the lock ...
        assert ticks == 20  # ... while the loop ran on
        other.execute("COMMIT")
        await asyncio.wait_for(started, 5)
        assert await store.transaction(_count) == 1
    finally:
        other.close()
        await store.dispose()


async def test_sqlite_checkpoints_the_wal_so_it_stops_growing(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    store = Store(f"sqlite+aiosqlite:///{path}")
    wal = Path(f"{path}-wal")
    try:
        await migrate(store)
        sizes = []
        for i in range(3000):
            await store.transaction(lambda conn, i=i: _add(conn, f"a{i}"))
            await asyncio.sleep(0)  # a loop that serves requests: the checkpoint can run
            if i % 1000 == 999:
                sizes.append(wal.stat().st_size)
        # Checkpointed every 1000 transactions, the WAL starts over instead of growing.
        assert sizes[2] <= 1.5 * sizes[0], sizes
        assert await store.transaction(_count) == 3000
    finally:
        await store.dispose()


def _add_script(store: Store, *ids: str, fail: bool = False) -> Script[int]:
    """Insert accounts ``ids`` and count them; raise at the end if ``fail``."""
    add = store.prepare(
        insert(Account).values(
            id=bindparam("b_id"),
            email=bindparam("b_email"),
            password_hash="x",
            plan="basic",
            created_at=0.0,
        )
    )
    count = store.prepare(select(func.count()).select_from(Account))
    for account_id in ids:
        rows = yield add, {"b_id": account_id, "b_email": f"{account_id}@example.com"}
        assert list(rows) == []  # no RETURNING: no rows
    rows = yield count, {}
    if fail:
        raise RuntimeError("refused")
    return int(rows[0][0])


async def test_a_script_commits_what_it_returns_and_nothing_of_what_raises(db: Db) -> None:
    store = Store(db.url, schema=db.schema)
    try:
        await migrate(store)
        assert await store.run(_add_script(store, "a1", "a2")) == 2
        with pytest.raises(RuntimeError, match="refused"):
            await store.run(_add_script(store, "a3", fail=True))
        # a statement the database refuses: SQLAlchemy's exception, as on every other path
        with pytest.raises(IntegrityError):
            await store.run(_add_script(store, "a4", "a1"))
        assert await store.run(_add_script(store)) == 2
        assert await store.transaction(_count) == 2
    finally:
        await store.dispose()


async def test_scripts_that_arrive_together_succeed_or_fail_each_on_its_own(db: Db) -> None:
    """Concurrent scripts (on SQLite, one transaction with a savepoint each): one that raises
    and one the database refuses keep nothing, and take none of the others down with them."""
    store = Store(db.url, schema=db.schema)
    try:
        await migrate(store)
        await store.run(_add_script(store, "a0"))
        outcomes = await asyncio.gather(
            store.run(_add_script(store, "a1")),
            store.run(_add_script(store, "a2", "a3", fail=True)),
            store.run(_add_script(store, "a4")),
            store.run(_add_script(store, "a5", "a0")),  # a0 exists: refused
            store.run(_add_script(store, "a6")),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], RuntimeError)
        assert isinstance(outcomes[3], IntegrityError)
        counts = [outcomes[0], outcomes[2], outcomes[4]]
        if db.engine == "sqlite":  # one after the other, each seeing those before it
            assert counts == [2, 3, 4]
        async with store.read() as conn:
            ids = (await conn.execute(select(Account.id).order_by(Account.id))).scalars().all()
        assert ids == ["a0", "a1", "a4", "a6"]
    finally:
        await store.dispose()


async def test_a_script_whose_request_is_cancelled_before_its_turn_keeps_nothing(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    try:
        await migrate(store)
        queued = asyncio.create_task(store.run(_add_script(store, "a1")))
        await asyncio.sleep(0)  # it is queued; its batch has not run yet
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await store.run(_add_script(store, "a2")) == 1
    finally:
        await store.dispose()


async def test_a_script_on_a_lost_connection_fails_once_and_the_next_one_works(db: Db) -> None:
    """PostgreSQL restarted, a connection cut: the pool must not hand the dead one out again."""
    if db.engine != "postgresql":
        pytest.skip("SQLite has no connection to lose")
    store = Store(db.url, schema=db.schema, pool_size=1)
    try:
        await migrate(store)
        assert await store.run(_add_script(store, "a1")) == 1
        async with store.read() as conn:
            pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        killer = await asyncpg.connect(db.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await killer.close()
        with pytest.raises(StoreUnavailable):  # ("connection is closed", or asyncpg's
            await store.run(_add_script(store, "a2"))  # protocol caught mid-operation)
        assert await store.run(_add_script(store, "a3")) == 2
    finally:
        await store.dispose()


async def test_a_whole_transaction_statement_must_end_its_script(db: Db) -> None:
    store = Store(db.url, schema=db.schema)
    try:
        await migrate(store)
        one = store.prepare(select(func.count()).select_from(Account), whole=True)

        def alone() -> Script[int]:
            rows = yield one, {}
            return int(rows[0][0])

        def followed() -> Script[int]:
            yield one, {}
            yield one, {}
            return 0

        assert await store.run(alone()) == 0
        with pytest.raises(RuntimeError, match="must be the last"):
            await store.run(followed())  # (on PostgreSQL it was sent without BEGIN)
        assert await store.run(alone()) == 0  # and the connection is fine
    finally:
        await store.dispose()
