"""The ``leases`` table (migration 0010_leases): who does the registry's once-only work.

One row per lease name (``registry``: the command tracker, job rollout, shadow, presence,
reconcile watcher and notification sender). ``holder`` is the replica name, ``epoch`` the
fencing token (incremented on every acquisition by a new term), ``expires_at`` when the
holder's term ends unless renewed (PostgreSQL: the DB's clock), ``renewed_at`` when it
last renewed (for "took over from X after Y s").
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from device_registry.db import Base
from device_registry.models import UtcDateTime


class LeaseRow(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), default="")
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    renewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
