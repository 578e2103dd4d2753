"""Device lifecycle against DB and broker together: create, disable/enable, rotate, delete.

Order of every change: check against the DB, apply the dynsec commands with no
DB transaction open (the broker can take minutes for a bulk request, and an
open SQLite write transaction would block every other writer meanwhile), then
write and commit the DB change. If the broker refuses or is away, nothing is
written and the caller gets a problem; if the process dies between the broker
change and the commit, the reconcile at the next start brings the broker back
to the DB (the system of record). Ids being changed are held in
``reconciler.busy``: a second request on the same id gets 409, and the
reconcile leaves them alone. Passwords are never stored by the registry:
dynsec keeps only its PBKDF2 hash.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry import broker_admin
from device_registry.broker_admin import BrokerError, DynsecCommandError, ForeignEntryError
from device_registry.broker_log import Cause
from device_registry.models import Device, PresenceTransition, utcnow
from device_registry.problems import BrokerUnavailable, Conflict, NotFound, Problem
from device_registry.schemas import (
    CredentialsRotated,
    DeviceCreate,
    DeviceCredentials,
    DeviceProvisioned,
    DeviceRead,
    DeviceTopics,
)
from device_registry.state import RegistryState
from iotfleet import topics
from iotfleet.reserved_names import is_reserved
from iotfleet.topics import Channel

log = logging.getLogger("registry.devices")

IN_CHUNK = 1000  # ids per IN (...) clause: far below SQLite's and asyncpg's parameter limits


def device_topics(device: Device) -> DeviceTopics:
    return DeviceTopics(**{ch.value: topics.device_topic(device.type, device.id, ch) for ch in Channel})


def device_read(device: Device) -> DeviceRead:
    return DeviceRead(
        id=device.id,
        type=device.type,
        name=device.name,
        tags=device.tags or {},
        metadata=device.meta or {},
        enabled=device.enabled,
        online=device.online,
        last_seen=device.last_seen,
        connected_since=device.connected_since,
        credentials_rotated_at=device.credentials_rotated_at,
        created_at=device.created_at,
        updated_at=device.updated_at,
        topics=device_topics(device),
    )


def credentials(device_id: str, password: str) -> DeviceCredentials:
    return DeviceCredentials(username=device_id, client_id=device_id, password=password)


def generate_id(device_type: str) -> str:
    return f"{device_type.replace('_', '-')}-{secrets.token_hex(6)}"


async def get_device(session: AsyncSession, device_id: str) -> Device:
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFound("device", device_id)
    return device


async def _existing_ids(session: AsyncSession, ids: Sequence[str]) -> list[str]:
    found: list[str] = []
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        found.extend((await session.scalars(select(Device.id).where(Device.id.in_(chunk)))).all())
    return found


def _unavailable(exc: Exception) -> Problem:
    if isinstance(exc, BrokerError):
        return BrokerUnavailable(f"the broker did not apply the change, nothing was changed: {exc}")
    return Problem(
        502,
        f"the broker refused the change, nothing was changed: {exc}",
        slug="broker-refused",
        title="Broker refused the change",
    )


def _not_managed(exc: ForeignEntryError) -> Problem:
    return Problem(
        409,
        f"{exc}; the registry changes only broker entries it created (pick another device id)",
        slug="broker-entry-not-managed",
        title="Broker entry not made by the registry",
        device_ids=sorted(exc.device_ids)[:100],
    )


async def _apply(
    state: RegistryState, commands: list[dict[str, Any]], *, tolerate: Sequence[str] = ()
) -> None:
    try:
        await state.broker.run(commands, tolerate=tolerate)
    except (BrokerError, DynsecCommandError):
        state.metrics.dynsec_commands.labels("failed").inc(len(commands))
        raise
    state.metrics.dynsec_commands.labels("ok").inc(len(commands))


async def create_devices(
    state: RegistryState, session: AsyncSession, items: Sequence[DeviceCreate]
) -> list[DeviceProvisioned]:
    ids = [item.id or generate_id(item.type) for item in items]
    duplicates = sorted(device_id for device_id, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise Conflict(
            f"device ids repeated in the request: {', '.join(duplicates[:20])}",
            conflicting_ids=duplicates[:100],
        )
    in_progress = sorted(state.reconciler.busy.intersection(ids))
    if in_progress:
        raise Conflict(
            f"device id(s) being changed by another request: {', '.join(in_progress[:20])}",
            conflicting_ids=in_progress[:100],
        )
    existing = await _existing_ids(session, ids)
    if existing:
        raise Conflict(
            f"{len(existing)} device id(s) already exist: {', '.join(sorted(existing)[:20])}",
            conflicting_ids=sorted(existing)[:100],
        )
    # Close the read transaction: nothing may hold the DB (SQLite: the whole file)
    # while the broker works, which takes minutes for a large bulk request.
    await session.rollback()
    passwords = [broker_admin.new_device_password() for _ in ids]
    commands = [
        cmd
        for device_id, item, password in zip(ids, items, passwords, strict=True)
        for cmd in broker_admin.create_device_commands(item.type, device_id, password)
    ]
    state.reconciler.touch(ids)
    try:
        await _create_on_broker(state, ids, commands)
        now = datetime.now(UTC)
        rows = [
            Device(
                id=device_id,
                type=item.type,
                name=item.name,
                tags=dict(item.tags),
                meta=dict(item.metadata),
                enabled=True,
                online=False,
                credentials_rotated_at=now,
                created_at=now,
                updated_at=now,
            )
            for device_id, item in zip(ids, items, strict=True)
        ]
        session.add_all(rows)
        try:
            # Broker first, DB second: if the process dies in between, the broker
            # entries (marked as the registry's) are orphans the next reconcile deletes.
            await session.commit()
        except IntegrityError:
            await session.rollback()
            await _undo(state, ids)
            raise Conflict("a device with one of these ids was created concurrently; retry") from None
        except BaseException:
            await session.rollback()
            await _undo(state, ids)
            raise
    finally:
        state.reconciler.release(ids)
    state.metrics.devices_provisioned.inc(len(rows))
    log.info("provisioned %d device(s)%s", len(rows), f": {ids[0]}" if len(ids) == 1 else "")
    return [
        DeviceProvisioned(**device_read(row).model_dump(), credentials=credentials(row.id, password))
        for row, password in zip(rows, passwords, strict=True)
    ]


async def _create_on_broker(state: RegistryState, ids: Sequence[str], commands: list[dict[str, Any]]) -> None:
    try:
        try:
            await _apply(state, commands)
        except DynsecCommandError as exc:
            if "already exists" not in exc.error:
                raise
            # Leftovers of a crash between a broker change and the DB commit (not
            # yet reconciled): these ids have no device and no request working on
            # them, so the entries belong to nobody. Replace them, but only if the
            # registry made them: another tool's (or the platform's) are never touched.
            foreign = await state.broker.foreign_entries(ids)
            if foreign:
                some = ", ".join(f"{i} ({what})" for i, what in sorted(foreign.items())[:20])
                raise ForeignEntryError(
                    list(foreign), f"the broker holds entries not made by the registry: {some}"
                ) from None
            log.warning("replacing stale broker entries for %d device id(s)", len(ids))
            cleanup = [cmd for device_id in ids for cmd in broker_admin.delete_device_commands(device_id)]
            await _apply(state, cleanup, tolerate=broker_admin.NOT_FOUND_ERRORS)
            await _apply(state, commands)
    except ForeignEntryError as exc:
        await _undo(state, [i for i in ids if i not in exc.device_ids])
        raise _not_managed(exc) from None
    except (BrokerError, DynsecCommandError) as exc:
        await _undo(state, ids)
        raise _unavailable(exc) from None
    except BaseException:
        await _undo(state, ids)
        raise


async def _undo(state: RegistryState, ids: Sequence[str]) -> None:
    """Best-effort removal of broker entries whose devices were not stored (reconcile catches the rest)."""
    try:
        cleanup = [cmd for device_id in ids for cmd in broker_admin.delete_device_commands(device_id)]
        await state.broker.run(cleanup, tolerate=broker_admin.NOT_FOUND_ERRORS)
    except Exception as exc:
        log.warning("could not undo broker entries of %d device(s) (%s); reconcile will", len(ids), exc)


async def _broker_change(
    state: RegistryState,
    session: AsyncSession,
    device_id: str,
    commands: list[dict[str, Any]],
    *,
    tolerate: Sequence[str] = (),
) -> None:
    """Apply a device's broker change with no DB transaction open (the caller commits after)."""
    if device_id in state.reconciler.busy:
        raise Conflict(f"device {device_id!r} is being changed by another request; retry")
    await session.rollback()  # end the read transaction: the broker may take a while
    state.reconciler.touch([device_id])
    try:
        foreign = await state.broker.foreign_entries([device_id])
        if foreign:
            raise ForeignEntryError(
                [device_id], f"the broker {foreign[device_id]} {device_id!r} was not made by the registry"
            )
        await _apply(state, commands, tolerate=tolerate)
    except ForeignEntryError as exc:
        state.reconciler.release([device_id])
        raise _not_managed(exc) from None
    except (BrokerError, DynsecCommandError) as exc:
        state.reconciler.release([device_id])
        raise _unavailable(exc) from None


async def set_enabled(state: RegistryState, session: AsyncSession, device_id: str, enabled: bool) -> Device:
    await get_device(session, device_id)
    # disableClient kicks the live connection at once and refuses reconnects.
    await _broker_change(state, session, device_id, [broker_admin.set_enabled_command(device_id, enabled)])
    try:
        device = await get_device(session, device_id)
        device.enabled = enabled
        if not enabled and device.online:
            # The broker's "kicked" log line will find it offline already: record the transition here.
            session.add(
                PresenceTransition(device_id=device_id, at=utcnow(), online=False, cause=Cause.kicked.value)
            )
            device.online = False
            device.connected_since = None
        await session.commit()
    finally:
        state.reconciler.release([device_id])
    log.info("device %s %s", device_id, "enabled" if enabled else "disabled (kicked)")
    await session.refresh(device)
    return device


async def rotate_credentials(
    state: RegistryState, session: AsyncSession, device_id: str
) -> CredentialsRotated:
    device = await get_device(session, device_id)
    password = broker_admin.new_device_password()
    commands = [broker_admin.set_password_command(device_id, password)]
    if device.enabled:
        # setClientPassword alone leaves the live session up (Mosquitto 2.0):
        # a disable/enable pair kicks it, so the old password stops working now.
        commands += [
            broker_admin.set_enabled_command(device_id, False),
            broker_admin.set_enabled_command(device_id, True),
        ]
    await _broker_change(state, session, device_id, commands)
    try:
        device = await get_device(session, device_id)
        device.credentials_rotated_at = datetime.now(UTC)
        await session.commit()
    finally:
        state.reconciler.release([device_id])
    state.metrics.credentials_rotated.inc()
    log.info("device %s credentials rotated (kicked)", device_id)
    return CredentialsRotated(
        id=device_id,
        credentials=credentials(device_id, password),
        credentials_rotated_at=device.credentials_rotated_at,
    )


async def delete_device(state: RegistryState, session: AsyncSession, device_id: str) -> None:
    device = await get_device(session, device_id)
    if is_reserved(device_id):
        # A row an older registry let in under a platform name: its broker entry is
        # the platform's, not the device's. Drop the row, leave the broker alone.
        await session.delete(device)
        await session.commit()
        log.warning(
            "device %s (reserved name) deleted from the DB only; its broker entry was left alone", device_id
        )
        return
    await _broker_change(
        state,
        session,
        device_id,
        broker_admin.delete_device_commands(device_id),
        tolerate=broker_admin.NOT_FOUND_ERRORS,
    )
    try:
        current = await session.get(Device, device_id)
        if current is not None:
            await session.delete(current)
            await session.commit()
    finally:
        state.reconciler.release([device_id])
    state.metrics.devices_deleted.inc()
    log.info("device %s deleted (kicked)", device_id)
