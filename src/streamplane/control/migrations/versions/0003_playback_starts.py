"""Playback starts: partial indexes over live sessions, an index for purging old ones, and
on PostgreSQL the start's transaction as one function.

The ``(account_id, last_seen)`` index let a start find an account's screens, then read every
one of them the account ever had to find the device's own and the live ones. A start now
reads only sessions not ended: ``(account_id, device)`` and ``(account_id, last_seen)``, both
partial (``WHERE NOT ended``); ``last_seen`` alone finds the sessions past their retention.

``streamplane_claim_screen`` runs a start's statements in the database, in one round trip
and holding the account's row lock only while they run (see ``claim_screen`` in
``streamplane/control/playback.py``, which runs the same statements one by one on SQLite).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# As SQLAlchemy writes ``~Screen.ended`` for each engine: SQLite uses a partial index only
# for a query that repeats its condition in the same form.
_SQLITE_LIVE = sa.text("ended = 0")
_POSTGRES_LIVE = sa.text("NOT ended")


# Lock the account row, read its plan and the title's resume position; if the plan is among
# ``plans`` (those entitled to a title someone can serve), give up the device's earlier
# screen, count the screens in use and take one under the plan's limit. Each statement sees
# every start committed before it (READ COMMITTED takes a snapshot per statement here), so
# a start that waited for the lock counts the one it waited for. No row: no such account;
# a NULL count: the plan is not among ``plans``.
_CLAIM_SCREEN = """
CREATE OR REPLACE FUNCTION streamplane_claim_screen(
    p_account varchar, p_title varchar, p_device varchar, p_id varchar,
    p_now double precision, p_cutoff double precision, p_plans varchar[], p_limits integer[]
) RETURNS TABLE (o_plan varchar, o_position double precision, o_in_use bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_limit integer;
BEGIN
    SELECT a.plan, (SELECT r.position_s FROM resume r
                    WHERE r.account_id = p_account AND r.title = p_title)
      INTO o_plan, o_position
      FROM accounts a WHERE a.id = p_account FOR UPDATE OF a;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_limit := p_limits[array_position(p_plans, o_plan)];
    IF v_limit IS NOT NULL THEN
        UPDATE screens SET ended = true
         WHERE account_id = p_account AND device = p_device AND NOT ended;
        SELECT count(*) INTO o_in_use FROM screens
         WHERE account_id = p_account AND NOT ended AND last_seen >= p_cutoff;
        IF o_in_use < v_limit THEN
            INSERT INTO screens (id, account_id, title, device, started_at, last_seen, ended)
            VALUES (p_id, p_account, p_title, p_device, p_now, p_now, false);
        END IF;
    END IF;
    RETURN NEXT;
END
$$
"""


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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CLAIM_SCREEN)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION streamplane_claim_screen("
            "varchar, varchar, varchar, varchar, double precision, double precision,"
            " varchar[], integer[])"
        )
    op.create_index("ix_screens_account_seen", "screens", ["account_id", "last_seen"])
    op.drop_index("ix_screens_last_seen", table_name="screens")
    op.drop_index("ix_screens_live_seen", table_name="screens")
    op.drop_index("ix_screens_live_device", table_name="screens")
