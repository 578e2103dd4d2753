"""The telemetry query builder: parameter validation and the exact InfluxQL it produces.

The hypothesis tests feed arbitrary text (quotes, semicolons, regexes, newlines,
NUL, unicode) into every client-controlled parameter: the builder either
refuses it with a ``QueryError`` or produces a statement from a fixed grammar
in which client text appears only as a catalogue field name, a checked tag key
(quoted) or a bound parameter.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from device_registry.telemetry import query as q
from device_registry.telemetry.query import AggregateFn, Cursor, Fill, QueryError, TimeRange
from iotfleet.catalogue import DEVICE_TYPES, get_device_type

THERMOSTAT = get_device_type("thermostat")
PLUG = get_device_type("smart_plug")
AIR = get_device_type("air_quality")
NOW = 1_795_766_400_000  # 2026-11-27T08:00:00Z
T0 = 1_795_683_600_000  # 2026-11-26T09:00:00Z
RANGE = TimeRange(T0, T0 + 600_000)

NASTY = [
    "'",
    '"',
    "\\",
    ";",
    "; DROP DATABASE iotfleet",
    '"; DROP MEASUREMENT "thermostat',
    "' OR '1'='1",
    "temperature_c\nDROP DATABASE iotfleet",
    "temperature_c\r",
    "/.*/",
    "=~ /.*/",
    "temperature_c) FROM thermostat; DROP SERIES FROM thermostat; SELECT (x",
    "\x00",
    "*",
    '"temperature_c"',
    "temperature_c AS x",
    "time",
    "ＤＲＯＰ",
    "$device_id",
]

nasty_text = st.one_of(st.sampled_from(NASTY), st.text(max_size=30))


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1795683600000", 1_795_683_600_000),
        ("2026-11-26T09:00:00Z", 1_795_683_600_000),
        ("2026-11-26T09:00:00z", 1_795_683_600_000),
        ("2026-11-26t09:00:00+00:00", 1_795_683_600_000),
        ("2026-11-26T11:00:00+02:00", 1_795_683_600_000),
        ("2026-11-26T11:00:00 02:00", 1_795_683_600_000),  # '+' decoded to ' ' by a query string
        ("2026-11-26T03:30:00-05:30", 1_795_683_600_000),
        ("2026-11-26 09:00:00Z", 1_795_683_600_000),
        ("2026-11-26T09:00:00.5Z", 1_795_683_600_500),
        ("2026-11-26T09:00:00.123456789Z", 1_795_683_600_123),
        ("2026-11-26T23:00:00+14:00", 1_795_683_600_000),
        ("now", NOW),
        ("-1h", NOW - 3_600_000),
        ("now-15m", NOW - 900_000),
        ("-2w", NOW - 14 * 86_400_000),
        ("  2026-11-26T09:00:00Z  ", 1_795_683_600_000),
    ],
)
def test_parse_time_accepts_rfc3339_epoch_ms_and_relative(text: str, expected: int) -> None:
    assert q.parse_time(text, param="start", now_ms=NOW) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("2026-11-26T09:00:00", "offset"),
        ("2026-11-26T09:00", "offset"),
        ("2026-11-26", "RFC 3339"),
        ("1795683600", "seconds"),  # seconds, not ms
        ("1795683600000000000", "out of range"),  # ns
        ("2026-13-26T09:00:00Z", "valid"),
        ("2026-11-26T09:00:00+25:00", "valid"),
        ("1999-12-31T23:59:59Z", "2000-2100"),
        ("", "empty"),
        ("yesterday", "RFC 3339"),
        ("-1y", "RFC 3339"),
        ("-0s", "positive"),
        ("now+1h", "RFC 3339"),
        ("١٢٣", "RFC 3339"),  # unicode digits are not epoch ms
        ("2026-11-26T09:00:00Z; DROP DATABASE x", "RFC 3339"),
    ],
)
def test_parse_time_refuses_naive_and_malformed(text: str, needle: str) -> None:
    with pytest.raises(QueryError) as info:
        q.parse_time(text, param="start", now_ms=NOW)
    assert needle in info.value.detail
    assert info.value.param == "start" and info.value.status == 422


def test_parse_range_defaults_and_order() -> None:
    assert q.parse_range(None, None, now_ms=NOW) == TimeRange(NOW - 3_600_000, NOW)
    assert q.parse_range(None, str(T0), now_ms=NOW) == TimeRange(T0 - 3_600_000, T0)
    with pytest.raises(QueryError, match="before end"):
        q.parse_range(str(T0), str(T0), now_ms=NOW)
    with pytest.raises(QueryError) as info:
        q.parse_range("now", "-1h", now_ms=NOW)
    assert info.value.param == "start"


def test_format_time_is_rfc3339_utc_with_ms() -> None:
    assert q.format_time(1_795_683_600_123) == "2026-11-26T09:00:00.123Z"
    assert q.format_time(1_795_683_600_000) == "2026-11-26T09:00:00.000Z"
    parsed = datetime.fromisoformat(q.format_time(T0).replace("Z", "+00:00"))
    assert parsed == datetime.fromtimestamp(T0 / 1000, UTC)


@given(st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000))
def test_format_and_parse_time_round_trip(ms: int) -> None:
    assert q.parse_time(q.format_time(ms), param="start", now_ms=NOW) == ms


@given(st.text(max_size=40))
@example("2026-11-26T09:00:00Z\n; DROP DATABASE x")
def test_parse_time_only_ever_raises_query_error(text: str) -> None:
    try:
        value = q.parse_time(text, param="end", now_ms=NOW)
    except QueryError as error:
        assert error.param == "end"
    else:
        assert isinstance(value, int)


# --- fields, functions, durations -----------------------------------------------------------


def test_parse_fields() -> None:
    assert q.parse_fields(None, THERMOSTAT) == ["temperature_c", "humidity_pct", "setpoint_c", "mode"]
    assert q.parse_fields("mode, temperature_c", THERMOSTAT) == ["mode", "temperature_c"]
    assert q.parse_fields(["mode", "seq,mode"], THERMOSTAT) == ["mode", "seq"]
    assert q.parse_fields([" , "], THERMOSTAT, default=["mode"]) == ["mode"]
    with pytest.raises(QueryError) as info:
        q.parse_fields("temperature_c,co2_ppm", THERMOSTAT)
    assert "'co2_ppm'" in info.value.detail and info.value.param == "fields" and info.value.status == 422


def test_field_kinds_follow_the_catalogue() -> None:
    assert q.field_kinds(THERMOSTAT) == {
        "temperature_c": q.FieldKind.NUMBER,
        "humidity_pct": q.FieldKind.NUMBER,
        "setpoint_c": q.FieldKind.NUMBER,
        "mode": q.FieldKind.STRING,
        "seq": q.FieldKind.NUMBER,
    }
    assert q.field_kinds(PLUG)["relay_on"] is q.FieldKind.BOOLEAN
    assert q.field_kinds(AIR)["co2_ppm"] is q.FieldKind.NUMBER
    for device_type in DEVICE_TYPES.values():  # every type's fields are classified
        assert set(q.field_kinds(device_type)) == {*device_type.fields, "seq"}


@pytest.mark.parametrize(
    ("fn", "fields", "ok"),
    [
        (AggregateFn.MEAN, ["temperature_c"], True),
        (AggregateFn.MEAN, ["mode"], False),
        (AggregateFn.SUM, ["mode"], False),
        (AggregateFn.MIN, ["mode"], False),
        (AggregateFn.COUNT, ["mode"], True),
        (AggregateFn.LAST, ["mode"], True),
    ],
)
def test_functions_apply_to_field_kinds(fn: AggregateFn, fields: list[str], ok: bool) -> None:
    if ok:
        q.check_fn_fields(fn, fields, THERMOSTAT)
    else:
        with pytest.raises(QueryError, match="count or last"):
            q.check_fn_fields(fn, fields, THERMOSTAT)
    q.check_fn_fields(AggregateFn.MAX, ["relay_on"], PLUG)
    with pytest.raises(QueryError):
        q.check_fn_fields(AggregateFn.MEAN, ["relay_on"], PLUG)


def test_enums_and_durations() -> None:
    assert q.parse_enum(AggregateFn, "MEAN", param="fn") is AggregateFn.MEAN
    assert q.parse_enum(Fill, "previous", param="fill") is Fill.PREVIOUS
    with pytest.raises(QueryError, match="none\\|null\\|previous"):
        q.parse_enum(Fill, "linear", param="fill")
    assert q.parse_duration_ms("90s", param="every") == 90_000
    assert q.parse_duration_ms("2w", param="every") == 1_209_600_000
    assert q.format_duration(60_000) == "1m" and q.format_duration(90_000) == "90s"
    assert q.format_duration(86_400_000) == "1d" and q.format_duration(1_500) == "1500ms"
    for bad in ("1", "m", "1.5m", "-1m", "1M", "1 m", "1mo", "9999999999s"):
        with pytest.raises(QueryError):
            q.parse_duration_ms(bad, param="every")


def test_bucket_count_is_epoch_aligned() -> None:
    assert q.bucket_count(TimeRange(0, 60_000), 60_000) == 1
    assert q.bucket_count(TimeRange(0, 60_001), 60_000) == 2
    assert q.bucket_count(TimeRange(30_000, 90_000), 60_000) == 2  # straddles a minute boundary
    assert q.bucket_count(TimeRange(0, 86_400_000), 60_000) == 1440


def test_every_bounds_and_the_suggestion() -> None:
    day = TimeRange(T0, T0 + 86_400_000)
    assert q.parse_every("1m", day) == 60_000
    week = TimeRange(T0, T0 + 7 * 86_400_000)
    with pytest.raises(QueryError) as info:
        q.parse_every("1m", week)
    assert info.value.extra["suggested_every"] == "5m"
    assert "every=5m" in info.value.detail and "10080" in info.value.detail
    assert q.parse_every("5m", week) == 300_000
    year = TimeRange(T0, T0 + 365 * 86_400_000)
    with pytest.raises(QueryError) as info:
        q.parse_every("1s", year)
    assert info.value.extra["suggested_every"] == "1h"
    with pytest.raises(QueryError, match="between 1s and 366d"):
        q.parse_every("500ms", day)
    with pytest.raises(QueryError, match="between 1s and 366d"):
        q.parse_every("367d", day)


@given(span=st.integers(min_value=1, max_value=100 * 365 * 86_400_000), budget=st.integers(10, 20_000))
def test_the_suggested_every_fits_the_budget(span: int, budget: int) -> None:
    suggestion = q.suggest_every(span, budget)
    every = q.parse_duration_ms(suggestion, param="every")
    assert q.bucket_count(TimeRange(0, span), every) <= budget


# --- cursors ----------------------------------------------------------------------------------


def test_cursor_round_trip_and_garbage() -> None:
    cursor = Cursor(T0, 3)
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ("", "x", "not base64!", "e30", Cursor(T0, -1).encode(), Cursor(5, 0).encode()):
        with pytest.raises(QueryError) as info:
            Cursor.decode(bad)
        assert info.value.param == "cursor"
    import base64

    for payload in (b'{"t": true, "k": 0}', b'{"t": "1; DROP", "k": 0}', b"[1, 2]", b'{"t": 1.5e12, "k": 0}'):
        with pytest.raises(QueryError):
            Cursor.decode(base64.urlsafe_b64encode(payload).decode())


@given(st.text(max_size=120))
def test_cursor_decode_only_raises_query_error(token: str) -> None:
    try:
        Cursor.decode(token)
    except QueryError:
        pass


def test_next_cursor_counts_rows_at_the_last_instant() -> None:
    assert q.next_cursor(None, [1, 2, 3]) == Cursor(3, 1)
    assert q.next_cursor(None, [1, 3, 3]) == Cursor(3, 2)
    # A page entirely at the cursor's instant adds to its skip.
    assert q.next_cursor(Cursor(3, 2), [3, 3]) == Cursor(3, 4)
    assert q.next_cursor(Cursor(3, 2), [3, 4]) == Cursor(4, 1)


# --- statements (exact text) ----------------------------------------------------------------


def test_latest_statement() -> None:
    st_ = q.latest_statement(THERMOSTAT, "dev-1", ["temperature_c", "mode"], "raw")
    assert st_.text == (
        'SELECT LAST("temperature_c") FROM "raw"."thermostat" WHERE "device_id" = $device_id; '
        'SELECT LAST("mode") FROM "raw"."thermostat" WHERE "device_id" = $device_id'
    )
    assert st_.params == {"device_id": "dev-1"}
    st_ = q.latest_statement(THERMOSTAT, "dev-1", ["seq"], "raw", since_ms=T0)
    assert (
        st_.text
        == f'SELECT LAST("seq") FROM "raw"."thermostat" WHERE "device_id" = $device_id AND time >= {T0}ms'
    )


def test_raw_statement_with_and_without_cursor() -> None:
    st_ = q.raw_statement(THERMOSTAT, "dev-1", ["temperature_c"], RANGE, limit=10, cursor=None, rp="raw")
    assert st_.text == (
        'SELECT "temperature_c" FROM "raw"."thermostat" WHERE "device_id" = $device_id'
        f" AND time >= {T0}ms AND time < {T0 + 600_000}ms ORDER BY time ASC LIMIT 11"
    )
    st_ = q.raw_statement(
        THERMOSTAT, "dev-1", ["temperature_c"], RANGE, limit=10, cursor=Cursor(T0 + 5, 2), rp="raw"
    )
    assert st_.text.endswith(
        f"time >= {T0 + 5}ms AND time < {T0 + 600_000}ms ORDER BY time ASC LIMIT 11 OFFSET 2"
    )
    with pytest.raises(QueryError, match="time range"):
        q.raw_statement(THERMOSTAT, "d", ["mode"], RANGE, limit=10, cursor=Cursor(T0 - 1), rp="raw")
    with pytest.raises(QueryError, match="limit"):
        q.raw_statement(THERMOSTAT, "d", ["mode"], RANGE, limit=q.MAX_RAW_LIMIT + 1, cursor=None, rp="raw")


def test_aggregate_statements() -> None:
    st_ = q.aggregate_statement(
        THERMOSTAT, "dev-1", ["temperature_c", "humidity_pct"], RANGE,
        every_ms=60_000, fn=AggregateFn.MEAN, fill=Fill.PREVIOUS, rp="raw",
    )  # fmt: skip
    assert st_.text == (
        'SELECT MEAN("temperature_c") AS "temperature_c", MEAN("humidity_pct") AS "humidity_pct"'
        ' FROM "raw"."thermostat" WHERE "device_id" = $device_id'
        f" AND time >= {T0}ms AND time < {T0 + 600_000}ms GROUP BY time(60000ms) fill(previous)"
    )
    st_ = q.type_aggregate_statement(
        THERMOSTAT, ["mode"], RANGE, every_ms=300_000, fn=AggregateFn.LAST, fill=Fill.NONE,
        group_by="site", max_groups=20, rp="raw",
    )  # fmt: skip
    assert st_.text == (
        'SELECT LAST("mode") AS "mode" FROM "raw"."thermostat"'
        f' WHERE time >= {T0}ms AND time < {T0 + 600_000}ms GROUP BY time(300000ms), "site" fill(none) SLIMIT 21'
    )
    assert st_.params == {}
    st_ = q.type_aggregate_statement(
        THERMOSTAT, ["mode"], RANGE, every_ms=300_000, fn=AggregateFn.COUNT, fill=Fill.NULL,
        group_by=None, max_groups=20, rp="raw",
    )  # fmt: skip
    assert "SLIMIT" not in st_.text and st_.text.endswith("GROUP BY time(300000ms) fill(null)")


def test_time_zones_for_bucket_alignment() -> None:
    assert q.parse_tz(None) is None and q.parse_tz("UTC") is None and q.parse_tz("") is None
    assert q.parse_tz("Europe/Paris") == "Europe/Paris"
    for bad in [*NASTY, "Mars/Olympus", "europe/paris", "Europe/Paris'); DROP DATABASE x; --"]:
        with pytest.raises(QueryError) as info:
            q.parse_tz(bad)
        assert info.value.param == "tz"
    st_ = q.aggregate_statement(
        THERMOSTAT, "dev-1", ["temperature_c"], RANGE, every_ms=86_400_000, fn=AggregateFn.MAX,
        fill=Fill.NULL, rp="raw", tz="Asia/Kolkata",
    )  # fmt: skip
    assert st_.text.endswith("GROUP BY time(86400000ms) fill(null) tz('Asia/Kolkata')")
    st_ = q.type_aggregate_statement(
        THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
        group_by="site", max_groups=5, rp="raw", tz="America/New_York",
    )  # fmt: skip
    assert st_.text.endswith("fill(none) SLIMIT 6 tz('America/New_York')")
    # A zone may shift the alignment by one bucket: the bound counts it.
    day = TimeRange(T0, T0 + 86_400_000)
    assert q.parse_every("1m", day, max_buckets=1440) == 60_000
    with pytest.raises(QueryError):
        q.parse_every("1m", day, max_buckets=1440, tz="Asia/Kolkata")


@given(nasty_text)
def test_tz_is_refused_or_a_known_zone(text: str) -> None:
    try:
        zone = q.parse_tz(text)
    except QueryError:
        return
    assert zone is None or re.fullmatch(r"[A-Za-z0-9_+/-]+", zone)


def test_group_by() -> None:
    assert q.parse_group_by(None) is None and q.parse_group_by("none") is None
    assert q.parse_group_by("device") == "device_id" == q.parse_group_by("device_id")
    assert q.parse_group_by("site") == "site" == q.parse_group_by("tag:site")
    assert q.parse_group_by("zone.floor:2-b") == "zone.floor:2-b"  # the registry's tag-key alphabet
    for bad in NASTY:
        with pytest.raises(QueryError):
            q.parse_group_by(bad)
    with pytest.raises(QueryError, match="is a field"):
        q.type_aggregate_statement(
            THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
            group_by="temperature_c", max_groups=1, rp="raw",
        )  # fmt: skip


def test_tag_filters_are_bound_values_on_checked_keys() -> None:
    assert q.parse_tag_filters(None) == []
    assert q.parse_tag_filters(["site=paris", "floor=2=b", "zone.x:y-z="]) == [
        ("site", "paris"),
        ("floor", "2=b"),
        ("zone.x:y-z", ""),
    ]
    for bad in ["site", "=paris", "si te=x", "time=1", 'site"=x', "site;=x", "site=\x00", "s=" + "x" * 257]:
        with pytest.raises(QueryError) as info:
            q.parse_tag_filters([bad])
        assert info.value.param == "tag"
    with pytest.raises(QueryError, match="at most"):
        q.parse_tag_filters([f"k{i}=v" for i in range(q.MAX_TAG_FILTERS + 1)])
    st_ = q.type_aggregate_statement(
        THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
        group_by=None, max_groups=5, rp="raw", tags=[("site", "p'a\"r;is"), ("floor", "2")],
    )  # fmt: skip
    assert st_.text == (
        'SELECT LAST("mode") AS "mode" FROM "raw"."thermostat" WHERE time >= '
        f'{T0}ms AND time < {T0 + 600_000}ms AND "site" = $tag_0 AND "floor" = $tag_1'
        " GROUP BY time(60000ms) fill(none)"
    )
    assert st_.params == {"tag_0": "p'a\"r;is", "tag_1": "2"}
    with pytest.raises(QueryError, match="is a field"):
        q.type_aggregate_statement(
            THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
            group_by=None, max_groups=5, rp="raw", tags=[("mode", "heat")],
        )  # fmt: skip


@given(values=st.lists(nasty_text, max_size=3))
def test_tag_filter_values_never_reach_the_query_text(values: list[str]) -> None:
    try:
        filters = q.parse_tag_filters([f"site={v}" for v in values])
    except QueryError:
        return
    statement = q.type_aggregate_statement(
        THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
        group_by=None, max_groups=5, rp="raw", tags=filters,
    )  # fmt: skip
    assert statement.params == {f"tag_{i}": v for i, v in enumerate(values)}
    assert all(f"$tag_{i}" in statement.text for i in range(len(values)))
    assert not set(statement.text) & {";", "\n", "\r", "\x00", "'", "\\"}


def test_summary_statements() -> None:
    assert q.summary_field(THERMOSTAT) == "temperature_c"
    st_ = q.readings_count_statement([THERMOSTAT, AIR], "raw", window="1m")
    assert st_.text.split("; ") == [
        'SELECT COUNT("temperature_c") FROM "raw"."thermostat" WHERE time > now() - 1m',
        'SELECT COUNT("co2_ppm") FROM "raw"."air_quality" WHERE time > now() - 1m',
    ]
    assert q.readings_count_statement([AIR], "raw").text.endswith("WHERE time > now() - 1h")
    with pytest.raises(ValueError):
        q.readings_count_statement([AIR], "raw", window="1d; DROP")
    assert q.deadletter_count_statement("raw").text == (
        'SELECT SUM("count") FROM "raw"."deadletters" WHERE time > now() - 1h GROUP BY "device_type"'
    )


def test_type_and_device_id_resolution() -> None:
    assert q.resolve_type("thermostat") is THERMOSTAT
    for bad in ("toaster", "Thermostat", 'thermostat"', "thermostat;", "../x"):
        with pytest.raises(QueryError) as info:
            q.resolve_type(bad)
        assert info.value.status == 404
    for bad in NASTY:
        if bad == "time":  # a legal device id (it is only ever a bound value)
            assert q.validate_device_id(bad) == "time"
            continue
        with pytest.raises(QueryError):
            q.validate_device_id(bad)


# --- injection properties ----------------------------------------------------------------------

_QUOTED = r'"[a-z0-9_]+"'
_AGG = re.compile(
    rf"^SELECT (MEAN|MIN|MAX|SUM|COUNT|LAST)\({_QUOTED}\) AS {_QUOTED}(, (MEAN|MIN|MAX|SUM|COUNT|LAST)"
    rf'\({_QUOTED}\) AS {_QUOTED})* FROM "raw"\."thermostat" WHERE "device_id" = \$device_id'
    r" AND time >= \d+ms AND time < \d+ms GROUP BY time\(\d+ms\) fill\((none|null|previous)\)$"
)
_RAW = re.compile(
    rf'^SELECT {_QUOTED}(, {_QUOTED})* FROM "raw"\."thermostat" WHERE "device_id" = \$device_id'
    r" AND time >= \d+ms AND time < \d+ms ORDER BY time ASC LIMIT \d+( OFFSET \d+)?$"
)

field_lists = st.lists(st.one_of(st.sampled_from([*THERMOSTAT.fields, "seq"]), nasty_text), max_size=4)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=field_lists,
    device_id=st.one_of(st.just("dev-1"), nasty_text),
    start=st.one_of(st.none(), nasty_text, st.just("-2h")),
    end=st.one_of(st.none(), nasty_text),
    every=st.one_of(st.just("1m"), nasty_text),
    fn=st.one_of(st.sampled_from([f.value for f in AggregateFn]), nasty_text),
    fill=st.one_of(st.sampled_from([f.value for f in Fill]), nasty_text),
)
def test_aggregate_request_is_refused_or_built_from_the_grammar(
    *, fields: list[str], device_id: str, start: str | None, end: str | None, every: str, fn: str, fill: str
) -> None:
    """The whole aggregate request path the router takes, fed arbitrary text."""
    try:
        names = q.parse_fields(fields, THERMOSTAT)
        function = q.parse_enum(AggregateFn, fn, param="fn")
        fill_mode = q.parse_enum(Fill, fill, param="fill")
        time_range = q.parse_range(start, end, now_ms=NOW)
        every_ms = q.parse_every(every, time_range)
        statement = q.aggregate_statement(
            THERMOSTAT, device_id, names, time_range, every_ms=every_ms, fn=function, fill=fill_mode, rp="raw"
        )
    except QueryError:
        return
    assert _AGG.fullmatch(statement.text), statement.text
    assert statement.params == {"device_id": device_id}
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", device_id)


@settings(max_examples=300)
@given(fields=field_lists, device_id=st.one_of(st.just("dev-1"), nasty_text), cursor=nasty_text)
def test_raw_request_is_refused_or_built_from_the_grammar(
    fields: list[str], device_id: str, cursor: str
) -> None:
    try:
        names = q.parse_fields(fields, THERMOSTAT)
        decoded = Cursor.decode(cursor) if cursor else None
        statement = q.raw_statement(THERMOSTAT, device_id, names, RANGE, limit=5, cursor=decoded, rp="raw")
    except QueryError:
        return
    assert _RAW.fullmatch(statement.text), statement.text


@given(device_id=nasty_text)
def test_device_id_never_reaches_the_query_text(device_id: str) -> None:
    try:
        statement = q.latest_statement(THERMOSTAT, device_id, ["temperature_c"], "raw")
    except QueryError:
        return
    reference = q.latest_statement(THERMOSTAT, "dev-1", ["temperature_c"], "raw")
    assert statement.text == reference.text  # the id is only ever a bound parameter
    assert statement.params == {"device_id": device_id}


@given(group_by=nasty_text)
def test_group_by_is_refused_or_a_quoted_safe_identifier(group_by: str) -> None:
    try:
        key = q.parse_group_by(group_by)
        statement = q.type_aggregate_statement(
            THERMOSTAT, ["mode"], RANGE, every_ms=60_000, fn=AggregateFn.LAST, fill=Fill.NONE,
            group_by=key, max_groups=5, rp="raw",
        )  # fmt: skip
    except QueryError:
        return
    assert not set(statement.text) & {";", "\n", "\r", "\x00", "'", "\\"}
    if key is not None:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", key)
        assert f', "{key}" fill(none)' in statement.text
