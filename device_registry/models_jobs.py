"""Tables of jobs: one action for many devices, rolled out at a bounded rate (migration 0005_jobs).

- ``jobs``: what to do (``action``, a one-key JSON object naming its kind), to whom
  (``target`` as requested; the matching devices are materialised as executions when
  the job is created), how fast (``rollout``), when to give up (``abort``,
  ``timeout_s``, ``deadline``) and where it is (``status``).
- ``job_executions``: one row per (job, device). Before its turn an execution is
  ``queued`` (or ``canceled``/``expired``/``failed`` without ever being released);
  the rollout *releases* it, and from then on a command-kind execution IS its row in
  ``commands`` (``command_id``, stable: uuid5 of job and device), whose lifecycle the
  command tracker drives as for any command. The state shown for an execution is
  ``coalesce(commands.status, job_executions.status)``; an action kind without
  commands leaves ``command_id`` NULL and writes ``job_executions.status`` itself.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base
from device_registry.models import UtcDateTime, utcnow


class JobStatus(StrEnum):
    scheduled = "scheduled"
    in_progress = "in_progress"
    completed = "completed"
    canceled = "canceled"
    aborted = "aborted"

    @property
    def active(self) -> bool:
        return self in (JobStatus.scheduled, JobStatus.in_progress)


class ExecutionStatus(StrEnum):
    """States an execution has in ``job_executions`` itself (before release, or for command-less kinds)."""

    queued = "queued"  # waiting for its turn in the rollout
    released = "released"  # handed to the action kind (the command row has the state from here)
    succeeded = "succeeded"
    failed = "failed"
    expired = "expired"  # the job's deadline came first
    canceled = "canceled"  # the job was canceled or aborted first


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    device_type: Mapped[str] = mapped_column(String(32))
    action_kind: Mapped[str] = mapped_column(String(32))
    action: Mapped[dict[str, Any]] = mapped_column(JSON)
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    rollout: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    abort: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timeout_s: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    start_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deadline: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    detail: Mapped[str | None] = mapped_column(Text)
    # Counts frozen once the job ended and none of its executions can change any more:
    # listing old jobs then costs no aggregate over their executions.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    __table_args__ = (Index("ix_jobs_created", "created_at", "id"),)


class JobExecution(Base):
    __tablename__ = "job_executions"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    command_id: Mapped[str | None] = mapped_column(String(64))
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_job_executions_job_status", "job_id", "status", "device_id"),
        Index("ix_job_executions_job_released", "job_id", "released_at"),
    )
