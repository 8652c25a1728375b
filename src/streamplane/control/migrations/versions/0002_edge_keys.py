"""Edges prove who they are: keys registered through the admin API, and each edge's last
signed heartbeat timestamp (a heartbeat must be later than it).

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


def upgrade() -> None:
    op.create_table(
        "edge_keys",
        sa.Column("edge_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("base_url", sa.String(length=256), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("previous_key", sa.String(length=128), nullable=True),
        sa.Column("previous_until", sa.Float(), nullable=True),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("edge_id", name=op.f("pk_edge_keys")),
    )
    op.add_column("edges", sa.Column("auth_ts", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edges") as batch:
        batch.drop_column("auth_ts")
    op.drop_table("edge_keys")
