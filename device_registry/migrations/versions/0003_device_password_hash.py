"""Devices keep the password-file hash of their broker password (issue #15).

The broker agent rebuilds the broker's password file from these hashes (at a
reconcile, after a restart) without knowing or rehashing any password. Devices
created before this revision have none: the reconcile reports them
(``no_credentials``) until their credentials are rotated.

Revision ID: 0003_device_password_hash
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_device_password_hash"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("password_hash")
