"""Notification channels (webhooks, e-mail) and their delivery log.

Admins create and delete channels; the webhook secret is returned once, at creation.
Viewers list channels and read each delivery with its attempts (status codes, errors).
Operators may send a test notification through a channel. What is sent, when, and the
signature: ``device_registry/notifications.py`` and the README's "Alert notifications".
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status
from sqlalchemy import Select, and_, or_, select

from device_registry.deps import CurrentAdmin, CurrentOperator, CurrentViewer, SessionDep, SettingsDep
from device_registry.models_notifications import (
    AttemptRow,
    ChannelKind,
    ChannelRow,
    DeliveryRow,
    DeliveryStatus,
    Transition,
)
from device_registry.notifications import SIGNATURE_HEADER, delivery_id, new_secret
from device_registry.notifications_runtime import sender_lifespan, wake_sender
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound
from device_registry.schemas_notifications import (
    AttemptRead,
    ChannelCreate,
    ChannelCreated,
    ChannelPage,
    ChannelRead,
    ChannelRoute,
    DeliveryPage,
    DeliveryRead,
    TestNotification,
    TestResult,
)
from device_registry.schemas_rules import decode_cursor, encode_cursor

router = APIRouter(
    prefix="/api/v1/channels", tags=["notifications"], responses=PROBLEM_RESPONSES, lifespan=sender_lifespan
)

ChannelNamePath = Annotated[str, Path(max_length=64, description="The channel's name")]


def _read(row: ChannelRow) -> ChannelRead:
    return ChannelRead(
        id=row.id,
        name=row.name,
        kind=ChannelKind(row.kind),
        url=row.url,
        recipients=list(row.recipients or []),
        route=ChannelRoute.model_validate(row.route) if row.route else None,
        enabled=row.enabled,
        created_by=row.created_by,
        created_at=row.created_at,
        signature_header=SIGNATURE_HEADER if row.kind == ChannelKind.webhook.value else None,
    )


async def _channel(session: SessionDep, name: str) -> ChannelRow:
    row = await session.scalar(select(ChannelRow).where(ChannelRow.name == name))
    if row is None:
        raise NotFound("channel", name)
    return row


@router.get("", summary="Notification channels, by name (secrets are never listed)")
async def list_channels(session: SessionDep, _caller: CurrentViewer) -> ChannelPage:
    rows = (await session.scalars(select(ChannelRow).order_by(ChannelRow.name))).all()
    return ChannelPage(items=[_read(r) for r in rows])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a channel; a webhook's signing secret is shown once, in this answer",
    responses={409: {"description": "The name is taken, or e-mail without an SMTP server configured"}},
)
async def create_channel(
    body: ChannelCreate, session: SessionDep, settings: SettingsDep, caller: CurrentAdmin
) -> ChannelCreated:
    if body.kind is ChannelKind.email and not settings.notifications.smtp_host:
        raise Conflict(
            "e-mail channels need an SMTP server: set IOTFLEET_NOTIFICATIONS__SMTP_HOST (and __SMTP_PORT)"
        )
    if await session.scalar(select(ChannelRow.id).where(ChannelRow.name == body.name)) is not None:
        raise Conflict(f"a channel named {body.name!r} exists")
    secret = new_secret() if body.kind is ChannelKind.webhook else None
    row = ChannelRow(
        id=str(uuid.uuid4()),
        name=body.name,
        kind=body.kind.value,
        url=str(body.url) if body.url is not None else None,
        recipients=list(body.recipients),
        secret=secret,
        route=body.route.model_dump() if body.route is not None else None,
        enabled=body.enabled,
        created_by=caller.name,
        created_at=datetime.now(UTC),
    )
    session.add(row)
    await session.commit()
    return ChannelCreated(**_read(row).model_dump(), secret=secret)


@router.get("/{name}", summary="A channel (without its secret)", responses={404: {}})
async def get_channel(name: ChannelNamePath, session: SessionDep, _caller: CurrentViewer) -> ChannelRead:
    return _read(await _channel(session, name))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a channel with its pending deliveries and its delivery log",
    responses={404: {}},
)
async def delete_channel(name: ChannelNamePath, session: SessionDep, _caller: CurrentAdmin) -> None:
    await session.delete(await _channel(session, name))
    await session.commit()


@router.get(
    "/{name}/deliveries",
    summary="The channel's deliveries, newest first, each with its latest attempts (cursor-paginated)",
    responses={404: {}},
)
async def list_deliveries(  # noqa: PLR0917  (one parameter per filter)
    name: ChannelNamePath,
    session: SessionDep,
    _caller: CurrentViewer,
    status: Annotated[DeliveryStatus | None, Query(description="pending, delivered or failed")] = None,
    alert_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> DeliveryPage:
    channel = await _channel(session, name)
    stmt: Select[Any] = select(DeliveryRow).where(DeliveryRow.channel_id == channel.id)
    if status is not None:
        stmt = stmt.where(DeliveryRow.status == status.value)
    if alert_id is not None:
        stmt = stmt.where(DeliveryRow.alert_id == alert_id)
    if cursor:
        created, last_id = decode_cursor(cursor, 2)
        try:
            moment = datetime.fromisoformat(created)
        except ValueError:
            decode_cursor("!", 2)  # raises the standard invalid-cursor problem
            raise
        stmt = stmt.where(
            or_(
                DeliveryRow.created_at < moment,
                and_(DeliveryRow.created_at == moment, DeliveryRow.id < last_id),
            )
        )
    rows = list(
        (
            await session.scalars(
                stmt.order_by(DeliveryRow.created_at.desc(), DeliveryRow.id.desc()).limit(limit + 1)
            )
        ).all()
    )
    page = rows[:limit]
    log: dict[str, list[AttemptRead]] = {row.id: [] for row in page}
    if page:
        attempts = await session.scalars(
            select(AttemptRow).where(AttemptRow.delivery_id.in_(list(log))).order_by(AttemptRow.id.desc())
        )
        for attempt in attempts:
            log[attempt.delivery_id].append(
                AttemptRead(
                    at=attempt.at,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    duration_ms=attempt.duration_ms,
                )
            )
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last.created_at.isoformat(), last.id)
    return DeliveryPage(
        items=[
            DeliveryRead(
                id=row.id,
                channel=channel.name,
                alert_id=row.alert_id,
                transition=Transition(row.transition),
                status=DeliveryStatus(row.status),
                attempts=row.attempts,
                next_attempt_at=row.next_attempt_at if row.status == DeliveryStatus.pending.value else None,
                last_status_code=row.last_status_code,
                last_error=row.last_error,
                created_at=row.created_at,
                delivered_at=row.delivered_at,
                log=log[row.id],
            )
            for row in page
        ],
        next_cursor=next_cursor,
    )


@router.post(
    "/{name}/test",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a test notification through the channel (event alert.test); see its delivery log",
    responses={404: {}},
)
async def test_channel(
    name: ChannelNamePath,
    request: Request,
    session: SessionDep,
    caller: CurrentOperator,
    body: TestNotification | None = None,
) -> TestResult:
    channel = await _channel(session, name)
    spec = body or TestNotification()
    at = datetime.now(UTC)
    alert_id = f"test-{uuid.uuid4()}"
    key = delivery_id(alert_id, Transition.test.value, channel.id)
    session.add(
        DeliveryRow(
            id=key,
            channel_id=channel.id,
            alert_id=alert_id,
            transition=Transition.test.value,
            event={
                "event": "alert.test",
                "at": at.isoformat(),
                "alert": {
                    "id": alert_id,
                    "severity": spec.severity,
                    "message": spec.message,
                    "requested_by": caller.name,
                },
            },
            status=DeliveryStatus.pending.value,
            attempts=0,
            next_attempt_at=at,
            created_at=at,
        )
    )
    await session.commit()
    wake_sender(request)
    return TestResult(delivery_id=key)
