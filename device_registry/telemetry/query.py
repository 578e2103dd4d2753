"""Telemetry queries: parameter validation and InfluxQL building, pure functions only.

Nothing a client sends reaches InfluxQL unvalidated:

- the measurement is a catalogue device type, checked and quoted;
- fields are catalogue fields of that type (anything else is a ``QueryError``
  → 422), quoted; the aggregate function and fill mode come from fixed tables;
- the device id is validated with the topic rules *and* sent as an InfluxQL
  bind parameter (``$device_id``), so it is never spliced into the query text;
- tag keys to group or filter by match a strict identifier pattern and are
  quoted; tag filter values are bind parameters (``$tag_0``…); a time zone must
  be a name of the tz database;
- times are parsed here (RFC 3339 with an offset, or epoch milliseconds) into
  integers that we format ourselves (``…ms`` literals); every range is bounded
  (start < end, years 2000-2100) and every response is bounded in points.

The functions return ``Statement`` objects (text + bind parameters); the
service module runs them. Keeping the builder pure lets the unit tests (and
hypothesis) cover every branch without a server.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
import time
import types
import typing
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, TypeVar

import orjson

from iotfleet.catalogue import DEVICE_TYPES, DeviceType
from iotfleet.catalogue.base import MAX_TS_MS, MIN_TS_MS
from iotfleet.influx import quote_identifier, quote_string
from iotfleet.topics import check_device_id, check_device_type

# --- limits --------------------------------------------------------------------

DEFAULT_RAW_LIMIT = 1_000
MAX_RAW_LIMIT = 10_000
MAX_BUCKETS = 10_000
"""Most buckets one aggregate series may have (a 7-day range at 1 min is 10,080: too many)."""
MAX_AGGREGATE_POINTS = 100_000
"""Most rows (buckets x groups) one type aggregate may return."""
MAX_EXPORT_ROWS = 1_000_000
"""Most rows one CSV export streams; larger ranges get a 422 asking for a narrower one."""
EXPORT_PAGE_ROWS = 10_000
DEFAULT_RANGE_MS = 3_600_000
"""Without ``start``, a query covers the hour before ``end``."""
MIN_EVERY_MS = 1_000
MAX_EVERY_MS = 366 * 86_400_000

NICE_EVERY = ("1s", "5s", "10s", "30s", "1m", "5m", "10m", "15m", "30m", "1h", "3h", "6h", "12h", "1d", "7d")
"""Intervals suggested when a request asks for too many points."""

META_FIELDS = ("seq",)
"""Stored alongside the catalogue fields (an integer per reading); queryable like them."""

DEVICE_TAG = "device_id"
DEADLETTER_MEASUREMENT = "deadletters"

_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""Tag keys to group by: the registry's tag-key alphabet (quoted in the query all the same)."""
_DURATION_RE = re.compile(r"^([0-9]{1,9})(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# RFC 3339 date-time with a mandatory offset. A space in the sign position is a '+'
# that was not percent-encoded in the query string ("…T14:00:00+02:00" arrives as
# "…T14:00:00 02:00"): that is unambiguous, so it is accepted rather than rejected.
_RFC3339_RE = re.compile(
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.(?P<frac>[0-9]{1,9}))?"
    r"(?P<tz>[Zz]|[+\- ][0-9]{2}:[0-9]{2})$"
)
_DIGITS_RE = re.compile(r"^[0-9]+$")
_RELATIVE_RE = re.compile(r"^(?:now)?(?:-(?P<ago>[0-9]{1,9}(?:ms|s|m|h|d|w)))?$")


class QueryError(ValueError):
    """A request parameter is invalid: answered as a 4xx problem naming the parameter."""

    def __init__(self, detail: str, *, param: str, status: int = 422, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.status = status
        self.extra = extra


# --- field kinds from the catalogue ----------------------------------------------------


class FieldKind(StrEnum):
    NUMBER = "number"
    BOOLEAN = "boolean"
    STRING = "string"


def _kind_of(annotation: Any) -> FieldKind:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind_of(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else FieldKind.STRING
    if origin is Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, bool) for v in values):
            return FieldKind.BOOLEAN
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return FieldKind.NUMBER
        return FieldKind.STRING
    if annotation is bool:
        return FieldKind.BOOLEAN
    if annotation in (int, float):
        return FieldKind.NUMBER
    return FieldKind.STRING


def field_kinds(device_type: DeviceType) -> dict[str, FieldKind]:
    """Every queryable field of a type with its kind: catalogue fields, then ``seq``."""
    model = device_type.reading
    kinds = {name: _kind_of(model.model_fields[name].annotation) for name in device_type.fields}
    for meta in META_FIELDS:
        kinds.setdefault(meta, FieldKind.NUMBER)
    return kinds


def resolve_type(name: str) -> DeviceType:
    """The catalogue type ``name``; QueryError 404 if there is none."""
    try:
        check_device_type(name)
    except ValueError:
        raise QueryError(f"invalid device type {name!r}", param="type", status=404) from None
    device_type = DEVICE_TYPES.get(name)
    if device_type is None:
        known = ", ".join(DEVICE_TYPES)
        raise QueryError(f"unknown device type {name!r} (known: {known})", param="type", status=404)
    return device_type


def validate_device_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except ValueError as exc:
        raise QueryError(str(exc), param="device_id") from None


def parse_fields(
    raw: str | Sequence[str] | None, device_type: DeviceType, *, default: Sequence[str] | None = None
) -> list[str]:
    """Fields from ``fields=a,b`` (or repeated ``fields=``), each checked against the catalogue.

    Without any, every catalogue field of the type (``default`` overrides that).
    Duplicates are dropped, order kept.
    """
    kinds = field_kinds(device_type)
    items: list[str] = []
    values = [raw] if isinstance(raw, str) else list(raw or [])
    for value in values:
        # Only spaces are trimmed: a newline or other control character makes the name unknown (422).
        items.extend(part.strip(" ") for part in value.split(",") if part.strip(" "))
    if not items:
        return list(default if default is not None else device_type.fields)
    unknown = [name for name in items if name not in kinds]
    if unknown:
        shown = ", ".join(repr(name[:64]) for name in unknown[:5])
        raise QueryError(
            f"unknown field(s) {shown} for device type {device_type.name!r}; known: {', '.join(kinds)}",
            param="fields",
        )
    return list(dict.fromkeys(items))


# --- time ------------------------------------------------------------------------------


def parse_duration_ms(text: str, *, param: str) -> int:
    """``90s``, ``1m``, ``6h``, ``1d``, ``2w``, ``500ms`` → milliseconds."""
    match = _DURATION_RE.fullmatch(text.strip(" "))
    if not match:
        raise QueryError(
            f"invalid duration {text[:40]!r}: a positive integer and a unit (ms, s, m, h, d, w), e.g. 1m",
            param=param,
        )
    value = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if value <= 0:
        raise QueryError(f"{param} must be positive", param=param)
    return value


def format_duration(ms: int) -> str:
    """The shortest exact InfluxQL-style spelling of ``ms`` (60000 → ``1m``)."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_time(text: str, *, param: str, now_ms: int) -> int:
    """A time bound → epoch ms.

    Accepted: epoch milliseconds (digits), RFC 3339 with an offset (``Z``, ``+02:00``;
    fractions of a second are truncated to the millisecond), ``now`` and relative
    ``-1h`` / ``now-15m``. A time without an offset is refused: guessing the
    server's zone would silently shift the range.
    """
    value = text.strip(" ")
    if not value:
        raise QueryError(f"{param} is empty", param=param)
    if _DIGITS_RE.fullmatch(value):
        if len(value) > 15:
            raise QueryError(f"{param} {value[:20]!r} is out of range", param=param)
        ms = int(value)
        if not MIN_TS_MS <= ms <= MAX_TS_MS:
            raise QueryError(
                f"{param} {ms} is not epoch milliseconds between 2000 and 2100"
                " (seconds or nanoseconds given by mistake?)",
                param=param,
            )
        return ms
    relative = _RELATIVE_RE.fullmatch(value)
    if relative:
        ago = relative.group("ago")
        return now_ms - (parse_duration_ms(ago, param=param) if ago else 0)
    match = _RFC3339_RE.fullmatch(value)
    if not match:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?", value):
            raise QueryError(
                f"{param} {value!r} has no UTC offset; add 'Z' or e.g. '+02:00' (RFC 3339)", param=param
            )
        raise QueryError(
            f"{param} {value[:40]!r} is not an RFC 3339 time (2026-11-27T14:00:00Z,"
            " 2026-11-27T15:00:00+01:00), epoch milliseconds, 'now' or a relative '-1h'",
            param=param,
        )
    tz = match.group("tz")
    offset = "+00:00" if tz in ("Z", "z") else ("+" + tz[1:] if tz[0] == " " else tz)
    frac = (match.group("frac") or "").ljust(3, "0")[:3]
    try:
        moment = datetime.fromisoformat(f"{match.group('date')}T{match.group('time')}.{frac}{offset}")
    except ValueError as exc:
        raise QueryError(f"{param} {value!r} is not a valid date-time: {exc}", param=param) from None
    # Offsets beyond ±23:59 are refused by fromisoformat above; integer arithmetic keeps ms exact.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    ms = (moment - epoch) // timedelta(milliseconds=1)
    if not MIN_TS_MS <= ms <= MAX_TS_MS:
        raise QueryError(f"{param} {value!r} is outside the years 2000-2100", param=param)
    return ms


def format_time(ms: int) -> str:
    """Epoch ms → RFC 3339 UTC with milliseconds (``2026-11-27T14:00:00.000Z``)."""
    seconds, millis = divmod(ms, 1000)
    # time.gmtime + strftime: half the cost of datetime arithmetic, and called per row.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open range [start, end) in epoch ms."""

    start_ms: int
    end_ms: int

    @property
    def span_ms(self) -> int:
        return self.end_ms - self.start_ms

    def where(self) -> str:
        # Integers we computed ourselves, not client text.
        return f"time >= {int(self.start_ms)}ms AND time < {int(self.end_ms)}ms"


def parse_range(
    start: str | None, end: str | None, *, now_ms: int, default_span_ms: int = DEFAULT_RANGE_MS
) -> TimeRange:
    """``start``/``end`` → a bounded TimeRange; defaults: end = now, start = end - 1 h."""
    end_ms = parse_time(end, param="end", now_ms=now_ms) if end is not None else now_ms
    start_ms = (
        parse_time(start, param="start", now_ms=now_ms) if start is not None else end_ms - default_span_ms
    )
    if start_ms >= end_ms:
        raise QueryError(
            f"start ({format_time(start_ms)}) must be before end ({format_time(end_ms)})", param="start"
        )
    return TimeRange(start_ms, end_ms)


# --- aggregates ------------------------------------------------------------------------


class AggregateFn(StrEnum):
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    SUM = "sum"
    COUNT = "count"
    LAST = "last"


class Fill(StrEnum):
    NONE = "none"
    NULL = "null"
    PREVIOUS = "previous"


_FN_SQL = {fn: fn.value.upper() for fn in AggregateFn}
FN_KINDS: dict[AggregateFn, frozenset[FieldKind]] = {
    AggregateFn.MEAN: frozenset({FieldKind.NUMBER}),
    AggregateFn.SUM: frozenset({FieldKind.NUMBER}),
    # InfluxDB 1.x orders booleans for MIN/MAX (false < true); strings it cannot.
    AggregateFn.MIN: frozenset({FieldKind.NUMBER, FieldKind.BOOLEAN}),
    AggregateFn.MAX: frozenset({FieldKind.NUMBER, FieldKind.BOOLEAN}),
    AggregateFn.COUNT: frozenset(FieldKind),
    AggregateFn.LAST: frozenset(FieldKind),
}


E = TypeVar("E", bound=StrEnum)


def parse_enum(cls: type[E], value: str, *, param: str) -> E:
    try:
        return cls(value.strip(" ").lower())
    except ValueError:
        allowed = "|".join(member.value for member in cls)
        raise QueryError(f"invalid {param} {value[:40]!r}; one of {allowed}", param=param) from None


def check_fn_fields(fn: AggregateFn, fields: Sequence[str], device_type: DeviceType) -> None:
    kinds = field_kinds(device_type)
    bad = [name for name in fields if kinds[name] not in FN_KINDS[fn]]
    if bad:
        raise QueryError(
            f"fn={fn.value} does not apply to {', '.join(f'{b} ({kinds[b].value})' for b in bad)};"
            " use count or last for those fields",
            param="fn",
        )


def suggest_every(span_ms: int, max_buckets: int) -> str:
    """The smallest 'nice' interval giving at most ``max_buckets`` buckets over ``span_ms``."""
    needed = math.ceil(span_ms / max_buckets)
    for nice in NICE_EVERY:
        ms = parse_duration_ms(nice, param="every")
        if ms >= needed and bucket_count(TimeRange(0, span_ms), ms) <= max_buckets:
            return nice
    # Beyond the list: whole days, enough of them for the budget.
    days = max(1, math.ceil(needed / _UNIT_MS["d"]))
    while bucket_count(TimeRange(0, span_ms), days * _UNIT_MS["d"]) > max_buckets:
        days += 1
    return format_duration(days * _UNIT_MS["d"])


def bucket_count(time_range: TimeRange, every_ms: int) -> int:
    """Buckets InfluxDB emits: GROUP BY time() aligns buckets to the epoch."""
    first = time_range.start_ms // every_ms
    last = (time_range.end_ms - 1) // every_ms
    return last - first + 1


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def parse_tz(value: str | None) -> str | None:
    """An IANA time zone to align buckets to (``Europe/Paris``), or None for UTC alignment.

    Only names of the tz database are accepted (the set is fixed, so the name
    cannot carry anything else into the query; it is quoted all the same).
    """
    if value is None or value.strip(" ") in ("", "UTC", "Z"):
        return None
    name = value.strip(" ")
    if name not in _time_zones():
        raise QueryError(
            f"unknown time zone {value[:40]!r}; an IANA name such as Europe/Paris or America/New_York",
            param="tz",
        )
    return name


def parse_every(
    text: str, time_range: TimeRange, *, max_buckets: int = MAX_BUCKETS, tz: str | None = None
) -> int:
    every_ms = parse_duration_ms(text, param="every")
    if not MIN_EVERY_MS <= every_ms <= MAX_EVERY_MS:
        raise QueryError(f"every must be between 1s and 366d, got {text!r}", param="every")
    # Buckets aligned to a zone's local time are shifted by its offset: at most one more.
    buckets = bucket_count(time_range, every_ms) + (1 if tz is not None else 0)
    if buckets > max_buckets:
        # Bucket alignment can add one bucket: suggest against the span plus one interval.
        suggestion = suggest_every(time_range.span_ms + every_ms, max_buckets)
        raise QueryError(
            f"every={text} over {format_duration(time_range.span_ms)} gives {buckets} points per series,"
            f" more than {max_buckets}; use a coarser every (e.g. every={suggestion}) or a shorter range",
            param="every",
            status=422,
            suggested_every=suggestion,
            max_points=max_buckets,
        )
    return every_ms


# --- pagination cursor -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: at ``time_ms``, after ``skip`` rows stamped exactly then.

    Time alone would be enough for one series, but a device whose optional tags
    changed has several series and so may have two rows at one instant; ``skip``
    keeps the paging exact in that case too.
    """

    time_ms: int
    skip: int = 0

    def encode(self) -> str:
        raw = orjson.dumps({"t": self.time_ms, "k": self.skip})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            if len(token) > 200:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = orjson.loads(raw)
            time_ms, skip = data["t"], data["k"]
            if type(time_ms) is not int or type(skip) is not int:  # bool is an int subclass
                raise ValueError("not integers")
            if not (MIN_TS_MS <= time_ms <= MAX_TS_MS and 0 <= skip <= 10_000_000):
                raise ValueError("out of range")
        except (ValueError, TypeError, KeyError, binascii.Error, orjson.JSONDecodeError):
            raise QueryError(
                "invalid cursor; pass the next_cursor of the previous page", param="cursor"
            ) from None
        return cls(time_ms, skip)


def next_cursor(previous: Cursor | None, times: Sequence[int]) -> Cursor:
    """The cursor after a page whose rows are stamped ``times`` (ascending, not empty)."""
    last = times[-1]
    same = 0
    for stamp in reversed(times):
        if stamp != last:
            break
        same += 1
    if previous is not None and previous.time_ms == last and same == len(times):
        same += previous.skip
    return Cursor(last, same)


# --- statements ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """InfluxQL text (one or more ``;``-separated statements) and its bind parameters."""

    text: str
    params: Mapping[str, Any] = field(default_factory=dict)


def source(measurement: str, retention_policy: str) -> str:
    return f"{quote_identifier(retention_policy)}.{quote_identifier(measurement)}"


def _device_filter(device_id: str) -> tuple[str, dict[str, str]]:
    return f"{quote_identifier(DEVICE_TAG)} = $device_id", {"device_id": validate_device_id(device_id)}


def _field_list(fields: Sequence[str]) -> str:
    return ", ".join(quote_identifier(name) for name in fields)


LATEST_WINDOWS_MS: tuple[int | None, ...] = (3_600_000, 86_400_000, None)
"""How far back ``latest`` looks, widening only for fields not found yet (None: no bound).

A lower time bound lets InfluxDB skip every older shard: over a week of 1 Hz
data the bounded query is several times faster than the unbounded one
(bench/queries.py), and a device that reports at all usually did so within
the hour. A silent device costs one or two more (narrowing) queries.
"""


def latest_statement(
    device_type: DeviceType, device_id: str, fields: Sequence[str], rp: str, *, since_ms: int | None = None
) -> Statement:
    """One statement per field: its newest value and that value's own time, since ``since_ms``.

    ``SELECT LAST(a), LAST(b)`` would lose each field's time (InfluxDB stamps
    several selectors with time 0) and ``SELECT *`` would miss a field absent
    from the newest point; ``LAST`` of a single field returns that field's
    newest point with its own time. No upper bound: readings stamped a little
    ahead by a device clock are the newest ones.
    """
    where, params = _device_filter(device_id)
    if since_ms is not None:
        where += f" AND time >= {int(since_ms)}ms"
    src = source(device_type.name, rp)
    text = "; ".join(f"SELECT LAST({quote_identifier(name)}) FROM {src} WHERE {where}" for name in fields)
    return Statement(text, params)


def raw_statement(
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    limit: int,
    cursor: Cursor | None,
    rp: str,
) -> Statement:
    """Raw points in time order, ``limit`` + 1 rows (the extra one tells if a next page exists)."""
    if not 1 <= limit <= MAX_RAW_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_RAW_LIMIT}", param="limit")
    where, params = _device_filter(device_id)
    start = time_range.start_ms
    skip = 0
    if cursor is not None:
        if not time_range.start_ms <= cursor.time_ms < time_range.end_ms:
            raise QueryError("cursor does not belong to this time range", param="cursor")
        start, skip = cursor.time_ms, cursor.skip
    text = (
        f"SELECT {_field_list(fields)} FROM {source(device_type.name, rp)}"
        f" WHERE {where} AND {TimeRange(start, time_range.end_ms).where()}"
        f" ORDER BY time ASC LIMIT {int(limit) + 1}"
    )
    if skip:
        text += f" OFFSET {int(skip)}"
    return Statement(text, params)


def count_statement(
    device_type: DeviceType, device_id: str, fields: Sequence[str], time_range: TimeRange, rp: str
) -> Statement:
    """Per-field counts over the range (bounds a CSV export before it starts)."""
    where, params = _device_filter(device_id)
    selects = ", ".join(f"COUNT({quote_identifier(name)}) AS {quote_identifier(name)}" for name in fields)
    text = f"SELECT {selects} FROM {source(device_type.name, rp)} WHERE {where} AND {time_range.where()}"
    return Statement(text, params)


def _aggregate_selects(fn: AggregateFn, fields: Sequence[str]) -> str:
    return ", ".join(
        f"{_FN_SQL[fn]}({quote_identifier(name)}) AS {quote_identifier(name)}" for name in fields
    )


def aggregate_statement(
    device_type: DeviceType,
    device_id: str,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    every_ms: int,
    fn: AggregateFn,
    fill: Fill,
    rp: str,
    tz: str | None = None,
) -> Statement:
    """Downsampled series of one device: one row per ``every`` bucket (aligned to ``tz`` if given)."""
    check_fn_fields(fn, fields, device_type)
    where, params = _device_filter(device_id)
    text = (
        f"SELECT {_aggregate_selects(fn, fields)} FROM {source(device_type.name, rp)}"
        f" WHERE {where} AND {time_range.where()}"
        f" GROUP BY time({int(every_ms)}ms) fill({Fill(fill).value}){_tz_clause(tz)}"
    )
    return Statement(text, params)


def _tz_clause(tz: str | None) -> str:
    return "" if tz is None else f" tz({quote_string(parse_tz(tz) or 'UTC')})"


def parse_group_by(value: str | None) -> str | None:
    """None (one series for the whole type), ``device`` (per device id) or a tag key."""
    if value is None or value.strip(" ") in ("", "none"):
        return None
    text = value.strip(" ")
    if text in ("device", DEVICE_TAG):
        return DEVICE_TAG
    if text.startswith("tag:"):
        text = text[4:]
    if not _TAG_KEY_RE.fullmatch(text) or text == "time":
        raise QueryError(
            f"invalid group_by {value[:40]!r}: 'device', 'none' or a tag key"
            " (letters, digits, '_', '.', ':', '-')",
            param="group_by",
        )
    return text


MAX_TAG_FILTERS = 10


def parse_tag_filters(values: Sequence[str] | None) -> list[tuple[str, str]]:
    """``tag=key=value`` filters (the registry's device-list syntax); the value is bound, never spliced."""
    filters = []
    for raw in values or []:
        key, sep, value = raw.partition("=")
        if not sep or not _TAG_KEY_RE.fullmatch(key) or key == "time":
            raise QueryError(
                f"tag filter {raw[:60]!r} must be key=value with a key of letters, digits, '_', '.', ':', '-'",
                param="tag",
            )
        if len(value) > 256 or "\x00" in value:
            raise QueryError("a tag filter value is at most 256 characters, without NUL", param="tag")
        filters.append((key, value))
    if len(filters) > MAX_TAG_FILTERS:
        raise QueryError(f"at most {MAX_TAG_FILTERS} tag filters", param="tag")
    return filters


MAX_RESOLVED_DEVICES = 10_000
"""Devices a registry-tag filter or grouping may resolve to in one request (see device_set_condition)."""


def device_set_condition(device_ids: Sequence[str], params: dict[str, str], prefix: str) -> str:
    """``device_id`` equal to one of ``device_ids``: a balanced OR tree of bound parameters.

    Balanced, not a flat chain: InfluxDB 1.6 evaluates ``a OR b OR c …`` (a
    left-deep tree) in quadratic time: 10,000 ids exceeded its 60 s query
    timeout, the same ids as a balanced tree cost ~1 s of planning
    (docs/benchmarks.md, "Registry tags in telemetry queries"). Each id is a
    bind parameter ``$<prefix><i>``, never query text.
    """
    if not device_ids:
        # No device has the tag: a condition no point satisfies (device ids are never empty).
        params[f"{prefix}none"] = ""
        return f"{quote_identifier(DEVICE_TAG)} = ${prefix}none"
    names = []
    for device_id in device_ids:
        name = f"{prefix}{len(params)}"
        params[name] = validate_device_id(device_id)
        names.append(f"{quote_identifier(DEVICE_TAG)} = ${name}")
    while len(names) > 1:
        pairs = [f"({names[i]} OR {names[i + 1]})" for i in range(0, len(names) - 1, 2)]
        names = pairs + ([names[-1]] if len(names) % 2 else [])
    return names[0]


def type_aggregate_statement(
    device_type: DeviceType,
    fields: Sequence[str],
    time_range: TimeRange,
    *,
    every_ms: int,
    fn: AggregateFn,
    fill: Fill,
    group_by: str | None,
    max_groups: int,
    rp: str,
    tags: Sequence[tuple[str, str]] = (),
    tz: str | None = None,
    device_ids: Sequence[str] | None = None,
    params: dict[str, str] | None = None,
    param_prefix: str = "",
) -> Statement:
    """Downsampled series across a whole type, optionally one series per device or tag value.

    ``tags`` restricts it to points whose tags have those values (all of them);
    ``device_ids`` (registry tags resolved to devices) to those devices' points.
    ``SLIMIT max_groups + 1`` bounds the work; the service refuses the answer if
    that extra series came back (too many groups for the point budget). Several
    statements sent in one request share ``params``, each with its ``param_prefix``.
    """
    check_fn_fields(fn, fields, device_type)
    kinds = field_kinds(device_type)
    if group_by is not None and group_by in kinds:
        raise QueryError(f"group_by {group_by!r} is a field, not a tag", param="group_by")
    where = time_range.where()
    params = {} if params is None else params
    for i, (key, value) in enumerate(tags):
        if key in kinds:
            raise QueryError(f"tag filter {key!r} is a field, not a tag", param="tag")
        # InfluxQL compares a tag with a string: the value goes in as bind parameter $tag_i.
        where += f" AND {quote_identifier(key)} = ${param_prefix}tag_{i}"
        params[f"{param_prefix}tag_{i}"] = value
    if device_ids is not None:
        where += f" AND {device_set_condition(device_ids, params, f'{param_prefix}d')}"
    group = f"time({int(every_ms)}ms)"
    if group_by is not None:
        group += f", {quote_identifier(group_by)}"
    text = (
        f"SELECT {_aggregate_selects(fn, fields)} FROM {source(device_type.name, rp)}"
        f" WHERE {where} GROUP BY {group} fill({Fill(fill).value})"
    )
    if group_by is not None:
        text += f" SLIMIT {int(max_groups) + 1}"
    return Statement(text + _tz_clause(tz), params)


def summary_field(device_type: DeviceType) -> str:
    """The field counted as 'one reading': the first required one (every reading has it)."""
    for name in device_type.fields:
        if device_type.reading.model_fields[name].is_required():
            return name
    return device_type.fields[0]


def readings_count_statement(device_types: Sequence[DeviceType], rp: str, *, window: str = "1h") -> Statement:
    """Readings per type in the last ``window`` (``1m`` or ``1h``): one statement per type, in order.

    No upper time bound: readings stamped slightly ahead (device clocks) still count.
    """
    if window not in ("1m", "1h"):
        raise ValueError(f"unsupported window {window!r}")
    parts = []
    for device_type in device_types:
        counted = quote_identifier(summary_field(device_type))
        src = source(device_type.name, rp)
        parts.append(f"SELECT COUNT({counted}) FROM {src} WHERE time > now() - {window}")
    return Statement("; ".join(parts))


def device_deadletters_statement(device_id: str, time_range: TimeRange, rp: str, *, limit: int) -> Statement:
    """A device's newest dead-letter records (time, reason, the first field-level errors), newest first."""
    if not 1 <= limit <= MAX_RAW_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_RAW_LIMIT}", param="limit")
    where, params = _device_filter(device_id)
    text = (
        f"SELECT {quote_identifier('count')}, {quote_identifier('reason')}, {quote_identifier('errors')},"
        f" {quote_identifier('errors_cut')}"
        f" FROM {source(DEADLETTER_MEASUREMENT, rp)} WHERE {where} AND {time_range.where()}"
        f" ORDER BY time DESC LIMIT {int(limit)}"
    )
    return Statement(text, params)


def deadletter_count_statement(rp: str) -> Statement:
    """Dead letters per type in the last hour (measurement written by the ingest)."""
    return Statement(
        f"SELECT SUM({quote_identifier('count')}) FROM {source(DEADLETTER_MEASUREMENT, rp)}"
        f" WHERE time > now() - 1h GROUP BY {quote_identifier('device_type')}"
    )
