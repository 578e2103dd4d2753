"""Device shadow: ``GET /api/v1/devices/{id}/state`` and ``PATCH …/state/desired``.

Viewers read, operators write. The PATCH body is a JSON merge patch
(``application/merge-patch+json`` or ``application/json``) validated against the
device type's state model (422 naming the field); ``If-Match: "<desired
version>"`` makes it conditional (412 if the desired state moved on); every
answer carries ``ETag: "<desired version>"``. A type without configurable state
answers 409. The delta goes to the device as a retained MQTT message
(device_registry/device_state.py); this router brings the shadow's runtime with
its lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response

from device_registry import device_state
from device_registry.deps import CurrentOperator, CurrentViewer, SessionDep
from device_registry.device_state import NoStateError, PatchError, ShadowService, VersionMismatch
from device_registry.models import Device
from device_registry.problems import PROBLEM_RESPONSES, NotFound, Problem
from device_registry.schemas_state import DesiredStateUpdate, DeviceStateRead, device_state_read

STATE_ATTR = "shadow"


@asynccontextmanager
async def shadow_lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.registry
    shadow = ShadowService(state.settings, state.sessions, state.registry)

    async def stop(_lost: bool) -> None:
        await shadow.stop()

    # Its MQTT session and publisher run in the lease holder only; a standby's API writes the
    # desired state (delta_pending), which the holder's publisher sends within RETRY_S.
    state.work.register("device shadow", shadow.start, stop)
    setattr(app.state, STATE_ATTR, shadow)
    try:
        yield
    finally:
        setattr(app.state, STATE_ATTR, None)
        if shadow.running:
            await shadow.stop()


def get_shadow(request: Request) -> ShadowService:
    shadow: ShadowService | None = getattr(request.app.state, STATE_ATTR, None)
    if shadow is None:
        raise Problem(503, "the device shadow is not running (registry starting or stopping)")
    return shadow


ShadowDep = Annotated[ShadowService, Depends(get_shadow)]
DeviceIdPath = Annotated[str, Path(max_length=64, description="The device id")]

router = APIRouter(
    prefix="/api/v1/devices", tags=["device state"], responses=PROBLEM_RESPONSES, lifespan=shadow_lifespan
)


async def _device_with_state(session: SessionDep, device_id: str) -> tuple[Device, dict[str, object]]:
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFound("device", device_id)
    try:
        model = device_state.state_model(device.type)
    except NoStateError as exc:
        raise Problem(409, str(exc), slug="no-state", title="No configurable state") from None
    return device, model.model_json_schema()


@router.get(
    "/{device_id}/state",
    summary="A device's desired and reported state, and the delta between them",
    responses={404: {}, 409: {"description": "The device's type has no configurable state"}},
)
async def get_state(
    device_id: DeviceIdPath, response: Response, session: SessionDep, _caller: CurrentViewer
) -> DeviceStateRead:
    device, schema = await _device_with_state(session, device_id)
    shadow = await device_state.read(session, device.id, device.type)
    response.headers["ETag"] = device_state.etag(shadow.desired_version)
    return device_state_read(shadow, schema)


@router.patch(
    "/{device_id}/state/desired",
    summary="Change a device's desired state (JSON merge patch; If-Match on the desired version)",
    responses={
        400: {"description": "Malformed If-Match"},
        404: {},
        409: {"description": "The device's type has no configurable state"},
        412: {"description": "If-Match names another desired version than the current one"},
        422: {"description": "The patch does not fit the type's state model"},
    },
)
async def patch_desired(  # noqa: PLR0917  (FastAPI injects each dependency)
    device_id: DeviceIdPath,
    body: DesiredStateUpdate,
    response: Response,
    session: SessionDep,
    caller: CurrentOperator,
    shadow: ShadowDep,
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            max_length=64,
            description='The desired version you read, e.g. "3" (its ETag); anything else is 400',
            # Documented, not enforced here: a malformed value is a 400 problem (parse_if_match).
            json_schema_extra={"pattern": '^(\\*|(W/)?"?[0-9]{1,12}"?)$'},
        ),
    ] = None,
) -> DeviceStateRead:
    device, schema = await _device_with_state(session, device_id)
    try:
        expected = device_state.parse_if_match(if_match)
    except ValueError as exc:
        raise Problem(400, str(exc), slug="bad-if-match") from None
    try:
        patch = device_state.validate_patch(device.type, body.root)
    except PatchError as exc:
        raise Problem(422, str(exc), slug="validation", errors=exc.errors) from None
    await session.close()  # the shadow writes in a transaction of its own
    try:
        updated = await shadow.patch_desired(
            device.id, device.type, patch, if_match=expected, source=f"operator:{caller.name}"
        )
    except VersionMismatch as exc:
        raise Problem(
            412,
            f"the desired state is at version {exc.current}, not {expected}: read it again and retry",
            slug="version-mismatch",
            title="Precondition Failed",
            headers={"ETag": device_state.etag(exc.current)},
            current_version=exc.current,
        ) from None
    except PatchError as exc:
        raise Problem(422, str(exc), slug="validation", errors=exc.errors) from None
    response.headers["ETag"] = device_state.etag(updated.desired_version)
    return device_state_read(updated, schema)
