"""Steering's QoS demotions in force, kept across restarts (hysteresis and hold included).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qos_demotions",
        sa.Column("network", sa.String(length=64), nullable=False),
        sa.Column("edge", sa.String(length=64), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.Column("bad_at", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("network", "edge", name=op.f("pk_qos_demotions")),
    )


def downgrade() -> None:
    op.drop_table("qos_demotions")
