"""Registry ↔ broker reconcile: the DB is the system of record, dynsec is made to match it.

Run when the admin link (re)connects (so at every start and after a broker
restart) and on demand (``POST /api/v1/reconcile``). It compares every device
with its dynsec client and role, repairs differences in batches and keeps a
report of what differed (``GET /api/v1/reconcile``, ``/healthz``).

Drift kinds: ``missing_client`` (device without broker client: recreated with
a fresh password nobody knows — rotate the credentials to use it),
``missing_role``/``acl_mismatch``/``role_not_assigned`` (ACLs restored),
``enabled_mismatch`` (disabled state restored), ``orphan_client``/``orphan_role``
(entries the registry made — marked with its textname — for devices it no
longer has: deleted, they are credentials nobody manages). Device-like entries
without the marker (made by another tool) are listed as ``unmanaged``, not touched.
``foreign_entry``: a device whose id is reserved for the platform, or whose
broker client or role exists without the marker (a platform account, another
tool's entry): reported and left alone, never rewritten.
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

from device_registry import broker_admin
from device_registry.broker_admin import BrokerAdmin
from device_registry.models import Device
from iotfleet import dynsec
from iotfleet.reserved_names import is_reserved

log = logging.getLogger("registry.reconcile")

ROLE_PREFIX = dynsec.device_role_name("")


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
    """Device-like broker clients/roles without the registry's marker and without a device."""
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
        by_kind: dict[str, int] = {}
        for item in self.drift:
            by_kind[item.kind] = by_kind.get(item.kind, 0) + 1
        body["drift_by_kind"] = by_kind
        return body


def _acl_key(entry: dict[str, Any]) -> tuple[str, str, bool, int]:
    return (
        str(entry.get("acltype", "")).lower(),
        str(entry.get("topic", "")),
        bool(entry.get("allow", False)),
        int(entry.get("priority", 0)),
    )


class Reconciler:
    def __init__(
        self,
        broker: BrokerAdmin,
        sessions: async_sessionmaker[AsyncSession],
        *,
        on_report: Callable[[ReconcileReport], None] | None = None,
    ) -> None:
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
        every_client = {c["username"]: c for c in await self.broker.list_clients()}
        clients = {
            username: c
            for username, c in every_client.items()
            if c.get("textname") == broker_admin.DEVICE_TEXTNAME
            or any(str(r.get("rolename", "")).startswith(ROLE_PREFIX) for r in c.get("roles", []))
        }
        roles = {
            r["rolename"]: r
            for r in await self.broker.list_roles()
            if str(r.get("rolename", "")).startswith(ROLE_PREFIX)
        }
        async with self.sessions() as session:
            devices = (await session.execute(select(Device.id, Device.type, Device.enabled))).all()
        report.devices_checked = len(devices)
        report.broker_clients = len(clients)
        commands: list[dict[str, Any]] = []
        known: set[str] = set()
        skip = self.busy | self._touched

        def drift(device_id: str, kind: str, action: str, *cmds: dict[str, Any]) -> None:
            report.drift.append(Drift(device_id, kind, action))
            commands.extend(cmds)

        for device_id, device_type, enabled in devices:
            known.add(device_id)
            if device_id in skip:
                continue
            role_name = dynsec.device_role_name(device_id)
            expected = dynsec.device_acls(device_type, device_id)
            role = roles.get(role_name)
            foreign = [
                what
                for what, entry in (("client", every_client.get(device_id)), ("role", role))
                if entry is not None and entry.get("textname") != broker_admin.DEVICE_TEXTNAME
            ]
            if foreign or is_reserved(device_id):
                # Never rewrite what the registry did not create: a platform account
                # (a device row an older registry let in) or another tool's entry.
                what = " and ".join(foreign) or "name"
                drift(
                    device_id,
                    "foreign_entry",
                    f"left alone: broker {what} not the registry's; delete the device",
                )
                continue
            if role is None:
                drift(
                    device_id,
                    "missing_role",
                    "role recreated",
                    {
                        "command": "createRole",
                        "rolename": role_name,
                        "textname": broker_admin.DEVICE_TEXTNAME,
                        "acls": expected,
                    },
                )
            else:
                have = {_acl_key(a): a for a in role.get("acls", [])}
                want = {_acl_key(a): a for a in expected}
                if have.keys() != want.keys():
                    fix: list[dict[str, Any]] = [
                        {
                            "command": "removeRoleACL",
                            "rolename": role_name,
                            "acltype": have[k]["acltype"],
                            "topic": have[k]["topic"],
                        }
                        for k in have.keys() - want.keys()
                    ]
                    fix += [
                        {"command": "addRoleACL", "rolename": role_name, **want[k]}
                        for k in want.keys() - have.keys()
                    ]
                    drift(device_id, "acl_mismatch", "ACLs restored", *fix)
            client = clients.get(device_id)
            if client is None:
                cmds = broker_admin.create_device_commands(
                    device_type, device_id, broker_admin.new_device_password(), enabled=enabled
                )
                drift(
                    device_id,
                    "missing_client",
                    "client recreated with a new password: rotate the credentials to use it",
                    *cmds[1:],
                )
                continue
            if not any(r.get("rolename") == role_name for r in client.get("roles", [])):
                drift(
                    device_id,
                    "role_not_assigned",
                    "role assigned",
                    {"command": "addClientRole", "username": device_id, "rolename": role_name},
                )
            if bool(client.get("disabled", False)) == enabled:
                drift(
                    device_id,
                    "enabled_mismatch",
                    "enabled" if enabled else "disabled",
                    broker_admin.set_enabled_command(device_id, enabled),
                )
        # Broker entries without a device: deleted if the registry made them (its
        # marker), reported otherwise (another tool's clients are not ours to delete).
        for username in sorted(clients.keys() - known - skip):
            if clients[username].get("textname") == broker_admin.DEVICE_TEXTNAME and not is_reserved(
                username
            ):
                drift(username, "orphan_client", "deleted", {"command": "deleteClient", "username": username})
            else:
                report.unmanaged.append(f"client {username}")
        for role_name in sorted(roles.keys()):
            device_id = role_name[len(ROLE_PREFIX) :]
            if device_id in known or device_id in skip:
                continue
            if roles[role_name].get("textname") == broker_admin.DEVICE_TEXTNAME:
                drift(device_id, "orphan_role", "deleted", {"command": "deleteRole", "rolename": role_name})
            else:
                report.unmanaged.append(f"role {role_name}")
        if report.unmanaged:
            log.info(
                "%d device-like broker entries not made by the registry left alone (e.g. %s)",
                len(report.unmanaged),
                ", ".join(report.unmanaged[:3]),
            )
        if commands:
            for item in report.drift[:20]:
                log.warning("drift: device=%s %s → %s", item.device_id, item.kind, item.action)
            await self.broker.run(
                commands, tolerate=("Role already exists", "ACL with this topic already exists")
            )
            report.repair_commands = len(commands)
