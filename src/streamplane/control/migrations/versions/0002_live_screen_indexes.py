"""Screens: partial indexes over live sessions for a start, an index for purging old ones.

The ``(account_id, last_seen)`` index let a start find an account's screens, then read every
one of them the account ever had to find the device's own and the live ones. A start now
reads only sessions not ended: ``(account_id, device)`` and ``(account_id, last_seen)``, both
partial (``WHERE NOT ended``); ``last_seen`` alone finds the sessions past their retention.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# As SQLAlchemy writes ``~Screen.ended`` for each engine: SQLite uses a partial index only
# for a query that repeats its condition in the same form.
_SQLITE_LIVE = sa.text("ended = 0")
_POSTGRES_LIVE = sa.text("NOT ended")


def upgrade() -> None:
    op.create_index(
        "ix_screens_live_device",
        "screens",
        ["account_id", "device"],
        sqlite_where=_SQLITE_LIVE,
        postgresql_where=_POSTGRES_LIVE,
    )
    op.create_index(
        "ix_screens_live_seen",
        "screens",
        ["account_id", "last_seen"],
        sqlite_where=_SQLITE_LIVE,
        postgresql_where=_POSTGRES_LIVE,
    )
    op.create_index("ix_screens_last_seen", "screens", ["last_seen"])
    op.drop_index("ix_screens_account_seen", table_name="screens")


def downgrade() -> None:
    op.create_index("ix_screens_account_seen", "screens", ["account_id", "last_seen"])
    op.drop_index("ix_screens_last_seen", table_name="screens")
    op.drop_index("ix_screens_live_seen", table_name="screens")
    op.drop_index("ix_screens_live_device", table_name="screens")
