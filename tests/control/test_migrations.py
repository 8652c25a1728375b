"""The Alembic migrations build exactly the schema the models describe, on both engines."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from streamplane.control.store import Base, Store, migrate

from .conftest import Db


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_produce_the_models_schema(db: Db) -> None:
    store = Store(db.url, schema=db.schema)
    try:
        await migrate(store)
        await migrate(store)  # again: nothing to do, no error
        async with store.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            assert set(Base.metadata.tables) <= tables
            assert "alembic_version" in tables
            assert await conn.run_sync(_diff) == []
            version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).all()
            assert [v[0] for v in version] == ["0005"]
    finally:
        await store.dispose()
