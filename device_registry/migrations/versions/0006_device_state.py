"""Device shadow: desired and reported state per device, with the delta outbox.

Revision ID: 0006_device_state
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from device_registry.models import UtcDateTime

revision = "0006_device_state"
down_revision = "0005_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_states",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_type", sa.String(32), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("desired_updated_at", UtcDateTime(), nullable=True),
        sa.Column("desired_source", sa.String(200), nullable=True),
        sa.Column("desired_request_id", sa.String(64), nullable=True),
        sa.Column("reported", sa.JSON(), nullable=False),
        sa.Column("reported_version", sa.Integer(), nullable=False),
        sa.Column("reported_updated_at", UtcDateTime(), nullable=True),
        sa.Column("delta", sa.JSON(), nullable=False),
        sa.Column("delta_seq", sa.Integer(), nullable=False),
        sa.Column("delta_pending", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_device_states_delta_pending", "device_states", ["delta_pending"])


def downgrade() -> None:
    op.drop_table("device_states")
