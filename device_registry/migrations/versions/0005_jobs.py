"""Jobs: one action to many devices, and their per-device executions.

Revision ID: 0005_jobs
Revises: 0004_presence_transitions
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from device_registry.models import UtcDateTime

revision = "0005_jobs"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("device_type", sa.String(32), nullable=False),
        sa.Column("action_kind", sa.String(32), nullable=False),
        sa.Column("action", sa.JSON(), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("rollout", sa.JSON(), nullable=False),
        sa.Column("abort", sa.JSON()),
        sa.Column("timeout_s", sa.Integer()),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("start_at", UtcDateTime(), nullable=False),
        sa.Column("deadline", UtcDateTime(), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("started_at", UtcDateTime()),
        sa.Column("completed_at", UtcDateTime()),
        sa.Column("detail", sa.Text()),
        sa.Column("summary", sa.JSON()),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_table(
        "job_executions",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("command_id", sa.String(64)),
        sa.Column("released_at", UtcDateTime()),
        sa.Column("detail", sa.Text()),
    )
    op.create_index("ix_job_executions_job_status", "job_executions", ["job_id", "status", "device_id"])
    op.create_index("ix_job_executions_job_released", "job_executions", ["job_id", "released_at"])


def downgrade() -> None:
    op.drop_table("job_executions")
    op.drop_table("jobs")
