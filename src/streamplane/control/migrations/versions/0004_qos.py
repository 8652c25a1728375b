"""Quality of experience: per-minute and per-hour aggregates, and each session's mark of what
it has contributed (see ``streamplane.telemetry.qos``).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COUNTS = (
    "asn",
    "viewers",
    "viewer_minutes",
    "watch_ms",
    "rebuffer_ms",
    "bitrate_ms",
    "kbit",
    "rebuffers",
    "switches",
    "errors",
)


def upgrade() -> None:
    op.create_table(
        "qos",
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("span", sa.Integer(), nullable=False),
        sa.Column("edge", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=128), nullable=False),
        sa.Column("network", sa.String(length=64), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTS),
        sa.Column("startups", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("start", "span", "edge", "title", "network", name=op.f("pk_qos")),
    )
    op.create_table(
        "qos_marks",
        sa.Column("session", sa.String(length=64), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("mark", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("session", name=op.f("pk_qos_marks")),
    )
    op.create_index(op.f("ix_qos_marks_seen_at"), "qos_marks", ["seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_qos_marks_seen_at"), table_name="qos_marks")
    op.drop_table("qos_marks")
    op.drop_table("qos")
