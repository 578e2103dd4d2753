"""Certificate devices (issue #17): how a device authenticates, its certificate, revoked certificates.

``devices.auth`` is ``password`` (every existing device) or ``certificate``; a certificate device's
``password_hash`` holds its broker device-file entry ``x509:<sha256>`` (so the reconcile rebuilds the
broker's file unchanged), ``cert_serial`` / ``cert_not_after`` what the CRL needs. Certificates
revoked for good (device deleted, certificate rotated) are kept in ``revoked_certificates`` until
they expire, so the CRL can be rebuilt from the DB at any time.

Revision ID: 0008_device_certificates
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from device_registry.models import UtcDateTime

revision = "0008_device_certificates"
down_revision = "0006_device_state"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("auth", sa.String(16), nullable=False, server_default="password"))
        batch.add_column(sa.Column("cert_serial", sa.String(48), nullable=True))
        batch.add_column(sa.Column("cert_not_after", UtcDateTime(), nullable=True))
    op.create_table(
        "revoked_certificates",
        sa.Column("serial", sa.String(48), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("revoked_at", UtcDateTime(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_revoked_certificates_not_after", "revoked_certificates", ["not_after"])


def downgrade() -> None:
    op.drop_table("revoked_certificates")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("cert_not_after")
        batch.drop_column("cert_serial")
        batch.drop_column("auth")
