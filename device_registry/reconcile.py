"""Registry ↔ broker reconcile: the DB is the system of record, the broker's device file is made to match it.

Run when the registry first reaches the broker agent, whenever the agent
restarted (its boot id changed), and on demand (``POST /api/v1/reconcile``). It
compares every device with the agent's entries (id → fingerprint of the stored
password hash) — two dicts, linear in the fleet — sends one change with every
repair, and keeps a report of what differed (``GET /api/v1/reconcile``,
``/healthz``, metric ``registry_reconcile_drift``).

Drift kinds: ``missing_entry`` (an enabled device the broker does not know: its
stored hash is written back, the device's password works again),
``hash_mismatch`` (the broker holds another password or type: the stored ones are
written back), ``disabled_present`` (a disabled device the broker still accepts:
removed, kicked), ``orphan_entry`` (an entry for a device the registry no longer
has: removed — the agent's file holds only entries the registry made; the
platform's accounts live in dynamic security and are never touched),
``no_credentials`` (an enabled device without a stored hash and without a
legacy dynsec client: reported only — rotate its credentials),
``legacy_dynsec_client`` (a dynsec client an older registry made for a device
that is gone, disabled or already in the device file: deleted, kicked). Devices
still served by their legacy dynsec client are listed in ``legacy_dynsec``, not
counted as drift (see device_registry.legacy_dynsec). ``foreign_entry``: a device
whose id is reserved for the platform or held by a dynsec client the registry did
not make (a platform account, another tool's): reported and left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry import legacy_dynsec
from device_registry.agent_client import AgentClient
from device_registry.broker_admin import BrokerAdmin
from device_registry.models import Device
from iotfleet import broker_files
from iotfleet.reserved_names import is_reserved

log = logging.getLogger("registry.reconcile")


@dataclass
class Drift:
    device_id: str
    kind: str
    action: str


@dataclass
class ReconcileReport:
    started_at: datetime
    finished_at: datetime | None = None
    ok: bool = False
    error: str | None = None
    devices_checked: int = 0
    broker_clients: int = 0
    drift: list[Drift] = field(default_factory=list)
    repair_commands: int = 0
    unmanaged: list[str] = field(default_factory=list)
    """Kept for the report's shape: the agent's file holds only the registry's entries, so always empty."""
    legacy_dynsec: list[str] = field(default_factory=list)
    """Devices still served by a dynsec client from before the device file (until rotated)."""
    duration_s: float = 0.0

    @property
    def drift_count(self) -> int:
        return len(self.drift)

    def as_dict(self, *, max_items: int = 100) -> dict[str, Any]:
        body = asdict(self)
        body["drift_count"] = self.drift_count
        body["drift"] = body["drift"][:max_items]
        body["unmanaged_count"] = len(self.unmanaged)
        body["unmanaged"] = body["unmanaged"][:max_items]
        body["legacy_dynsec_count"] = len(self.legacy_dynsec)
        body["legacy_dynsec"] = body["legacy_dynsec"][:max_items]
        by_kind: dict[str, int] = {}
        for item in self.drift:
            by_kind[item.kind] = by_kind.get(item.kind, 0) + 1
        body["drift_by_kind"] = by_kind
        return body


class Reconciler:
    def __init__(
        self,
        agent: AgentClient,
        sessions: async_sessionmaker[AsyncSession],
        *,
        broker: BrokerAdmin | None = None,
        on_report: Callable[[ReconcileReport], None] | None = None,
    ) -> None:
        self.agent = agent
        self.broker = broker
        self.sessions = sessions
        self.on_report = on_report
        self.last: ReconcileReport | None = None
        self._lock = asyncio.Lock()
        # Ids an API request is changing right now, and ids changed since the run
        # began: their DB and broker states may legitimately differ for a moment.
        self.busy: set[str] = set()
        self._touched: set[str] = set()

    def touch(self, ids: list[str] | set[str]) -> None:
        self.busy.update(ids)
        self._touched.update(ids)

    def release(self, ids: list[str] | set[str]) -> None:
        self.busy.difference_update(ids)

    async def run(self) -> ReconcileReport:
        async with self._lock:
            report = ReconcileReport(started_at=datetime.now(UTC))
            started = time.monotonic()
            self._touched = set(self.busy)
            try:
                await self._reconcile(report)
                report.ok = True
            except Exception as exc:
                report.error = f"{type(exc).__name__}: {exc}"
                log.warning("reconcile failed: %s", report.error)
            report.finished_at = datetime.now(UTC)
            report.duration_s = round(time.monotonic() - started, 3)
            self.last = report
            if report.ok:
                log.info(
                    "reconcile done devices=%d broker_clients=%d drift=%d repaired_with=%d commands in %.2f s",
                    report.devices_checked,
                    report.broker_clients,
                    report.drift_count,
                    report.repair_commands,
                    report.duration_s,
                )
            if self.on_report:
                self.on_report(report)
            return report

    async def _reconcile(self, report: ReconcileReport) -> None:
        _boot_id, entries = await self.agent.devices()
        # Legacy dynsec device clients answer before the file: know them (when the admin link is up).
        # Any other dynsec client named like a device (a platform account, another tool's)
        # also answers before the file: such devices are reported and never touched.
        legacy: set[str] = set()
        foreign: set[str] = set()
        if self.broker is not None and self.broker.connected:
            legacy, foreign = await legacy_dynsec.classify_clients(self.broker)
        async with self.sessions() as session:
            devices = (
                await session.execute(select(Device.id, Device.type, Device.enabled, Device.password_hash))
            ).all()
        report.devices_checked = len(devices)
        report.broker_clients = len(entries)
        upsert: dict[str, broker_files.DeviceEntry] = {}
        remove: list[str] = []
        stale_legacy: list[str] = []
        known: set[str] = set()
        skip = self.busy | self._touched

        def drift(device_id: str, kind: str, action: str) -> None:
            report.drift.append(Drift(device_id, kind, action))

        for device_id, device_type, enabled, password_hash in devices:
            known.add(device_id)
            if device_id in skip:
                continue
            if device_id in foreign or is_reserved(device_id):
                drift(
                    device_id,
                    "foreign_entry",
                    "left alone: broker account not the registry's; delete the device",
                )
                continue
            have = entries.get(device_id)
            if device_id in legacy:
                if enabled and password_hash is None:
                    report.legacy_dynsec.append(device_id)  # works through dynsec until rotated
                else:
                    drift(device_id, "legacy_dynsec_client", "deleted (kicked): the device file serves it")
                    stale_legacy.append(device_id)
            if not enabled:
                if have is not None:
                    drift(device_id, "disabled_present", "removed (kicked)")
                    remove.append(device_id)
                continue
            if password_hash is None:
                if device_id not in legacy:
                    drift(device_id, "no_credentials", "none: rotate the credentials to give it a password")
                continue
            want = broker_files.DeviceEntry(device_type, password_hash)
            if have is None:
                drift(device_id, "missing_entry", "stored password hash written back")
                upsert[device_id] = want
            elif have != want.fingerprint():
                drift(device_id, "hash_mismatch", "stored type and password hash written back (kicked)")
                upsert[device_id] = want
        for device_id in sorted(entries.keys() - known - skip):
            drift(device_id, "orphan_entry", "removed (kicked)")
            remove.append(device_id)
        for device_id in sorted(legacy - known - skip):
            drift(device_id, "legacy_dynsec_client", "deleted (kicked): no such device")
            stale_legacy.append(device_id)
        if stale_legacy and self.broker is not None:
            await legacy_dynsec.remove(self.broker, stale_legacy)
        if upsert or remove:
            for item in report.drift[:20]:
                log.warning("drift: device=%s %s → %s", item.device_id, item.kind, item.action)
            await self.agent.apply(upsert, remove)
        report.repair_commands = len(upsert) + len(remove) + len(stale_legacy)
