"""Leases (issue #19): one registry replica at a time does the once-only work.

See ``device_registry/models_lease.py``. The ``registry`` row is created here, free
(expired in 1970), so acquiring is always an UPDATE.

Revision ID: 0010_leases
Revises: 0009_notifications
Create Date: 2026-12-02
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from device_registry.models import UtcDateTime

revision = "0010_leases"
down_revision = "0009_notifications"
branch_labels = None
depends_on = None


def upgrade() -> None:
    leases = op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False, server_default=""),
        sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("renewed_at", UtcDateTime(), nullable=True),
    )
    op.bulk_insert(
        leases,
        [{"name": "registry", "holder": "", "epoch": 0, "expires_at": datetime(1970, 1, 1, tzinfo=UTC)}],
    )


def downgrade() -> None:
    op.drop_table("leases")
