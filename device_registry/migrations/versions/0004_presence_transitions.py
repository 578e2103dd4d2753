"""Presence transitions: every online/offline change of a device with its cause.

Revision ID: 0004
Revises: 0003_device_password_hash
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from device_registry.models import UtcDateTime

revision = "0004"
down_revision = "0003_device_password_hash"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "presence_transitions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
    )
    op.create_index("ix_presence_transitions_device_at", "presence_transitions", ["device_id", "at"])
    op.create_index("ix_presence_transitions_at", "presence_transitions", ["at"])


def downgrade() -> None:
    op.drop_table("presence_transitions")
