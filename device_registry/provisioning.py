"""Device lifecycle against DB and broker together: create, disable/enable, rotate, delete.

A device's broker identity is one line of the broker's password file (username =
client id = device id), written by the broker agent; its ACL is the shared
pattern set of ``iotfleet.topics.DEVICE_ACL`` (no per-device ACL entries).
Order of every change: check against the DB, send the change to the agent with
no DB transaction open, then write and commit the DB change. If the agent or the
broker is away nothing is written and the caller gets a problem; if the process
dies between the agent's change and the commit, the next reconcile brings the
broker back to the DB (the system of record). Ids being changed are held in
``reconciler.busy``: a second request on the same id gets 409, and the reconcile
leaves them alone. Passwords are never stored: the DB keeps the password-file
hash (computed once here), so the agent's file can be rebuilt at any time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry import certificates, legacy_dynsec
from device_registry.agent_client import BrokerRefused
from device_registry.broker_admin import BrokerError, DynsecCommandError, ForeignEntryError
from device_registry.broker_log import Cause
from device_registry.models import Device, PresenceTransition, RevokedCertificate, utcnow
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
from iotfleet import broker_files, topics
from iotfleet.pki import IssuedCertificate
from iotfleet.reserved_names import is_reserved
from iotfleet.topics import Channel

log = logging.getLogger("registry.devices")

DEVICES_TABLE = cast(Table, Device.__table__)
IN_CHUNK = 1000  # ids per IN (...) clause: far below SQLite's and asyncpg's parameter limits


def device_topics(device: Device) -> DeviceTopics:
    return _topics(device.type, device.id)


def _topics(device_type: str, device_id: str) -> DeviceTopics:
    own = topics.device_topics(device_type, device_id)
    return DeviceTopics.model_construct(
        telemetry=own[Channel.TELEMETRY],
        status=own[Channel.STATUS],
        commands=own[Channel.COMMANDS],
        acks=own[Channel.ACKS],
        errors=own[Channel.ERRORS],
        state_delta=own[Channel.STATE_DELTA],
        state_reported=own[Channel.STATE_REPORTED],
    )


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
        auth=device.auth,
        certificate_not_after=device.cert_not_after,
    )


def credentials(device_id: str, password: str) -> DeviceCredentials:
    return DeviceCredentials(username=device_id, client_id=device_id, password=password)


def certificate_credentials(device_id: str, issued: IssuedCertificate) -> DeviceCredentials:
    return DeviceCredentials.model_construct(
        username=device_id,
        client_id=device_id,
        password=None,
        auth="certificate",
        certificate=issued.cert_pem,
        private_key=issued.key_pem,
        certificate_fingerprint=issued.fingerprint_sha256,
        certificate_not_after=issued.not_after,
    )


def _is_certificate(device: Device) -> bool:
    return device.auth == certificates.CERTIFICATE and device.cert_serial is not None


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


def _unavailable(exc: BrokerError | DynsecCommandError) -> Problem:
    if isinstance(exc, BrokerRefused | DynsecCommandError):
        return Problem(
            422,
            f"the broker refused the change, nothing was changed: {exc}",
            slug="broker-refused",
            title="Broker refused the change",
        )
    return BrokerUnavailable(f"the broker did not apply the change, nothing was changed: {exc}")


def _not_managed(exc: ForeignEntryError) -> Problem:
    return Problem(
        409,
        f"{exc}; the registry changes only broker entries it created (pick another device id)",
        slug="broker-entry-not-managed",
        title="Broker entry not made by the registry",
        device_ids=sorted(exc.device_ids)[:100],
    )


async def _refuse_foreign(state: RegistryState, ids: Sequence[str]) -> None:
    """Raise ForeignEntryError if dynsec holds a client under one of these ids that the registry did not make.

    Dynamic security answers before the device file, so such a client (a platform account,
    another tool's) would speak for the device: the registry neither provisions over it nor
    changes it. Without the admin link the check is skipped; reconcile reports it later.
    """
    if not state.broker.connected:
        return
    foreign = await state.broker.foreign_entries(ids, legacy_dynsec.TEXTNAME)
    if foreign:
        some = ", ".join(sorted(foreign)[:20])
        raise ForeignEntryError(list(foreign), f"the broker holds accounts not made by the registry: {some}")


async def _apply(
    state: RegistryState, upsert: Mapping[str, broker_files.DeviceEntry], remove: Sequence[str] = ()
) -> None:
    if not upsert and not remove:
        return
    try:
        await state.agent.apply(upsert, remove)
    except BrokerError:
        state.metrics.broker_changes.labels("failed").inc(len(upsert) + len(remove))
        raise
    state.metrics.broker_changes.labels("ok").inc(len(upsert) + len(remove))


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
    # while the broker agent works.
    await session.rollback()
    try:
        await _refuse_foreign(state, ids)
    except ForeignEntryError as exc:
        raise _not_managed(exc) from None
    except (BrokerError, DynsecCommandError) as exc:
        raise _unavailable(exc) from None
    # Password devices: a new random password each (its hash on file); certificate devices: a
    # certificate from the platform CA (its pinned fingerprint on file). Issuing is CPU work (~1 ms
    # each): off the event loop.
    wanted = [
        (device_id, item.csr)
        for device_id, item in zip(ids, items, strict=True)
        if item.auth == "certificate"
    ]
    issued_list = (
        await asyncio.to_thread(certificates.issue, state.pki, wanted, state.settings.tls.device_cert_days)
        if wanted
        else []
    )
    issued_by_id = {device_id: cert for (device_id, _), cert in zip(wanted, issued_list, strict=True)}
    passwords: list[str | None] = [
        None if device_id in issued_by_id else broker_files.new_device_password() for device_id in ids
    ]
    hashes = [
        broker_files.certificate_entry(issued_by_id[device_id].fingerprint_sha256)
        if password is None
        else broker_files.hash_password(password)
        for device_id, password in zip(ids, passwords, strict=True)
    ]
    state.reconciler.touch(ids)
    try:
        try:
            # Any entry the agent still has for these ids is a leftover of a crash
            # between an agent change and the DB commit: no device, no request owns
            # it, so the upsert replaces it.
            await _apply(
                state,
                {
                    device_id: broker_files.DeviceEntry(item.type, password_hash)
                    for device_id, item, password_hash in zip(ids, items, hashes, strict=True)
                },
            )
        except BrokerError as exc:
            await _undo(state, ids)
            raise _unavailable(exc) from None
        now = datetime.now(UTC)
        # Core executemany, not ORM objects: 10,000 ORM instances and their unit of
        # work cost seconds; the rows are plain values we validated already.
        rows = [
            {
                "id": device_id,
                "type": item.type,
                "name": item.name,
                "tags": dict(item.tags),
                "metadata": dict(item.metadata),
                "enabled": True,
                "online": False,
                "password_hash": password_hash,
                "auth": item.auth,
                "cert_serial": certificates.serial_hex(issued_by_id[device_id].serial)
                if device_id in issued_by_id
                else None,
                "cert_not_after": issued_by_id[device_id].not_after if device_id in issued_by_id else None,
                "credentials_rotated_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for device_id, item, password_hash in zip(ids, items, hashes, strict=True)
        ]
        try:
            # Broker first, DB second: if the process dies in between, the broker
            # entries are orphans the next reconcile removes.
            await session.execute(insert(DEVICES_TABLE), rows)
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
    # The values are ours and valid: construct the response models without re-validating
    # them (10,000 validated models cost seconds; FastAPI serializes them as declared).
    return [
        DeviceProvisioned.model_construct(
            id=device_id,
            type=item.type,
            name=item.name,
            tags=dict(item.tags),
            metadata=dict(item.metadata),
            enabled=True,
            online=False,
            last_seen=None,
            connected_since=None,
            credentials_rotated_at=now,
            created_at=now,
            updated_at=now,
            topics=_topics(item.type, device_id),
            auth=item.auth,
            certificate_not_after=issued_by_id[device_id].not_after if device_id in issued_by_id else None,
            credentials=certificate_credentials(device_id, issued_by_id[device_id])
            if password is None
            else DeviceCredentials.model_construct(
                username=device_id, client_id=device_id, password=password
            ),
        )
        for device_id, item, password in zip(ids, items, passwords, strict=True)
    ]


async def _undo(state: RegistryState, ids: Sequence[str]) -> None:
    """Best-effort removal of broker entries whose devices were not stored (reconcile catches the rest)."""
    try:
        await state.agent.apply({}, list(ids))
    except Exception as exc:
        log.warning("could not undo broker entries of %d device(s) (%s); reconcile will", len(ids), exc)


async def _broker_change(
    state: RegistryState,
    session: AsyncSession,
    device_id: str,
    upsert: Mapping[str, broker_files.DeviceEntry],
    remove: Sequence[str] = (),
    *,
    legacy: bool = False,
) -> None:
    """Apply a device's broker change with no DB transaction open (the caller commits after).

    ``legacy``: the device may still have a dynsec client from before the device
    file (no stored hash): delete it too, or dynsec would keep letting it in.
    """
    if device_id in state.reconciler.busy:
        raise Conflict(f"device {device_id!r} is being changed by another request; retry")
    await session.rollback()  # end the read transaction: the broker may take a while
    state.reconciler.touch([device_id])
    try:
        await _refuse_foreign(state, [device_id])
        if legacy:
            # A device provisioned before the device file: its dynsec client goes too.
            try:
                await legacy_dynsec.remove(state.broker, [device_id])
            except (BrokerError, DynsecCommandError):
                state.metrics.dynsec_commands.labels("failed").inc(2)
                raise
            state.metrics.dynsec_commands.labels("ok").inc(2)
        await _apply(state, upsert, remove)
    except ForeignEntryError as exc:
        state.reconciler.release([device_id])
        raise _not_managed(exc) from None
    except (BrokerError, DynsecCommandError) as exc:
        state.reconciler.release([device_id])
        raise _unavailable(exc) from None


async def _certificate_change(
    state: RegistryState,
    session: AsyncSession,
    device_id: str,
    upsert: Mapping[str, broker_files.DeviceEntry],
    remove: Sequence[str] = (),
    *,
    revoke: int | None = None,
    reinstate: int | None = None,
) -> None:
    """A certificate device's broker change: the CRL first (the agent's SIGHUP loads it), then the agent.

    If the agent's change fails, the CRL is rebuilt from the DB (it never says more than the DB).
    """
    if device_id in state.reconciler.busy:
        raise Conflict(f"device {device_id!r} is being changed by another request; retry")
    pending = state.crl_pending
    if revoke is not None:
        pending.add[device_id] = (revoke, utcnow())
    if reinstate is not None:
        pending.drop[device_id] = reinstate
    # The caller settles the pending entry once the DB holds the change (or it failed).
    try:
        await certificates.write_crl(state.pki, session, pending)
        await _broker_change(state, session, device_id, upsert, remove)
    except BaseException:
        pending.settle(device_id)
        await certificates.rebuild_crl(state.pki, session, pending)
        raise


async def set_enabled(state: RegistryState, session: AsyncSession, device_id: str, enabled: bool) -> Device:
    device = await get_device(session, device_id)
    if _is_certificate(device) and device.password_hash is not None:
        # Disabling holds the certificate (on the CRL, entry removed: kicked); enabling takes it off.
        serial = int(str(device.cert_serial), 16)
        if enabled:
            entry = broker_files.DeviceEntry(device.type, device.password_hash)
            await _certificate_change(state, session, device_id, {device_id: entry}, reinstate=serial)
        else:
            await _certificate_change(state, session, device_id, {}, [device_id], revoke=serial)
    elif enabled:
        if device.password_hash is None:
            raise Conflict(
                f"device {device_id!r} has no broker credentials stored (made before they were kept);"
                " rotate its credentials to enable it"
            )
        entry = broker_files.DeviceEntry(device.type, device.password_hash)
        await _broker_change(state, session, device_id, {device_id: entry})
    else:
        # Removing the entry and reloading kicks the live connection and refuses reconnects.
        await _broker_change(state, session, device_id, {}, [device_id], legacy=device.password_hash is None)
    try:
        device = await get_device(session, device_id)
        device.enabled = enabled
        kicked_at = None
        if not enabled and device.online:
            # The broker's "kicked" log line will find it offline already: record the transition here.
            kicked_at = utcnow()
            session.add(
                PresenceTransition(device_id=device_id, at=kicked_at, online=False, cause=Cause.kicked.value)
            )
            device.online = False
            device.connected_since = None
        await session.commit()
        if kicked_at is not None:
            state.presence.announce(device.type, device_id, False, Cause.kicked.value, kicked_at.timestamp())
    finally:
        state.reconciler.release([device_id])
        state.crl_pending.settle(device_id)
    log.info("device %s %s", device_id, "enabled" if enabled else "disabled (kicked)")
    await session.refresh(device)
    return device


async def rotate_certificate(
    state: RegistryState, session: AsyncSession, device: Device, csr: str | None
) -> CredentialsRotated:
    """A new certificate (from ``csr`` or a new key); the old one is revoked and its session kicked."""
    device_id = device.id
    [issued] = await asyncio.to_thread(
        certificates.issue, state.pki, [(device_id, csr)], state.settings.tls.device_cert_days
    )
    old_serial, old_not_after = device.cert_serial, device.cert_not_after
    entry_hash = broker_files.certificate_entry(issued.fingerprint_sha256)
    revoke = int(old_serial, 16) if old_serial else None
    if device.enabled:
        entry = broker_files.DeviceEntry(device.type, entry_hash)
        await _certificate_change(state, session, device_id, {device_id: entry}, revoke=revoke)
    else:
        await _certificate_change(state, session, device_id, {}, revoke=revoke)
    try:
        device = await get_device(session, device_id)
        device.password_hash = entry_hash
        device.cert_serial = certificates.serial_hex(issued.serial)
        device.cert_not_after = issued.not_after
        device.credentials_rotated_at = datetime.now(UTC)
        if old_serial and old_not_after is not None:
            session.add(
                RevokedCertificate(
                    serial=old_serial, device_id=device_id, revoked_at=utcnow(), not_after=old_not_after
                )
            )
        await session.commit()
    finally:
        state.reconciler.release([device_id])
        state.crl_pending.settle(device_id)
    state.metrics.credentials_rotated.inc()
    log.info("device %s certificate rotated (old one revoked, kicked)", device_id)
    return CredentialsRotated(
        id=device_id,
        credentials=certificate_credentials(device_id, issued),
        credentials_rotated_at=device.credentials_rotated_at,
    )


async def rotate_credentials(
    state: RegistryState, session: AsyncSession, device_id: str, csr: str | None = None
) -> CredentialsRotated:
    device = await get_device(session, device_id)
    if _is_certificate(device):
        return await rotate_certificate(state, session, device, csr)
    if csr is not None:
        raise Problem(
            422,
            f"device {device_id!r} authenticates with a password: a CSR is only accepted for certificate devices",
            slug="csr-for-password-device",
            title="CSR for a password device",
        )
    password = broker_files.new_device_password()
    password_hash = broker_files.hash_password(password)
    legacy = device.password_hash is None
    if device.enabled:
        # The reload re-checks every live session's password against the file:
        # the device's connection made with the old password is closed.
        entry = broker_files.DeviceEntry(device.type, password_hash)
        await _broker_change(state, session, device_id, {device_id: entry}, legacy=legacy)
    else:
        # Takes the busy mark; the entry stays absent while disabled.
        await _broker_change(state, session, device_id, {}, legacy=legacy)
    try:
        device = await get_device(session, device_id)
        device.password_hash = password_hash
        device.credentials_rotated_at = datetime.now(UTC)
        await session.commit()
    finally:
        state.reconciler.release([device_id])
        state.crl_pending.settle(device_id)
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
    legacy = device.password_hash is None
    revoked: RevokedCertificate | None = None
    if _is_certificate(device) and device.cert_not_after is not None:
        serial = str(device.cert_serial)
        revoked = RevokedCertificate(
            serial=serial, device_id=device_id, revoked_at=utcnow(), not_after=device.cert_not_after
        )
        await _certificate_change(state, session, device_id, {}, [device_id], revoke=int(serial, 16))
    else:
        await _broker_change(state, session, device_id, {}, [device_id], legacy=legacy)
    try:
        current = await session.get(Device, device_id)
        if current is not None:
            await session.delete(current)
            if revoked is not None:
                session.add(revoked)
            await session.commit()
            state.presence.forget(current.type, device_id)
    finally:
        state.reconciler.release([device_id])
        state.crl_pending.settle(device_id)
    state.metrics.devices_deleted.inc()
    log.info("device %s deleted (kicked)", device_id)
