"""API shapes of rules, commands and alerts, and the cursor helper their lists share."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from device_registry.models_rules import AlertRow, CommandRow, RuleRow
from device_registry.problems import Problem
from rules_engine.models import check_rule_bounds

# --- cursors ---------------------------------------------------------------------------------


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[str]:
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        parts = orjson.loads(raw)
        if not isinstance(parts, list) or len(parts) != arity or not all(isinstance(p, str) for p in parts):
            raise ValueError("bad cursor")
        return parts
    except (binascii.Error, ValueError):
        raise Problem(
            422,
            "cursor is not one this API returned; pass next_cursor unchanged",
            slug="validation",
            errors=[{"field": "query.cursor", "message": "invalid cursor", "type": "value_error"}],
        ) from None


# --- rules -----------------------------------------------------------------------------------


def stored_rule_problem(definition: Any) -> str | None:
    """Why a stored definition cannot be served as a rule (rows written before the bounds), or None."""
    if not isinstance(definition, dict):
        return "stored definition is not a JSON object"
    try:
        check_rule_bounds(definition)
    except PydanticCustomError as exc:
        return str(exc)
    return None


def rule_read(row: RuleRow) -> dict[str, Any]:
    """A rule as served: its definition in the public shape plus id, version and timestamps.

    A row an older registry stored past today's bounds is served flagged, without
    its definition (which could not be serialized): ``invalid`` says why; the
    engine skips it; replace it (PUT) or delete it.
    """
    server = {
        "id": row.id,
        "enabled": row.enabled,
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
    problem = stored_rule_problem(row.definition)
    if problem is not None:
        return {"name": row.name, "scope": {"device_type": row.device_type}, **server, "invalid": problem}
    return {**row.definition, **server}


class RulePage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


class BacktestFiring(BaseModel):
    at: str
    at_ms: int
    device_id: str | None
    kind: str = Field(description="fire, clear, or schedule")
    values: dict[str, Any]
    actions: list[dict[str, Any]] = Field(description="What would have been sent (nothing is)")


class BacktestRead(BaseModel):
    rule_id: str
    start: datetime
    end: datetime
    readings: int
    devices: int
    firings: list[BacktestFiring]
    notes: list[str]


# --- commands --------------------------------------------------------------------------------

MAX_TTL_S = 30 * 86_400


class CommandCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, description="A command of the device's type")]
    args: dict[str, Any] = Field(default_factory=dict, description="Validated against the command's model")
    ttl_s: int | None = Field(
        None, ge=1, le=MAX_TTL_S, description="Expiry; default IOTFLEET_RULES__COMMAND_TTL_S (300)"
    )


class CommandRead(BaseModel):
    id: str
    device_id: str
    device_type: str
    name: str
    args: dict[str, Any]
    status: str = Field(description="queued, sent, delivered, succeeded, failed or expired")
    source: str = Field(description="operator:<key name> or rule:<rule name>")
    rule_id: str | None
    idempotency_key: str | None
    ttl_s: int
    detail: str | None
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    completed_at: datetime | None


def command_read(row: CommandRow) -> CommandRead:
    return CommandRead(
        id=row.id,
        device_id=row.device_id,
        device_type=row.device_type,
        name=row.name,
        args=row.args,
        status=row.status,
        source=row.source,
        rule_id=row.rule_id,
        idempotency_key=row.idempotency_key,
        ttl_s=row.ttl_s,
        detail=row.detail,
        created_at=row.created_at,
        expires_at=row.expires_at,
        sent_at=row.sent_at,
        delivered_at=row.delivered_at,
        completed_at=row.completed_at,
    )


class CommandPage(BaseModel):
    items: list[CommandRead]
    next_cursor: str | None


# --- alerts ----------------------------------------------------------------------------------


class AlertRead(BaseModel):
    id: str
    rule_id: str
    rule_name: str
    device_id: str
    device_type: str
    severity: str
    message: str
    status: str = Field(description="active, acknowledged or cleared")
    values: dict[str, Any] = Field(description="The reading that raised it")
    raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    cleared_at: datetime | None
    clear_reason: str | None


def alert_read(row: AlertRow) -> AlertRead:
    return AlertRead(
        id=row.id,
        rule_id=row.rule_id,
        rule_name=row.rule_name,
        device_id=row.device_id,
        device_type=row.device_type,
        severity=row.severity,
        message=row.message,
        status=row.status,
        values=row.values,
        raised_at=row.raised_at,
        acknowledged_at=row.acknowledged_at,
        acknowledged_by=row.acknowledged_by,
        cleared_at=row.cleared_at,
        clear_reason=row.clear_reason,
    )


class AlertPage(BaseModel):
    items: list[AlertRead]
    next_cursor: str | None
