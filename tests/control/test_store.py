"""Store.transaction: all or nothing on both engines; on SQLite, never blocking the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, insert, select

from streamplane.control.store import Account, Store, migrate

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
