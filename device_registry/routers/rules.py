"""Rules: CRUD, enable/disable, backtest. Every change notifies the rules engine over MQTT.

A rule is validated by ``rules_engine.models.Rule`` — the same model the engine
evaluates — so what the API accepts is what the engine runs; anything else is
a 422 problem naming the field. Reading needs the viewer role, changing the
admin role (rules send commands to devices).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError

from device_registry.deps import CurrentAdmin, CurrentViewer, SessionDep
from device_registry.models import Device
from device_registry.models_notifications import ChannelRow
from device_registry.models_rules import RuleRow
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound, Problem
from device_registry.rules_runtime import TrackerDep
from device_registry.schemas_rules import (
    BacktestFiring,
    BacktestRead,
    RulePage,
    decode_cursor,
    encode_cursor,
    rule_read,
    stored_rule_problem,
)
from device_registry.telemetry.deps import InfluxDep
from iotfleet.influx import InfluxError
from rules_engine.backtest import BacktestTooLarge, load_readings, run_backtest
from rules_engine.models import Rule, StoredRule, rule_definition
from rules_engine.sources import DeviceEntry

router = APIRouter(prefix="/api/v1/rules", tags=["rules"], responses=PROBLEM_RESPONSES)

RuleIdPath = Annotated[str, Path(max_length=36, description="The rule id")]
SERVER_FIELDS = ("id", "version", "created_at", "updated_at")
MAX_BACKTEST_RANGE = timedelta(days=31)

EXAMPLE = {
    "name": "thermostat-overheat",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30, "for": "10s"},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [
        {"command": "set_mode", "args": {"mode": "cool"}},
        {"alert": {"severity": "major", "message": "overheating"}},
    ],
    "cooldown": "60s",
}
RuleBody = Annotated[dict[str, Any], Body(openapi_examples={"overheat": {"value": EXAMPLE}})]


def _validate(body: dict[str, Any]) -> Rule:
    """Validate a rule definition; server-owned fields (id, version, timestamps) are ignored."""
    data = {k: v for k, v in body.items() if k not in SERVER_FIELDS}
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"]), "ctx": None} for err in exc.errors()]
        ) from None


async def _check_channels(session: SessionDep, rule: Rule) -> None:
    """A rule's alert may only notify channels that exist (422 naming the missing ones)."""
    errors = []
    for index, action in enumerate(rule.then):
        named = getattr(getattr(action, "alert", None), "notify", None)
        if not named:
            continue
        known = set((await session.scalars(select(ChannelRow.name).where(ChannelRow.name.in_(named)))).all())
        for position, name in enumerate(named):
            if name not in known:
                errors.append(
                    {
                        "type": "unknown_channel",
                        "loc": ("body", "then", index, "alert", "notify", position),
                        "msg": f"no notification channel named {name!r} (create it at /api/v1/channels)",
                        "input": name,
                        "ctx": None,
                    }
                )
    if errors:
        raise RequestValidationError(errors)


async def _get(session: SessionDep, rule_id: str) -> RuleRow:
    row = await session.get(RuleRow, rule_id)
    if row is None:
        raise NotFound("rule", rule_id)
    return row


async def _name_taken(session: SessionDep, name: str, other_than: str | None = None) -> bool:
    stmt = select(RuleRow.id).where(RuleRow.name == name)
    if other_than is not None:
        stmt = stmt.where(RuleRow.id != other_than)
    return (await session.scalar(stmt)) is not None


async def _commit(session: SessionDep, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"a rule named {name!r} exists") from None


def _apply(row: RuleRow, rule: Rule) -> None:
    row.name = rule.name
    row.device_type = rule.scope.device_type
    row.enabled = rule.enabled
    row.definition = {k: v for k, v in rule_definition(rule).items() if k != "enabled"}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a rule (validated against the device-type catalogue; 422 names the problem)",
    responses={409: {"description": "A rule of that name exists"}},
)
async def create_rule(
    body: RuleBody, session: SessionDep, caller: CurrentAdmin, tracker: TrackerDep
) -> dict[str, Any]:
    rule = _validate(body)
    await _check_channels(session, rule)
    if await _name_taken(session, rule.name):
        raise Conflict(f"a rule named {rule.name!r} exists")
    now = datetime.now(UTC)
    row = RuleRow(id=str(uuid.uuid4()), version=1, created_by=caller.name, created_at=now, updated_at=now)
    _apply(row, rule)
    session.add(row)
    await _commit(session, rule.name)
    tracker.rules_changed(row.id, row.version, "created")
    return rule_read(row)


@router.get("", summary="List rules, by name (cursor-paginated)", response_model=RulePage)
async def list_rules(
    session: SessionDep,
    _caller: CurrentViewer,
    device_type: Annotated[str | None, Query(max_length=32)] = None,
    enabled: Annotated[bool | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> RulePage:
    stmt: Select[Any] = select(RuleRow)
    if device_type is not None:
        stmt = stmt.where(RuleRow.device_type == device_type)
    if enabled is not None:
        stmt = stmt.where(RuleRow.enabled.is_(enabled))
    if cursor:
        (after,) = decode_cursor(cursor, 1)
        stmt = stmt.where(RuleRow.name > after)
    rows = list((await session.scalars(stmt.order_by(RuleRow.name).limit(limit + 1))).all())
    next_cursor = encode_cursor(rows[limit - 1].name) if len(rows) > limit else None
    return RulePage(items=[rule_read(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get("/{rule_id}", summary="A rule", responses={404: {}})
async def get_rule(rule_id: RuleIdPath, session: SessionDep, _caller: CurrentViewer) -> dict[str, Any]:
    return rule_read(await _get(session, rule_id))


@router.put("/{rule_id}", summary="Replace a rule's definition (its version increases)", responses={404: {}})
async def replace_rule(
    rule_id: RuleIdPath, body: RuleBody, session: SessionDep, _caller: CurrentAdmin, tracker: TrackerDep
) -> dict[str, Any]:
    rule = _validate(body)
    row = await _get(session, rule_id)
    await _check_channels(session, rule)
    if await _name_taken(session, rule.name, other_than=rule_id):
        raise Conflict(f"a rule named {rule.name!r} exists")
    _apply(row, rule)
    row.version += 1
    row.updated_at = datetime.now(UTC)
    await _commit(session, rule.name)
    tracker.rules_changed(row.id, row.version, "updated")
    return rule_read(row)


async def _set_enabled(
    session: SessionDep, tracker: TrackerDep, rule_id: str, enabled: bool
) -> dict[str, Any]:
    row = await _get(session, rule_id)
    if row.enabled != enabled:
        row.enabled = enabled
        row.version += 1
        row.updated_at = datetime.now(UTC)
        await session.commit()
        tracker.rules_changed(row.id, row.version, "enabled" if enabled else "disabled")
    return rule_read(row)


@router.post("/{rule_id}/enable", summary="Enable a rule", responses={404: {}})
async def enable_rule(
    rule_id: RuleIdPath, session: SessionDep, _caller: CurrentAdmin, tracker: TrackerDep
) -> dict[str, Any]:
    return await _set_enabled(session, tracker, rule_id, True)


@router.post(
    "/{rule_id}/disable",
    summary="Disable a rule (its open alerts are cleared by the engine)",
    responses={404: {}},
)
async def disable_rule(
    rule_id: RuleIdPath, session: SessionDep, _caller: CurrentAdmin, tracker: TrackerDep
) -> dict[str, Any]:
    return await _set_enabled(session, tracker, rule_id, False)


@router.delete(
    "/{rule_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a rule", responses={404: {}}
)
async def delete_rule(
    rule_id: RuleIdPath, session: SessionDep, _caller: CurrentAdmin, tracker: TrackerDep
) -> Response:
    row = await _get(session, rule_id)
    await session.delete(row)
    await session.commit()
    tracker.rules_changed(rule_id, row.version, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@router.post(
    "/{rule_id}/backtest",
    summary="Evaluate a rule over stored readings: when it would have fired and what it would have sent",
    responses={
        404: {},
        409: {"description": "The stored rule is invalid (replace it)"},
        413: {"description": "Too many readings in the range"},
        503: {},
    },
)
async def backtest_rule(
    rule_id: RuleIdPath,
    session: SessionDep,
    _caller: CurrentViewer,
    influx: InfluxDep,
    start: Annotated[datetime, Query(description="RFC 3339 (UTC if no offset) or epoch seconds")],
    end: Annotated[datetime, Query(description="RFC 3339 (UTC if no offset) or epoch seconds")],
) -> BacktestRead:
    start, end = _utc(start), _utc(end)
    if end <= start:
        raise Problem(
            422,
            "end must be after start",
            slug="validation",
            errors=[{"field": "query.end", "message": "must be after start", "type": "value_error"}],
        )
    if end - start > MAX_BACKTEST_RANGE:
        raise Problem(
            422,
            f"a backtest covers at most {MAX_BACKTEST_RANGE.days} days",
            slug="validation",
            errors=[{"field": "query.end", "message": "range too long", "type": "value_error"}],
        )
    row = await _get(session, rule_id)
    problem = stored_rule_problem(row.definition)
    if problem is not None:
        raise Conflict(f"stored rule {rule_id!r} is invalid ({problem}); replace it (PUT) or delete it")
    try:
        rule = StoredRule.model_validate(
            {**row.definition, "id": row.id, "version": row.version, "enabled": True}
        )
    except ValidationError as exc:
        # E.g. a device type's fields changed since the rule was stored.
        raise Conflict(f"stored rule {rule_id!r} no longer validates: {exc.errors()[0]['msg']}") from None
    devices = [
        DeviceEntry(d.type, d.id, d.tags or {})
        for d in (await session.scalars(select(Device).where(Device.type == rule.scope.device_type))).all()
    ]
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    try:
        readings = await load_readings(influx, rule, start_ms, end_ms)
    except BacktestTooLarge as exc:
        raise Problem(413, str(exc), slug="backtest-too-large") from None
    except InfluxError as exc:
        raise Problem(
            503, f"the telemetry store (InfluxDB) is unavailable: {exc}", headers={"Retry-After": "5"}
        ) from None
    # CPU-bound for large ranges: off the event loop.
    result = await asyncio.to_thread(run_backtest, rule, readings, devices, start_ms, end_ms)
    return BacktestRead(
        rule_id=rule_id,
        start=start,
        end=end,
        readings=result.readings,
        devices=result.devices,
        firings=[BacktestFiring.model_validate(f) for f in result.firings],
        notes=result.notes,
    )
