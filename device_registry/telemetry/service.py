"""Telemetry queries run on InfluxDB: the builder's statements in, plain rows out.

Each function takes validated parameters (see ``query``), runs one HTTP request
on the shared ``InfluxClient`` and shapes the answer: rows are dicts with
``time`` (epoch ms) and one key per field. Values keep the catalogue's types
(InfluxDB's JSON drops the ``.0`` of whole floats; it is restored here so a
float field never comes back as an int).
"""

from __future__ import annotations

import asyncio
import time
import types
import typing
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from device_registry.telemetry import query
from device_registry.telemetry.query import (
    AggregateFn,
    Cursor,
    Fill,
    QueryError,
    Statement,
    TimeRange,
)
from iotfleet.catalogue import DeviceType
from iotfleet.influx import InfluxClient, InfluxError, quote_identifier, series_rows

Row = dict[str, Any]


def _is_float(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is_float(args[0])
    return annotation is float


def float_fields(device_type: DeviceType) -> frozenset[str]:
    model = device_type.reading
    return frozenset(name for name in device_type.fields if _is_float(model.model_fields[name].annotation))


def _restore_floats(row: Row, floats: frozenset[str]) -> Row:
    for name, value in row.items():
        if name in floats and type(value) is int:
            row[name] = float(value)
    return row


async def _nothing_stored_yet(client: InfluxClient) -> bool:
    """True when the database or its retention policy does not exist (no write has happened yet)."""
    try:
        databases = {row.get("name") for row in series_rows(await client.query("SHOW DATABASES"))}
        if client.settings.database not in databases:
            return True
        policies = await client.query(
            f"SHOW RETENTION POLICIES ON {quote_identifier(client.settings.database)}"
        )
        return client.settings.retention_policy not in {row.get("name") for row in series_rows(policies)}
    except InfluxError:
        return False


async def _run(client: InfluxClient, statement: Statement) -> list[dict[str, Any]]:
    try:
        return await client.query(statement.text, params=statement.params or None)
    except InfluxError as error:
        # Before the ingest's first write the database (or its retention policy) does not
        # exist: that is "no telemetry yet", an empty answer, not a gateway error. (With
        # several statements InfluxDB only says "not executed", so it is checked, not parsed.)
        if not error.retryable and await _nothing_stored_yet(client):
            return []
        raise


def _rp(client: InfluxClient) -> str:
    return client.settings.retention_policy


# --- latest ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldValue:
    value: Any
    time_ms: int


async def latest(
    client: InfluxClient,
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    *,
    now_ms: int,
    windows: Sequence[int | None] = query.LATEST_WINDOWS_MS,
) -> dict[str, FieldValue]:
    """The newest value of each field and its time; fields never stored are absent.

    Looks back through ``windows`` (widening), asking each time only for the
    fields not found yet.
    """
    floats = float_fields(device_type)
    found: dict[str, FieldValue] = {}
    missing = list(fields)
    for window in windows:
        since = None if window is None else now_ms - window
        statement = query.latest_statement(device_type, device_id, missing, _rp(client), since_ms=since)
        for result in await _run(client, statement):
            # One statement per field, answered in order (statement_id is the index).
            index = result.get("statement_id", 0)
            if not 0 <= index < len(missing):
                continue
            for row in series_rows([result]):
                value = row.get("last")
                if value is not None:
                    if missing[index] in floats and type(value) is int:
                        value = float(value)
                    found[missing[index]] = FieldValue(value, int(row["time"]))
        missing = [name for name in missing if name not in found]
        if not missing:
            break
    return {name: found[name] for name in fields if name in found}


# --- raw points ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Row]
    next_cursor: Cursor | None


async def raw_page(
    client: InfluxClient,
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    limit: int,
    cursor: Cursor | None,
) -> Page:
    """One page of raw points in time order, and the cursor of the next page if there is one."""
    statement = query.raw_statement(
        device_type, device_id, fields, time_range, limit=limit, cursor=cursor, rp=_rp(client)
    )
    floats = float_fields(device_type)
    rows = [_restore_floats(row, floats) for row in series_rows(await _run(client, statement))]
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    return Page(rows, query.next_cursor(cursor, [int(row["time"]) for row in rows]))


async def device_deadletters(
    client: InfluxClient, device_id: str, time_range: TimeRange, *, limit: int
) -> list[Row]:
    """The device's newest dead-letter records (``time``, ``reason``), newest first."""
    statement = query.device_deadletters_statement(device_id, time_range, _rp(client), limit=limit)
    return list(series_rows(await _run(client, statement)))


async def count_rows(
    client: InfluxClient,
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
) -> int:
    """A lower bound of the rows in range (the largest per-field count); exact when fields are dense."""
    statement = query.count_statement(device_type, device_id, fields, time_range, _rp(client))
    counts = [
        int(value or 0)
        for row in series_rows(await _run(client, statement))
        for name, value in row.items()
        if name != "time"
    ]
    return max(counts, default=0)


async def iter_raw(
    client: InfluxClient,
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    max_rows: int | None = None,
    page_rows: int | None = None,
) -> AsyncIterator[list[Row]]:
    """Every raw point of the range, page by page (bounded memory), at most ``max_rows``."""
    max_rows = query.MAX_EXPORT_ROWS if max_rows is None else max_rows
    page_rows = query.EXPORT_PAGE_ROWS if page_rows is None else page_rows
    cursor: Cursor | None = None
    sent = 0
    while sent < max_rows:
        page = await raw_page(
            client,
            device_type,
            device_id,
            fields,
            time_range,
            limit=min(page_rows, max_rows - sent),
            cursor=cursor,
        )
        if page.rows:
            yield page.rows
        sent += len(page.rows)
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


# --- aggregates ------------------------------------------------------------------------


def _aggregate_floats(device_type: DeviceType, fn: AggregateFn, fields: Sequence[str]) -> frozenset[str]:
    if fn is AggregateFn.COUNT:
        return frozenset()
    if fn in (AggregateFn.MEAN,):
        return frozenset(fields)
    return float_fields(device_type)


async def aggregate(
    client: InfluxClient,
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    every_ms: int,
    fn: AggregateFn,
    fill: Fill,
    tz: str | None = None,
) -> list[Row]:
    statement = query.aggregate_statement(
        device_type,
        device_id,
        fields,
        time_range,
        every_ms=every_ms,
        fn=fn,
        fill=fill,
        rp=_rp(client),
        tz=tz,
    )
    floats = _aggregate_floats(device_type, fn, fields)
    return [_restore_floats(row, floats) for row in series_rows(await _run(client, statement))]


@dataclass(frozen=True, slots=True)
class Group:
    tags: dict[str, str]
    rows: list[Row]


async def type_aggregate(
    client: InfluxClient,
    device_type: DeviceType,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    every_ms: int,
    fn: AggregateFn,
    fill: Fill,
    group_by: str | None,
    tags: Sequence[tuple[str, str]] = (),
    tz: str | None = None,
    device_ids: Sequence[str] | None = None,
    device_groups: Sequence[tuple[str, Sequence[str]]] | None = None,
) -> list[Group]:
    """One aggregate series for the type, or one per device / tag value.

    ``device_ids`` restricts it to those devices; ``device_groups`` (value, device ids) makes one
    series per value of the registry tag ``group_by``: registry tags are resolved to devices by
    the caller (they are not point tags in InfluxDB).
    """
    buckets = query.bucket_count(time_range, every_ms) + (1 if tz is not None else 0)
    max_groups = max(1, query.MAX_AGGREGATE_POINTS // buckets)
    if device_groups is not None and group_by is not None:
        return await _registry_grouped(
            client, device_type, fields, time_range, every_ms=every_ms, fn=fn, fill=fill,
            group_key=group_by, groups=device_groups, max_groups=max_groups, buckets=buckets,
            tags=tags, tz=tz,
        )  # fmt: skip
    statement = query.type_aggregate_statement(
        device_type,
        fields,
        time_range,
        every_ms=every_ms,
        fn=fn,
        fill=fill,
        group_by=group_by,
        max_groups=max_groups,
        rp=_rp(client),
        tags=tags,
        tz=tz,
        device_ids=device_ids,
    )
    results = await _run(client, statement)
    series = [s for result in results for s in result.get("series", [])]
    if len(series) > max_groups:
        # At least len(series) groups: suggest an interval that would fit that many.
        suggestion = query.suggest_every(
            time_range.span_ms + every_ms, max(1, query.MAX_AGGREGATE_POINTS // len(series))
        )
        raise QueryError(
            f"more than {max_groups} groups x {buckets} buckets exceeds {query.MAX_AGGREGATE_POINTS} points;"
            f" use a coarser every (e.g. every={suggestion}), a shorter range or a coarser group_by",
            param="group_by" if buckets == 1 else "every",
            suggested_every=suggestion,
            max_points=query.MAX_AGGREGATE_POINTS,
        )
    floats = _aggregate_floats(device_type, fn, fields)
    groups = []
    for one in series:
        group_tags = dict(one.get("tags") or {})
        rows = [_restore_floats(row, floats) for row in series_rows([{"series": [{**one, "tags": {}}]}])]
        groups.append(Group(group_tags, rows))
    groups.sort(key=lambda g: sorted(g.tags.items()))
    return groups


async def _registry_grouped(
    client: InfluxClient,
    device_type: DeviceType,
    fields: Sequence[str],
    time_range: query.TimeRange,
    *,
    every_ms: int,
    fn: query.AggregateFn,
    fill: query.Fill,
    group_key: str,
    groups: Sequence[tuple[str, Sequence[str]]],
    max_groups: int,
    buckets: int,
    tags: Sequence[tuple[str, str]],
    tz: str | None,
) -> list[Group]:
    """One statement per registry tag value (its devices' points), all sent in one request."""
    if len(groups) > max_groups:
        suggestion = query.suggest_every(
            time_range.span_ms + every_ms, max(1, query.MAX_AGGREGATE_POINTS // len(groups))
        )
        raise QueryError(
            f"{len(groups)} values of {group_key!r} x {buckets} buckets exceeds {query.MAX_AGGREGATE_POINTS}"
            f" points; use a coarser every (e.g. every={suggestion}), a shorter range or a tag filter",
            param="group_by" if buckets == 1 else "every",
            suggested_every=suggestion,
            max_points=query.MAX_AGGREGATE_POINTS,
        )
    if not groups:
        return []
    params: dict[str, str] = {}
    texts = [
        query.type_aggregate_statement(
            device_type, fields, time_range, every_ms=every_ms, fn=fn, fill=fill, group_by=None,
            max_groups=max_groups, rp=_rp(client), tags=tags, tz=tz, device_ids=ids, params=params,
            param_prefix=f"g{index}_",
        ).text
        for index, (_value, ids) in enumerate(groups)
    ]  # fmt: skip
    results = await _run(client, query.Statement("; ".join(texts), params))
    floats = _aggregate_floats(device_type, fn, fields)
    answer = []
    for (value, _ids), result in zip(groups, results, strict=False):
        for one in result.get("series", []):
            rows = [_restore_floats(row, floats) for row in series_rows([{"series": [{**one, "tags": {}}]}])]
            answer.append(Group({group_key: value}, rows))
    answer.sort(key=lambda g: sorted(g.tags.items()))
    return answer


# --- fleet summary ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypeCounts:
    readings_last_minute: int = 0
    readings_last_hour: int = 0
    deadlettered_last_hour: int = 0


def _single_count(result: dict[str, Any]) -> int:
    for row in series_rows([result]):
        for name, value in row.items():
            if name != "time" and value is not None:
                return int(value)
    return 0


SUMMARY_TTL_S = 5.0
"""How long the last-minute counts (and dead letters) are reused: dashboards poll the summary."""
HOUR_TTL_S = 60.0
"""How long the last-hour counts are reused: they scan an hour of every device's points (0.35 to
1.2 s for 1,000 devices at 1 Hz on 2 vCPU, measured; the last minute ~15 ms); an hour moves slowly."""


@dataclass
class _Entry:
    value: Any = None
    at: float = 0.0

    def fresh(self, ttl_s: float) -> bool:
        return self.value is not None and time.monotonic() - self.at < ttl_s

    def age(self) -> float:
        return time.monotonic() - self.at


class CountsCache:
    """Fleet counts reused for a few seconds (hour counts for a minute); concurrent callers share a query."""

    def __init__(self) -> None:
        self._minute = _Entry()
        self._hour = _Entry()
        self._lock = asyncio.Lock()

    async def get(
        self, client: InfluxClient, device_types: Sequence[DeviceType]
    ) -> tuple[dict[str, TypeCounts], float, float]:
        """The counts, the age of the minute counts and the age of the hour counts (seconds)."""
        async with self._lock:
            if not self._minute.fresh(SUMMARY_TTL_S):
                self._minute = _Entry(await _minute_counts(client, device_types), time.monotonic())
            if not self._hour.fresh(HOUR_TTL_S):
                self._hour = _Entry(await _window_counts(client, device_types, "1h"), time.monotonic())
            minute: dict[str, tuple[int, int]] = self._minute.value
            hour: dict[str, int] = self._hour.value
            counts = {
                t.name: TypeCounts(
                    readings_last_minute=minute[t.name][0],
                    # The hour includes the last minute, even when the hour counts are older.
                    readings_last_hour=max(hour.get(t.name, 0), minute[t.name][0]),
                    deadlettered_last_hour=minute[t.name][1],
                )
                for t in device_types
            }
            return counts, self._minute.age(), self._hour.age()


async def _window_counts(
    client: InfluxClient, device_types: Sequence[DeviceType], window: str
) -> dict[str, int]:
    results = await _run(client, query.readings_count_statement(device_types, _rp(client), window=window))
    by_index = {int(result.get("statement_id", i)): result for i, result in enumerate(results)}
    return {t.name: _single_count(by_index.get(i, {})) for i, t in enumerate(device_types)}


async def _minute_counts(
    client: InfluxClient, device_types: Sequence[DeviceType]
) -> dict[str, tuple[int, int]]:
    """Per type: readings in the last minute and dead letters in the last hour (both cheap)."""
    readings = await _window_counts(client, device_types, "1m")
    deadletters: dict[str, int] = {}
    for row in series_rows(await _run(client, query.deadletter_count_statement(_rp(client)))):
        name = str(row.get("device_type", ""))
        deadletters[name] = deadletters.get(name, 0) + int(row.get("sum") or 0)
    return {t.name: (readings[t.name], deadletters.get(t.name, 0)) for t in device_types}


async def fleet_counts(client: InfluxClient, device_types: Sequence[DeviceType]) -> dict[str, TypeCounts]:
    """Readings (last minute, last hour) and dead letters (last hour) per type, uncached."""
    minute = await _minute_counts(client, device_types)
    hour = await _window_counts(client, device_types, "1h")
    return {
        t.name: TypeCounts(
            readings_last_minute=minute[t.name][0],
            readings_last_hour=hour[t.name],
            deadlettered_last_hour=minute[t.name][1],
        )
        for t in device_types
    }
