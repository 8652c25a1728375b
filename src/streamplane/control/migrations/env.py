"""Alembic's environment: run by :func:`streamplane.control.store.migrate`, which hands over
a connection already inside a transaction (so that the async engines need no second loop)."""

from __future__ import annotations

from alembic import context

from streamplane.control.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `streamplane control migrate`, not the alembic CLI")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
