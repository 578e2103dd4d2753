"""Devices: provisioning (single and bulk), listing, changes, disable/enable, rotation, deletion."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from sqlalchemy import Select, func, or_, select

from device_registry import provisioning
from device_registry.deps import CurrentAdmin, CurrentViewer, SessionDep, StateDep
from device_registry.models import Device
from device_registry.problems import PROBLEM_RESPONSES, Problem
from device_registry.schemas import (
    TAG_KEY_PATTERN,
    CredentialsRotate,
    CredentialsRotated,
    DeviceBulkCreate,
    DeviceBulkProvisioned,
    DeviceCreate,
    DevicePage,
    DeviceProvisioned,
    DeviceRead,
    DeviceUpdate,
)
from device_registry.state import RegistryState
from iotfleet.reserved_names import reserved_reason

router = APIRouter(prefix="/api/v1/devices", tags=["devices"], responses=PROBLEM_RESPONSES)

DeviceIdPath = Annotated[str, Path(max_length=64, description="The device id")]
_BROKER_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"description": "The broker refused"},
    503: {"description": "The broker is unreachable"},
}
_CHANGE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {},
    409: {
        "description": "Being changed by another request, or its broker entry was not made by the registry"
        " (broker-entry-not-managed: nothing changed)"
    },
    **_BROKER_ERRORS,
}


def _encode_cursor(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        decoded = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        if not decoded:
            raise ValueError("empty cursor")
        return decoded
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Problem(
            422,
            "cursor is not one this API returned; pass next_cursor unchanged",
            slug="validation",
            errors=[{"field": "query.cursor", "message": "invalid cursor", "type": "value_error"}],
        ) from None


def _tag_filter(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")

    if not sep or not re.fullmatch(TAG_KEY_PATTERN, key):
        raise Problem(
            422,
            f"tag filter {raw!r} must be key=value with a key of letters, digits, '_', '.', ':', '-'",
            slug="validation",
            errors=[{"field": "query.tag", "message": "expected key=value", "type": "value_error"}],
        )
    return key, value


def _refuse_service_client_ids(state: RegistryState, items: list[DeviceCreate], field: str) -> None:
    """422 for ids starting with a service client id this deployment configured (beyond the fixed list)."""
    configured = [state.settings.rules.client_id, state.settings.ingest.client_id or ""]
    errors = []
    for index, item in enumerate(items):
        reason = reserved_reason(item.id, extra=configured) if item.id else None
        if reason is not None:
            where = field.format(index=index)
            errors.append(
                {"field": where, "message": f"reserved device id: {reason}", "type": "reserved_name"}
            )
    if errors:
        raise Problem(
            422,
            "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]),
            slug="validation",
            title="Request validation failed",
            errors=errors[:100],
        )


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Provision a device: broker credentials (shown once) and ACLs",
    responses={
        409: {"description": "The id exists, or a broker entry under it was not made by the registry"},
        **_BROKER_ERRORS,
    },
)
async def create_device(
    body: DeviceCreate, state: StateDep, session: SessionDep, _caller: CurrentAdmin
) -> DeviceProvisioned:
    _refuse_service_client_ids(state, [body], "body.id")
    [created] = await provisioning.create_devices(state, session, [body])
    return created


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    summary="Provision up to 10,000 devices in one request (all or none)",
    responses={
        409: {"description": "Some ids exist or repeat, or have broker entries not made by the registry"},
        **_BROKER_ERRORS,
    },
)
async def create_devices_bulk(
    body: DeviceBulkCreate, state: StateDep, session: SessionDep, _caller: CurrentAdmin
) -> DeviceBulkProvisioned:
    _refuse_service_client_ids(state, body.devices, "body.devices.{index}.id")
    return DeviceBulkProvisioned(devices=await provisioning.create_devices(state, session, body.devices))


@router.get("", summary="List devices (filters combine with AND), cursor-paginated by id")
async def list_devices(  # noqa: PLR0917  (one parameter per query filter)
    session: SessionDep,
    _caller: CurrentViewer,
    type: Annotated[str | None, Query(max_length=32, description="Device type")] = None,
    online: Annotated[bool | None, Query(description="Only online (true) or offline (false) devices")] = None,
    enabled: Annotated[bool | None, Query()] = None,
    tag: Annotated[
        list[str] | None, Query(max_length=20, description="key=value, repeatable; all must match")
    ] = None,
    q: Annotated[str | None, Query(max_length=200, description="Substring of the id or name")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page")
    ] = None,
) -> DevicePage:
    stmt: Select[Any] = select(Device)
    if type is not None:
        stmt = stmt.where(Device.type == type)
    if online is not None:
        stmt = stmt.where(Device.online.is_(online))
    if enabled is not None:
        stmt = stmt.where(Device.enabled.is_(enabled))
    for raw in tag or []:
        key, value = _tag_filter(raw)
        stmt = stmt.where(Device.tags[key].as_string() == value)
    if q:
        pattern = _like(q)
        stmt = stmt.where(
            or_(
                func.lower(Device.id).like(pattern, escape="\\"),
                func.lower(Device.name).like(pattern, escape="\\"),
            )
        )
    if cursor:
        stmt = stmt.where(Device.id > _decode_cursor(cursor))
    rows = list((await session.scalars(stmt.order_by(Device.id).limit(limit + 1))).all())
    next_cursor = _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return DevicePage(items=[provisioning.device_read(d) for d in rows[:limit]], next_cursor=next_cursor)


@router.get("/{device_id}", summary="A device, with its presence", responses={404: {}})
async def get_device(device_id: DeviceIdPath, session: SessionDep, _caller: CurrentViewer) -> DeviceRead:
    return provisioning.device_read(await provisioning.get_device(session, device_id))


@router.patch("/{device_id}", summary="Change name, tags or metadata", responses={404: {}})
async def update_device(
    device_id: DeviceIdPath, body: DeviceUpdate, session: SessionDep, _caller: CurrentAdmin
) -> DeviceRead:
    device = await provisioning.get_device(session, device_id)
    changes = body.model_dump(exclude_unset=True)
    if "name" in changes:
        device.name = changes["name"]
    if "tags" in changes:
        device.tags = dict(changes["tags"] or {})
    if "metadata" in changes:
        device.meta = dict(changes["metadata"] or {})
    await session.commit()
    await session.refresh(device)
    return provisioning.device_read(device)


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a device: its broker credentials go and its connection is closed",
    responses=_CHANGE_ERRORS,
)
async def delete_device(
    device_id: DeviceIdPath, state: StateDep, session: SessionDep, _caller: CurrentAdmin
) -> None:
    await provisioning.delete_device(state, session, device_id)


@router.post(
    "/{device_id}/disable",
    summary="Disable: the live connection is closed and reconnects are refused",
    responses=_CHANGE_ERRORS,
)
async def disable_device(
    device_id: DeviceIdPath, state: StateDep, session: SessionDep, _caller: CurrentAdmin
) -> DeviceRead:
    return provisioning.device_read(await provisioning.set_enabled(state, session, device_id, False))


@router.post("/{device_id}/enable", summary="Enable again", responses=_CHANGE_ERRORS)
async def enable_device(
    device_id: DeviceIdPath, state: StateDep, session: SessionDep, _caller: CurrentAdmin
) -> DeviceRead:
    return provisioning.device_read(await provisioning.set_enabled(state, session, device_id, True))


@router.post(
    "/{device_id}/rotate-credentials",
    summary="New password (shown once); the old one stops working and the connection is closed",
    responses=_CHANGE_ERRORS,
)
async def rotate_credentials(
    device_id: DeviceIdPath,
    state: StateDep,
    session: SessionDep,
    _caller: CurrentAdmin,
    body: CredentialsRotate | None = None,
) -> CredentialsRotated:
    """A password device gets a new password; a certificate device a new certificate (from the body's
    CSR, or with a new key returned once), its old certificate revoked (CRL) and its session kicked."""
    return await provisioning.rotate_credentials(state, session, device_id, body.csr if body else None)
