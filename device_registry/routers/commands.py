"""Commands: operators send them to devices; everyone with a key follows their lifecycle.

``POST /api/v1/devices/{id}/commands`` validates the command against the
device type's command model (422 naming the argument), records it ``queued``
and publishes it (QoS 1, correlation data = id, response topic = the device's
acks topic, message expiry = TTL); the tracker moves it to ``sent`` on the
broker's PUBACK and on with the device's acks, or to ``expired``. An
``Idempotency-Key`` header makes retries safe: the same key for the same
device returns the first command (200) instead of sending a second one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response, status
from pydantic import ValidationError
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.exc import IntegrityError

from device_registry.command_tracker import new_command_id
from device_registry.deps import CurrentOperator, CurrentViewer, SessionDep, SettingsDep
from device_registry.models import Device
from device_registry.models_rules import CommandRow, CommandStatus
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound, Problem
from device_registry.rules_runtime import TrackerDep, tracker_lifespan
from device_registry.schemas_rules import (
    CommandCreate,
    CommandPage,
    CommandRead,
    command_read,
    decode_cursor,
    encode_cursor,
)
from iotfleet.catalogue import get_device_type

router = APIRouter(tags=["commands"], responses=PROBLEM_RESPONSES, lifespan=tracker_lifespan)

DeviceIdPath = Annotated[str, Path(max_length=64, description="The device id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Retry-safe sends: the same key for the same device returns the first command",
    ),
]


def _args_problem(name: str, exc: ValidationError, field: str = "body") -> Problem:
    errors = [
        {
            "field": ".".join([field, "args", *(str(p) for p in err["loc"])]),
            "message": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(422, f"invalid arguments for {name!r}: {summary}", slug="validation", errors=errors)


def validated_args(type_name: str, name: str, args: dict[str, Any], *, field: str = "body") -> dict[str, Any]:
    """The command's arguments validated by the type's catalogue model (as JSON); 422 problem otherwise.

    The one check of operator commands: the single-device endpoint and jobs (``field``
    names where the command sits in the request, for the error's ``field``).
    """
    device_type = get_device_type(type_name)
    if name not in device_type.commands:
        raise Problem(
            422,
            f"{type_name} has no command {name!r} (commands: {', '.join(device_type.commands)})",
            slug="validation",
            errors=[{"field": f"{field}.name", "message": "unknown command", "type": "value_error"}],
        )
    try:
        return device_type.validate_command(name, args).model_dump(mode="json")
    except ValidationError as exc:
        raise _args_problem(name, exc, field) from None


@router.post(
    "/api/v1/devices/{device_id}/commands",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a command to a device (validated; tracked queued → sent → delivered → succeeded/failed)",
    responses={
        200: {"description": "Idempotent replay: the command first sent with this Idempotency-Key"},
        404: {},
        409: {"description": "The device is disabled, or the key was used for another command"},
    },
)
async def send_command(  # noqa: PLR0917  (FastAPI injects each dependency)
    device_id: DeviceIdPath,
    body: CommandCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    caller: CurrentOperator,
    tracker: TrackerDep,
    idempotency_key: IdempotencyKey = None,
) -> CommandRead:
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFound("device", device_id)
    if idempotency_key is not None:
        existing = await session.scalar(
            select(CommandRow).where(
                CommandRow.device_id == device_id, CommandRow.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            return _replay(existing, body, response)
    if not device.enabled:
        raise Conflict(f"device {device_id!r} is disabled; enable it before sending commands")
    args = validated_args(device.type, body.name, body.args)
    ttl_s = body.ttl_s or settings.rules.command_ttl_s
    created = datetime.now(UTC)
    row = CommandRow(
        id=new_command_id(),
        device_id=device.id,
        device_type=device.type,
        name=body.name,
        args=args,
        status=CommandStatus.queued.value,
        source=f"operator:{caller.name}",
        requested_by=caller.name,
        idempotency_key=idempotency_key,
        ttl_s=ttl_s,
        created_at=created,
        expires_at=created + timedelta(seconds=ttl_s),
    )
    session.add(row)
    try:
        await session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        await session.rollback()
        existing = await session.scalar(
            select(CommandRow).where(
                CommandRow.device_id == device_id, CommandRow.idempotency_key == idempotency_key
            )
        )
        if existing is None:
            raise
        return _replay(existing, body, response)
    # Recorded first, published second: a crash in between leaves it queued, and the
    # tracker republishes queued commands when it (re)connects. On a standby replica (the
    # tracker runs in the lease holder) this publishes nothing: the holder's tracker finds
    # the queued row within a second (CommandTracker.publish_outbox) and publishes it.
    tracker.publish_command(row)
    return command_read(row)


def _replay(existing: CommandRow, body: CommandCreate, response: Response) -> CommandRead:
    if existing.name != body.name or existing.args != body.args:
        raise Conflict(
            "this Idempotency-Key was used for a different command on this device",
            command_id=existing.id,
        )
    response.status_code = status.HTTP_200_OK
    return command_read(existing)


StatusFilter = Annotated[
    CommandStatus | None, Query(description="queued, sent, delivered, succeeded, failed or expired")
]


async def _page(session: SessionDep, stmt: Select[Any], limit: int, cursor: str | None) -> CommandPage:
    if cursor:
        created, command_id = decode_cursor(cursor, 2)
        try:
            moment = datetime.fromisoformat(created)
        except ValueError:
            decode_cursor("!", 2)  # raises the standard invalid-cursor problem
            raise
        stmt = stmt.where(
            or_(
                CommandRow.created_at < moment,
                and_(CommandRow.created_at == moment, CommandRow.id < command_id),
            )
        )
    stmt = stmt.order_by(CommandRow.created_at.desc(), CommandRow.id.desc()).limit(limit + 1)
    rows = list((await session.scalars(stmt)).all())
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last.created_at.isoformat(), last.id)
    return CommandPage(items=[command_read(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get(
    "/api/v1/devices/{device_id}/commands",
    summary="A device's commands, newest first (cursor-paginated)",
    responses={404: {}},
)
async def list_device_commands(
    device_id: DeviceIdPath,
    session: SessionDep,
    _caller: CurrentViewer,
    status_: Annotated[StatusFilter, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> CommandPage:
    if await session.get(Device, device_id) is None:
        raise NotFound("device", device_id)
    stmt: Select[Any] = select(CommandRow).where(CommandRow.device_id == device_id)
    if status_ is not None:
        stmt = stmt.where(CommandRow.status == status_.value)
    return await _page(session, stmt, limit, cursor)


@router.get("/api/v1/commands", summary="All commands, newest first (cursor-paginated)")
async def list_commands(
    session: SessionDep,
    _caller: CurrentViewer,
    status_: Annotated[StatusFilter, Query(alias="status")] = None,
    rule_id: Annotated[str | None, Query(max_length=36)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> CommandPage:
    stmt: Select[Any] = select(CommandRow)
    if status_ is not None:
        stmt = stmt.where(CommandRow.status == status_.value)
    if rule_id is not None:
        stmt = stmt.where(CommandRow.rule_id == rule_id)
    return await _page(session, stmt, limit, cursor)


@router.get(
    "/api/v1/commands/{command_id}", summary="A command and where it is in its lifecycle", responses={404: {}}
)
async def get_command(
    command_id: Annotated[str, Path(max_length=64)], session: SessionDep, _caller: CurrentViewer
) -> CommandRead:
    row = await session.get(CommandRow, command_id)
    if row is None:
        raise NotFound("command", command_id)
    return command_read(row)
