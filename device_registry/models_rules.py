"""Tables of rules, commands and alerts (migration 0002).

- ``rules``: the rule definition as validated JSON (``rules_engine.models.Rule``),
  with a version bumped on every change (the engine keeps state across edits).
- ``commands``: one row per command to one device and its lifecycle
  ``queued → sent → delivered → succeeded | failed``, or ``expired``.
- ``alerts``: ``active → acknowledged → cleared``. ``open_key`` is
  ``"{rule_id}:{device_id}"`` while the alert is not cleared and NULL after: a
  unique index on it makes "one open alert per (rule, device)" a database
  guarantee, even for concurrent raises (NULLs never collide).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base
from device_registry.models import UtcDateTime, utcnow


class CommandStatus(StrEnum):
    queued = "queued"
    sent = "sent"
    delivered = "delivered"
    succeeded = "succeeded"
    failed = "failed"
    expired = "expired"

    @property
    def rank(self) -> int:
        """Lifecycle order: a status never moves to a lower rank."""
        return {"queued": 0, "sent": 1, "delivered": 2}.get(self.value, 3)

    @property
    def final(self) -> bool:
        return self.rank == 3


class AlertStatus(StrEnum):
    active = "active"
    acknowledged = "acknowledged"
    cleared = "cleared"


class RuleRow(Base):
    __tablename__ = "rules"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    device_type: Mapped[str] = mapped_column(String(32), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class CommandRow(Base):
    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    device_type: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str] = mapped_column(String(200))
    rule_id: Mapped[str | None] = mapped_column(String(36), index=True)
    requested_by: Mapped[str | None] = mapped_column(String(100))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    ttl_s: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index("ix_commands_device_created", "device_id", "created_at"),
        Index("ix_commands_status_expires", "status", "expires_at"),
        UniqueConstraint("device_id", "idempotency_key", name="uq_commands_idempotency"),
    )


class AlertRow(Base):
    __tablename__ = "alerts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(36), index=True)
    rule_name: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    device_type: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16), index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    open_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    raised_at: Mapped[datetime] = mapped_column(UtcDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    acknowledged_by: Mapped[str | None] = mapped_column(String(100))
    cleared_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    clear_reason: Mapped[str | None] = mapped_column(String(200))
