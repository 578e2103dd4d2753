"""Telemetry queries: latest values, raw ranges (JSON pages or streamed CSV), aggregates, fleet summary.

Every route needs the viewer role. A device's type (hence its InfluxDB
measurement and its fields) comes from its registry record: an unknown device
is a 404 before InfluxDB is asked anything. Parameters are validated by
``device_registry.telemetry.query``; whatever it refuses becomes a 4xx
problem naming the parameter, and InfluxDB being down a 503.

Times in answers are RFC 3339 UTC with milliseconds; bounds accept RFC 3339
with any offset, epoch milliseconds, ``now`` or ``-1h``-style relative times.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import case, func, select

from device_registry.deps import CurrentViewer, SessionDep
from device_registry.models import Device
from device_registry.models_rules import AlertRow, AlertStatus
from device_registry.problems import PROBLEM_RESPONSES, NotFound, Problem
from device_registry.telemetry import query, service
from device_registry.telemetry.deps import CountsCacheDep, InfluxDep, influx_lifespan
from device_registry.telemetry.registry_tags import resolve_tags
from iotfleet.catalogue import DEVICE_TYPES, DeviceType
from iotfleet.influx import InfluxError
from iotfleet.topics import check_device_id

router = APIRouter(tags=["telemetry"], responses=PROBLEM_RESPONSES, lifespan=influx_lifespan)

T = TypeVar("T")
P = ParamSpec("P")

DeviceIdPath = Annotated[str, Path(max_length=64, description="The device id")]
TypePath = Annotated[str, Path(max_length=64, description="A device type of the catalogue")]
FieldsQuery = Annotated[
    list[str] | None,
    Query(
        max_length=50,
        description="Fields to return, comma-separated or repeated (default: every field of the type)",
    ),
]
StartQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="Inclusive start: RFC 3339 with offset, epoch ms, 'now' or relative '-24h'"
        " (default: end - 1h)",
    ),
]
EndQuery = Annotated[str | None, Query(max_length=64, description="Exclusive end, same forms (default: now)")]
EveryQuery = Annotated[str, Query(max_length=16, description="Bucket width: 10s, 1m, 1h, 1d, ...")]
FnQuery = Annotated[str, Query(max_length=16, description="mean | min | max | sum | count | last")]
TzQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="Align buckets to this IANA zone's local time (e.g. daily buckets from local"
        " midnight: every=1d&tz=Europe/Paris); default UTC. Times in the answer stay UTC.",
    ),
]
FillQuery = Annotated[
    str,
    Query(
        max_length=16,
        description="Empty buckets: none (omitted), null, previous (last value in range). count fills 0.",
    ),
]

_INFLUX_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"description": "InfluxDB refused the query"},
    503: {"description": "InfluxDB is unreachable"},
}
_QUERY_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown device or device type"},
    422: {"description": "Invalid parameter (unknown field, bad time, too many points, ...)"},
    **_INFLUX_ERRORS,
}


# --- response models -------------------------------------------------------------------

Value = float | int | bool | str | None


class LatestField(BaseModel):
    value: Value
    time: str = Field(description="When this field was last reported (RFC 3339 UTC)")


class LatestTelemetry(BaseModel):
    device_id: str
    device_type: str
    time: str | None = Field(description="Time of the newest field value; null when nothing is stored")
    fields: dict[str, LatestField] = Field(description="Fields with a stored value (others are absent)")


class TelemetryPage(BaseModel):
    device_id: str
    device_type: str
    fields: list[str]
    start: str
    end: str
    points: list[dict[str, Value]] = Field(description="Rows in time order: time and one key per field")
    next_cursor: str | None = Field(description="Pass as cursor= for the next page; null on the last one")


class DeadLetterError(BaseModel):
    field: str = Field(description="Where in the payload: `temperature_c`, `[3].ts`, `payload`")
    message: str
    reason: str


class DeadLetterRecord(BaseModel):
    time: str
    reason: str
    errors: list[DeadLetterError] = Field(
        default_factory=list, description="The first field-level errors (the MQTT dead letter has up to 20)"
    )
    errors_cut: int = Field(0, description="Errors of this payload not listed here")


def _record_errors(raw: object) -> list[DeadLetterError]:
    """The errors the ingest stored with a record (JSON text); none for records older than that."""
    if not isinstance(raw, str):
        return []
    try:
        items = orjson.loads(raw)
        return [DeadLetterError.model_validate(item) for item in items[:20]]
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return []


class DeviceDeadLetters(BaseModel):
    device_id: str
    device_type: str
    start: str
    end: str
    items: list[DeadLetterRecord] = Field(description="Newest first: when and why a payload was refused")
    by_reason: dict[str, int] = Field(description="Counts of the listed items per reason")


class AggregateSeries(BaseModel):
    device_id: str
    device_type: str
    fields: list[str]
    fn: str
    every: str
    fill: str
    tz: str = Field(description="Zone the buckets are aligned to")
    start: str
    end: str
    points: list[dict[str, Value]] = Field(description="One row per bucket, stamped at the bucket start")


class AggregateGroup(BaseModel):
    tags: dict[str, str] = Field(description="The group's tag values ({} when not grouped)")
    points: list[dict[str, Value]]


class TypeAggregate(BaseModel):
    device_type: str
    fields: list[str]
    fn: str
    every: str
    fill: str
    group_by: str | None
    tags: dict[str, str] = Field(description="The tag filters applied")
    tz: str = Field(description="Zone the buckets are aligned to")
    start: str
    end: str
    groups: list[AggregateGroup]


class TypeSummary(BaseModel):
    device_type: str = Field(description="The type, or '*' for the totals")
    devices: int = Field(description="Devices of the type in the registry")
    online: int = Field(
        description="Of those, online now (broker connection events and device messages, as the device's `online`)"
    )
    readings_last_minute: int = Field(description="Readings stored with a device time in the last minute")
    readings_last_hour: int
    deadlettered_last_hour: int = Field(description="Payloads the ingest dead-lettered in the last hour")
    active_alerts: int = Field(description="Alerts raised and not acknowledged yet")
    open_alerts: int = Field(description="Alerts not cleared yet (active or acknowledged)")


class FleetSummary(BaseModel):
    generated_at: str
    counts_age_s: float = Field(
        description="Age of the last-minute and dead-letter counts: reused for 5 s (dashboards poll)"
    )
    hour_counts_age_s: float = Field(
        description="Age of the last-hour reading counts: reused for 60 s (they scan an hour of points)"
    )
    types: list[TypeSummary]
    totals: TypeSummary


# --- helpers -----------------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _problem(error: query.QueryError) -> Problem:
    slug = "not-found" if error.status == 404 else "invalid-query"
    return Problem(
        error.status,
        error.detail,
        slug=slug,
        errors=[{"field": f"query.{error.param}", "message": error.detail, "type": "value_error"}],
        **error.extra,
    )


def _influx_problem(error: InfluxError) -> Problem:
    if error.retryable:
        return Problem(
            503,
            "the telemetry store (InfluxDB) is unreachable or overloaded; retry shortly",
            slug="telemetry-store-unavailable",
            title="Telemetry store unavailable",
            headers={"Retry-After": "5"},
        )
    return Problem(
        502,
        f"the telemetry store refused the query: {error}",
        slug="telemetry-store-error",
        title="Bad gateway",
    )


async def _guard(awaitable: Awaitable[T]) -> T:
    """Run a query, turning builder and InfluxDB errors into problems."""
    try:
        return await awaitable
    except query.QueryError as error:
        raise _problem(error) from None
    except InfluxError as error:
        raise _influx_problem(error) from None


def _checked(func_: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return func_(*args, **kwargs)
    except query.QueryError as error:
        raise _problem(error) from None


async def _device_type(session: SessionDep, device_id: str) -> DeviceType:
    try:
        check_device_id(device_id)
    except ValueError:
        # Such an id cannot have been provisioned; checked before the DB sees it (a NUL
        # byte, for one, is an error in PostgreSQL, not just a miss).
        raise NotFound("device", device_id) from None
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFound("device", device_id)
    device_type = DEVICE_TYPES.get(device.type)
    if device_type is None:  # a type removed from the catalogue after devices were made
        raise Problem(
            409, f"device {device_id!r} has type {device.type!r}, which the catalogue no longer has"
        )
    return device_type


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A JSON answer serialized straight by orjson.

    Point lists run to thousands of rows: FastAPI would first validate every
    value against the response model, then serialize it (a few ms of CPU for a
    1,441-row aggregate, measured). The bodies are built here with exactly the
    model's keys; the model still documents them in OpenAPI.
    """
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


def _points(rows: list[service.Row]) -> list[dict[str, Value]]:
    return [{**row, "time": query.format_time(int(row["time"]))} for row in rows]


def _wants_csv(request: Request, format_: str | None) -> bool:
    if format_ is not None:
        if format_ not in ("json", "csv"):
            raise _problem(query.QueryError("format must be json or csv", param="format"))
        return format_ == "csv"
    accept = request.headers.get("accept", "")
    media = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "text/csv" not in media:
        return False
    # text/csv wins unless JSON is listed before it.
    return "application/json" not in media or media.index("text/csv") < media.index("application/json")


def _csv_value(value: Value) -> Value:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# --- routes ------------------------------------------------------------------------------


@router.get(
    "/api/v1/devices/{device_id}/telemetry/latest",
    summary="Last value and time of every field of a device",
    responses=_QUERY_ERRORS,
)
async def latest_telemetry(
    *,
    device_id: DeviceIdPath,
    session: SessionDep,
    influx: InfluxDep,
    _caller: CurrentViewer,
    fields: FieldsQuery = None,
) -> LatestTelemetry:
    device_type = await _device_type(session, device_id)
    names = _checked(
        query.parse_fields, fields, device_type, default=[*device_type.fields, *query.META_FIELDS]
    )
    found = await _guard(service.latest(influx, device_type, device_id, names, now_ms=_now_ms()))
    newest = max((value.time_ms for value in found.values()), default=None)
    return LatestTelemetry(
        device_id=device_id,
        device_type=device_type.name,
        time=query.format_time(newest) if newest is not None else None,
        fields={
            name: LatestField(value=value.value, time=query.format_time(value.time_ms))
            for name, value in found.items()
        },
    )


@router.get(
    "/api/v1/devices/{device_id}/telemetry",
    summary="Raw points of a device in time order: JSON pages, or the whole range as streamed CSV",
    description="Send `Accept: text/csv` (or `format=csv`) to export the range as CSV; the export is"
    f" streamed page by page and refused (422) beyond {query.MAX_EXPORT_ROWS:,} rows.",
    response_model=TelemetryPage,
    responses={**_QUERY_ERRORS, 200: {"content": {"text/csv": {}}}},
)
async def raw_telemetry(
    *,
    request: Request,
    device_id: DeviceIdPath,
    session: SessionDep,
    influx: InfluxDep,
    _caller: CurrentViewer,
    fields: FieldsQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    limit: Annotated[
        int, Query(ge=1, le=query.MAX_RAW_LIMIT, description="Points per page (JSON)")
    ] = query.DEFAULT_RAW_LIMIT,
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page")
    ] = None,
    format_: Annotated[str | None, Query(alias="format", max_length=8, description="json | csv")] = None,
) -> Response:
    device_type = await _device_type(session, device_id)
    names = _checked(query.parse_fields, fields, device_type)
    time_range = _checked(query.parse_range, start, end, now_ms=_now_ms())
    if _wants_csv(request, format_):
        return await _csv_export(influx, device_type, device_id, names, time_range)
    page_cursor = _checked(query.Cursor.decode, cursor) if cursor is not None else None
    page = await _guard(
        service.raw_page(influx, device_type, device_id, names, time_range, limit=limit, cursor=page_cursor)
    )
    token = page.next_cursor.encode() if page.next_cursor is not None else None
    body = {
        "device_id": device_id,
        "device_type": device_type.name,
        "fields": names,
        "start": query.format_time(time_range.start_ms),
        "end": query.format_time(time_range.end_ms),
        "points": _points(page.rows),
        "next_cursor": token,
    }
    if token is None:
        return _json(body)
    # RFC 8288 Link to the next page, with the bounds pinned so "now" does not move between pages.
    params = [("fields", ",".join(names)), ("start", str(time_range.start_ms))]
    params += [("end", str(time_range.end_ms)), ("limit", str(limit)), ("cursor", token)]
    return _json(body, headers={"Link": f'<{request.url.path}?{urlencode(params)}>; rel="next"'})


@router.get(
    "/api/v1/devices/{device_id}/deadletters",
    summary="A device's recent dead letters: when and why its payloads were refused (default: last 24 h)",
    description="The full dead letter (errors, original payload) is published on"
    " `deadletter/{type}/{id}`; this lists the ingest's record of each one, newest first.",
    response_model=DeviceDeadLetters,
    responses=_QUERY_ERRORS,
)
async def device_deadletters(
    *,
    device_id: DeviceIdPath,
    session: SessionDep,
    influx: InfluxDep,
    _caller: CurrentViewer,
    start: StartQuery = None,
    end: EndQuery = None,
    limit: Annotated[int, Query(ge=1, le=1_000, description="Records at most")] = 100,
) -> DeviceDeadLetters:
    device_type = await _device_type(session, device_id)
    time_range = _checked(query.parse_range, start, end, now_ms=_now_ms(), default_span_ms=86_400_000)
    rows = await _guard(service.device_deadletters(influx, device_id, time_range, limit=limit))
    items = [
        DeadLetterRecord(
            time=query.format_time(int(r["time"])),
            reason=str(r["reason"]),
            errors=_record_errors(r.get("errors")),
            errors_cut=int(r.get("errors_cut") or 0),
        )
        for r in rows
    ]
    by_reason: dict[str, int] = {}
    for item in items:
        by_reason[item.reason] = by_reason.get(item.reason, 0) + 1
    return DeviceDeadLetters(
        device_id=device_id,
        device_type=device_type.name,
        start=query.format_time(time_range.start_ms),
        end=query.format_time(time_range.end_ms),
        items=items,
        by_reason=by_reason,
    )


async def _csv_export(
    influx: InfluxDep, device_type: DeviceType, device_id: str, names: list[str], time_range: query.TimeRange
) -> StreamingResponse:
    # Checked before the first byte: once streaming has begun, an error can no longer be a 4xx.
    rows = await _guard(service.count_rows(influx, device_type, device_id, names, time_range))
    if rows > query.MAX_EXPORT_ROWS:
        raise _problem(
            query.QueryError(
                f"the range holds {rows:,} points, more than the {query.MAX_EXPORT_ROWS:,} one export may"
                " stream; narrow start/end or export the aggregate endpoint's buckets instead",
                param="start",
            )
        )

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["time", *names])
        yield buffer.getvalue()
        async for page in service.iter_raw(influx, device_type, device_id, names, time_range):
            buffer.seek(0)
            buffer.truncate()
            for row in page:
                writer.writerow(
                    [query.format_time(int(row["time"])), *(_csv_value(row.get(n)) for n in names)]
                )
            yield buffer.getvalue()

    filename = f"{device_id}_{time_range.start_ms}_{time_range.end_ms}.csv"
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/api/v1/devices/{device_id}/telemetry/aggregate",
    summary="A device's telemetry downsampled into buckets (for charts)",
    response_model=AggregateSeries,
    responses=_QUERY_ERRORS,
)
async def aggregate_telemetry(
    *,
    device_id: DeviceIdPath,
    session: SessionDep,
    influx: InfluxDep,
    _caller: CurrentViewer,
    fields: FieldsQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    every: EveryQuery = "1m",
    fn: FnQuery = "mean",
    fill: FillQuery = "none",
    tz: TzQuery = None,
) -> Response:
    device_type = await _device_type(session, device_id)
    aggregate_fn = _checked(query.parse_enum, query.AggregateFn, fn, param="fn")
    names = _checked(
        query.parse_fields, fields, device_type, default=_default_fields(device_type, aggregate_fn)
    )
    fill_mode = _checked(query.parse_enum, query.Fill, fill, param="fill")
    time_range = _checked(query.parse_range, start, end, now_ms=_now_ms())
    zone = _checked(query.parse_tz, tz)
    every_ms = _checked(query.parse_every, every, time_range, tz=zone)
    rows = await _guard(
        service.aggregate(
            influx,
            device_type,
            device_id,
            names,
            time_range,
            every_ms=every_ms,
            fn=aggregate_fn,
            fill=fill_mode,
            tz=zone,
        )
    )
    return _json(
        {
            "device_id": device_id,
            "device_type": device_type.name,
            "fields": names,
            "fn": aggregate_fn.value,
            "every": query.format_duration(every_ms),
            "fill": fill_mode.value,
            "tz": zone or "UTC",
            "start": query.format_time(time_range.start_ms),
            "end": query.format_time(time_range.end_ms),
            "points": _points(rows),
        }
    )


def _default_fields(device_type: DeviceType, fn: query.AggregateFn) -> list[str]:
    """Without fields=, the fields ``fn`` applies to (mean of a string field makes no sense)."""
    kinds = query.field_kinds(device_type)
    return [name for name in device_type.fields if kinds[name] in query.FN_KINDS[fn]]


@router.get(
    "/api/v1/device-types/{type_name}/telemetry/aggregate",
    summary="Telemetry of a whole device type downsampled, optionally per device or per tag value",
    response_model=TypeAggregate,
    responses=_QUERY_ERRORS,
)
async def type_aggregate_telemetry(
    *,
    type_name: TypePath,
    influx: InfluxDep,
    session: SessionDep,
    _caller: CurrentViewer,
    fields: FieldsQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    every: EveryQuery = "1m",
    fn: FnQuery = "mean",
    fill: FillQuery = "none",
    group_by: Annotated[
        str | None, Query(max_length=70, description="none (default), device, or a tag key (e.g. site)")
    ] = None,
    tag: Annotated[
        list[str] | None,
        Query(
            max_length=query.MAX_TAG_FILTERS,
            description="Only points with this tag value: key=value, repeatable (e.g. site=paris)",
        ),
    ] = None,
    tz: TzQuery = None,
) -> Response:
    device_type = _checked(query.resolve_type, type_name)
    aggregate_fn = _checked(query.parse_enum, query.AggregateFn, fn, param="fn")
    names = _checked(
        query.parse_fields, fields, device_type, default=_default_fields(device_type, aggregate_fn)
    )
    fill_mode = _checked(query.parse_enum, query.Fill, fill, param="fill")
    group = _checked(query.parse_group_by, group_by)
    tag_filters = _checked(query.parse_tag_filters, tag)
    time_range = _checked(query.parse_range, start, end, now_ms=_now_ms())
    zone = _checked(query.parse_tz, tz)
    every_ms = _checked(query.parse_every, every, time_range, tz=zone)
    # Tag keys the type's devices have in the registry are resolved to device ids here.
    resolved = await _guard(resolve_tags(session, device_type.name, group, tag_filters))
    groups = await _guard(
        service.type_aggregate(
            influx,
            device_type,
            names,
            time_range,
            every_ms=every_ms,
            fn=aggregate_fn,
            fill=fill_mode,
            group_by=group,
            tags=resolved.point_tags,
            tz=zone,
            device_ids=resolved.device_ids,
            device_groups=resolved.groups,
        )
    )
    return _json(
        {
            "device_type": device_type.name,
            "fields": names,
            "fn": aggregate_fn.value,
            "every": query.format_duration(every_ms),
            "fill": fill_mode.value,
            "group_by": group,
            "tags": dict(tag_filters),
            "tz": zone or "UTC",
            "start": query.format_time(time_range.start_ms),
            "end": query.format_time(time_range.end_ms),
            "groups": [{"tags": g.tags, "points": _points(g.rows)} for g in groups],
        }
    )


@router.get(
    "/api/v1/fleet/summary",
    summary="Per device type: devices, online, readings last minute/hour, dead letters, active alerts",
    responses=_INFLUX_ERRORS,
)
async def fleet_summary(
    session: SessionDep, influx: InfluxDep, cache: CountsCacheDep, _caller: CurrentViewer
) -> FleetSummary:
    online = func.sum(case((Device.online.is_(True), 1), else_=0))
    devices = {
        name: (int(total), int(up or 0))
        for name, total, up in await session.execute(
            select(Device.type, func.count(), online).group_by(Device.type)
        )
    }
    is_active = case((AlertRow.status == AlertStatus.active.value, 1), else_=0)
    alerts = {
        name: (int(active or 0), int(total))
        for name, active, total in await session.execute(
            select(AlertRow.device_type, func.sum(is_active), func.count())
            .where(AlertRow.status != AlertStatus.cleared.value)
            .group_by(AlertRow.device_type)
        )
    }
    device_types = list(DEVICE_TYPES.values())
    counts, age_s, hour_age_s = await _guard(cache.get(influx, device_types))
    types = [
        TypeSummary(
            device_type=t.name,
            devices=devices.get(t.name, (0, 0))[0],
            online=devices.get(t.name, (0, 0))[1],
            readings_last_minute=counts[t.name].readings_last_minute,
            readings_last_hour=counts[t.name].readings_last_hour,
            deadlettered_last_hour=counts[t.name].deadlettered_last_hour,
            active_alerts=alerts.get(t.name, (0, 0))[0],
            open_alerts=alerts.get(t.name, (0, 0))[1],
        )
        for t in device_types
    ]
    totals = TypeSummary(
        device_type="*",
        devices=sum(t.devices for t in types),
        online=sum(t.online for t in types),
        readings_last_minute=sum(t.readings_last_minute for t in types),
        readings_last_hour=sum(t.readings_last_hour for t in types),
        deadlettered_last_hour=sum(t.deadlettered_last_hour for t in types),
        active_alerts=sum(t.active_alerts for t in types),
        open_alerts=sum(t.open_alerts for t in types),
    )
    return FleetSummary(
        counts_age_s=round(age_s, 3),
        hour_counts_age_s=round(hour_age_s, 3),
        generated_at=query.format_time(_now_ms()),
        types=types,
        totals=totals,
    )
