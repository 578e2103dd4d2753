"""A device's presence timeline: every online/offline transition with its cause."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from sqlalchemy import and_, or_, select

from device_registry import provisioning
from device_registry.deps import CurrentViewer, SessionDep
from device_registry.models import PresenceTransition
from device_registry.problems import PROBLEM_RESPONSES, Problem
from device_registry.schemas import PresenceHistory, PresenceTransitionRead
from device_registry.telemetry import query
from iotfleet.catalogue.base import MAX_TS_MS, MIN_TS_MS

router = APIRouter(prefix="/api/v1/devices", tags=["devices"], responses=PROBLEM_RESPONSES)

DEFAULT_SPAN = timedelta(days=1)
_TIME_HELP = "RFC 3339 with an offset (2026-12-01T06:00:00Z), epoch milliseconds, 'now' or relative '-1h'"


def _bound(text: str | None, param: str, now_ms: int) -> datetime | None:
    if text is None:
        return None
    try:
        ms = query.parse_time(text, param=param, now_ms=now_ms)
    except query.QueryError as error:
        raise _invalid(param, error.detail) from None
    if not MIN_TS_MS <= ms <= MAX_TS_MS:  # e.g. a relative "-9999999w"
        raise _invalid(param, f"{param} {text[:40]!r} is outside the years 2000-2100")
    return datetime.fromtimestamp(ms / 1000, UTC)


def _invalid(param: str, detail: str) -> Problem:
    return Problem(
        422,
        detail,
        slug="invalid-query",
        errors=[{"field": f"query.{param}", "message": detail, "type": "value_error"}],
    )


def _encode_cursor(at: datetime, row_id: int) -> str:
    raw = f"{at.astimezone(UTC).isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        at_text, row_id = raw.split("|")
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None:
            raise ValueError("naive")
        row = int(row_id)
        if not 0 < row < 2**63:
            raise ValueError("row id out of range")
        return at, row
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _invalid("cursor", "cursor is not one this API returned; pass next_cursor unchanged") from None


@router.get(
    "/{device_id}/presence",
    summary="A device's presence timeline: transitions with their cause, paged (served from the registry DB)",
    responses={404: {}},
)
async def device_presence(  # noqa: PLR0917  (one parameter per query option)
    device_id: Annotated[str, Path(max_length=64, description="The device id")],
    session: SessionDep,
    _caller: CurrentViewer,
    start: Annotated[
        str | None, Query(max_length=64, description=f"Inclusive; default end − 24 h. {_TIME_HELP}")
    ] = None,
    end: Annotated[
        str | None, Query(max_length=64, description=f"Exclusive; default now. {_TIME_HELP}")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    order: Annotated[
        Literal["asc", "desc"], Query(description="asc: oldest first; desc: newest first")
    ] = "asc",
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page")
    ] = None,
) -> PresenceHistory:
    device = await provisioning.get_device(session, device_id)
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    end_at = _bound(end, "end", now_ms) or now
    start_at = _bound(start, "start", now_ms) or end_at - DEFAULT_SPAN
    if start_at > end_at:
        raise _invalid("start", "start is after end")
    t = PresenceTransition
    stmt = select(t).where(t.device_id == device_id, t.at >= start_at, t.at < end_at)
    if cursor:
        after_at, after_id = _decode_cursor(cursor)
        if order == "asc":
            stmt = stmt.where(or_(t.at > after_at, and_(t.at == after_at, t.id > after_id)))
        else:
            stmt = stmt.where(or_(t.at < after_at, and_(t.at == after_at, t.id < after_id)))
    keys = (t.at, t.id) if order == "asc" else (t.at.desc(), t.id.desc())
    rows = list((await session.scalars(stmt.order_by(*keys).limit(limit + 1))).all())
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1].at, page[-1].id) if len(rows) > limit else None
    return PresenceHistory(
        device_id=device.id,
        online=device.online,
        last_seen=device.last_seen,
        connected_since=device.connected_since,
        start=start_at,
        end=end_at,
        items=[PresenceTransitionRead(at=r.at, online=r.online, cause=r.cause) for r in page],
        next_cursor=next_cursor,
    )
