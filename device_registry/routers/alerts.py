"""Alerts raised by rules: list/filter, read, acknowledge.

Lifecycle ``active → acknowledged → cleared`` (clearing comes from the rules
engine when the rule's clear condition holds, acknowledged or not). At most
one alert per (rule, device) is open at a time — a database constraint.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import Select, and_, or_, select, update

from device_registry import notifications
from device_registry.deps import CurrentOperator, CurrentViewer, SessionDep
from device_registry.models_notifications import Transition
from device_registry.models_rules import AlertRow, AlertStatus
from device_registry.notifications_runtime import wake_sender
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound
from device_registry.schemas_rules import AlertPage, AlertRead, alert_read, decode_cursor, encode_cursor
from rules_engine.models import Severity

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"], responses=PROBLEM_RESPONSES)

AlertIdPath = Annotated[str, Path(max_length=64, description="The alert id")]


@router.get("", summary="Alerts, newest first; filters combine with AND (cursor-paginated)")
async def list_alerts(  # noqa: PLR0917  (one parameter per filter)
    session: SessionDep,
    _caller: CurrentViewer,
    status: Annotated[AlertStatus | None, Query(description="active, acknowledged or cleared")] = None,
    open: Annotated[bool | None, Query(description="true: active or acknowledged; false: cleared")] = None,
    severity: Annotated[Severity | None, Query()] = None,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    rule_id: Annotated[str | None, Query(max_length=36)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> AlertPage:
    stmt: Select[Any] = select(AlertRow)
    if status is not None:
        stmt = stmt.where(AlertRow.status == status.value)
    if open is not None:
        stmt = stmt.where(AlertRow.open_key.is_not(None) if open else AlertRow.open_key.is_(None))
    if severity is not None:
        stmt = stmt.where(AlertRow.severity == severity)
    if device_id is not None:
        stmt = stmt.where(AlertRow.device_id == device_id)
    if rule_id is not None:
        stmt = stmt.where(AlertRow.rule_id == rule_id)
    if cursor:
        raised, alert_id = decode_cursor(cursor, 2)
        try:
            moment = datetime.fromisoformat(raised)
        except ValueError:
            decode_cursor("!", 2)  # raises the standard invalid-cursor problem
            raise
        stmt = stmt.where(
            or_(AlertRow.raised_at < moment, and_(AlertRow.raised_at == moment, AlertRow.id < alert_id))
        )
    rows = list(
        (
            await session.scalars(
                stmt.order_by(AlertRow.raised_at.desc(), AlertRow.id.desc()).limit(limit + 1)
            )
        ).all()
    )
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last.raised_at.isoformat(), last.id)
    return AlertPage(items=[alert_read(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get("/{alert_id}", summary="An alert", responses={404: {}})
async def get_alert(alert_id: AlertIdPath, session: SessionDep, _caller: CurrentViewer) -> AlertRead:
    row = await session.get(AlertRow, alert_id)
    if row is None:
        raise NotFound("alert", alert_id)
    return alert_read(row)


@router.post(
    "/{alert_id}/acknowledge",
    summary="Acknowledge an active alert (idempotent); a cleared alert cannot be acknowledged",
    responses={404: {}, 409: {"description": "The alert is cleared"}},
)
async def acknowledge_alert(
    alert_id: AlertIdPath, request: Request, session: SessionDep, caller: CurrentOperator
) -> AlertRead:
    row = await session.get(AlertRow, alert_id)
    if row is None:
        raise NotFound("alert", alert_id)
    if row.status == AlertStatus.cleared:
        raise Conflict(
            f"alert {alert_id!r} is already cleared",
            cleared_at=row.cleared_at.isoformat() if row.cleared_at else None,
        )
    if row.status == AlertStatus.active:
        # Conditional: a clear recorded meanwhile by the tracker wins (never overwritten back to
        # "acknowledged"), and only the request that moved it notifies.
        moved = await session.execute(
            update(AlertRow)
            .where(AlertRow.id == alert_id, AlertRow.status == AlertStatus.active.value)
            .values(
                status=AlertStatus.acknowledged.value,
                acknowledged_at=datetime.now(UTC),
                acknowledged_by=caller.name,
            )
            .execution_options(synchronize_session=False)
        )
        await session.refresh(row)
        enqueued = []
        if getattr(moved, "rowcount", 0):
            enqueued = await notifications.enqueue(
                session, row, Transition.acknowledged, at=row.acknowledged_at
            )
        await session.commit()
        if enqueued:
            wake_sender(request)
        if row.status == AlertStatus.cleared:
            raise Conflict(f"alert {alert_id!r} was cleared meanwhile")
    return alert_read(row)
