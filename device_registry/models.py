"""SQLAlchemy 2 models of the registry: devices and operator API keys.

Other routers add their tables here or in their own module subclassing
``device_registry.db.Base`` (plus an Alembic migration in ``migrations/versions``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Role(StrEnum):
    """Operator roles, each including the ones before it."""

    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # "metadata" is reserved by SQLAlchemy's declarative base: attribute meta, column metadata.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime)
    connected_since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    credentials_rotated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The broker password-file hash ($6$ salted SHA-512 of a 192-bit random password,
    # see iotfleet.broker_files); the password itself is returned once and never stored.
    password_hash: Mapped[str | None] = mapped_column(String(128))
    # "password" or "certificate" (issue #17). A certificate device's password_hash is its device-file
    # entry "x509:<sha256 of its certificate>"; the serial (hex) and expiry are what the CRL needs.
    auth: Mapped[str] = mapped_column(String(16), default="password", server_default="password")
    cert_serial: Mapped[str | None] = mapped_column(String(48))
    cert_not_after: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class RevokedCertificate(Base):
    """A device certificate revoked for good (device deleted, certificate rotated), kept until it expires."""

    __tablename__ = "revoked_certificates"

    serial: Mapped[str] = mapped_column(String(48), primary_key=True)  # hex
    device_id: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the key: keys are 256-bit random tokens, so a fast hash is safe
    # (no dictionary to attack) and lets every request look its key up by index.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("ix_api_keys_role", "role"),)


class PresenceTransition(Base):
    """One change of a device's presence: online or offline, when, and why (``broker_log.Cause``).

    No foreign key: rows are written in batches by the presence flusher, which must
    not fail because a device was deleted meanwhile; retention prunes them.
    """

    __tablename__ = "presence_transitions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    online: Mapped[bool] = mapped_column(Boolean)
    cause: Mapped[str] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_presence_transitions_device_at", "device_id", "at"),
        Index("ix_presence_transitions_at", "at"),
    )
