"""Tables of alert notifications (migration 0009_notifications).

- ``notification_channels``: where notifications go — a webhook (``url`` + the HMAC
  ``secret``, kept in clear because every delivery is signed with it; the API shows it
  once) or e-mail (``recipients``, sent through the SMTP server of the settings); an
  optional default ``route`` (severities, device types, device tags) sends it every
  alert that matches, besides the alerts whose rule names it.
- ``notification_deliveries``: the outbox. One row per (alert, transition, channel),
  written in the transaction that records the transition; its id is the delivery id
  the receiver sees (uuid5 of the three), so a transition recorded twice (a redelivered
  event, a restart) is still one delivery. A sender retries it with backoff until it
  is ``delivered`` or, past the retry period, ``failed``.
- ``notification_attempts``: the delivery log (status code or error, duration) — the
  newest attempts of each delivery.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base
from device_registry.models import UtcDateTime, utcnow


class ChannelKind(StrEnum):
    webhook = "webhook"
    email = "email"


class Transition(StrEnum):
    raised = "raised"
    acknowledged = "acknowledged"
    cleared = "cleared"
    test = "test"  # POST /api/v1/channels/{name}/test


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class ChannelRow(Base):
    __tablename__ = "notification_channels"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(Text)
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret: Mapped[str | None] = mapped_column(String(128))
    route: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class DeliveryRow(Base):
    __tablename__ = "notification_deliveries"
    __table_args__ = (Index("ix_notification_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    channel_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("notification_channels.id", ondelete="CASCADE"), index=True
    )
    alert_id: Mapped[str] = mapped_column(String(64), index=True)
    transition: Mapped[str] = mapped_column(String(16))
    event: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AttemptRow(Base):
    __tablename__ = "notification_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("notification_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
