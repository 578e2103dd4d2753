"""The device shadow's table (migration 0006): one row per device that has a desired or reported state.

``desired`` and ``reported`` are partial documents of the type's state model
(``iotfleet.catalogue`` ``DeviceType.state``), each with its own version
(bumped on every change, never on a no-op patch) and time of change. ``delta``
(the desired fields the device has not reported) is stored, not recomputed, so
the outbox below needs no catalogue lookup.

Outbox: ``delta_pending`` is set in the same transaction that changes the delta
and cleared once the broker acknowledged the retained ``state/delta`` message
carrying ``delta_seq``; a registry that crashed in between publishes it again
when it is back (device_registry/device_state.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base
from device_registry.models import UtcDateTime


class DeviceStateRow(Base):
    __tablename__ = "device_states"

    # Deleting a device deletes its shadow (SQLite runs with foreign_keys=ON).
    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    device_type: Mapped[str] = mapped_column(String(32))
    desired: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    desired_version: Mapped[int] = mapped_column(Integer, default=0)
    desired_updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    desired_source: Mapped[str | None] = mapped_column(String(200))
    """Who set it last: operator:<key name>, rule:<rule name>, job:<id>."""
    desired_request_id: Mapped[str | None] = mapped_column(String(64))
    """Id of the last rule request applied: a redelivered request is not applied twice."""
    reported: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reported_version: Mapped[int] = mapped_column(Integer, default=0)
    reported_updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    delta_seq: Mapped[int] = mapped_column(Integer, default=0)
    delta_pending: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_device_states_delta_pending", "delta_pending"),)
