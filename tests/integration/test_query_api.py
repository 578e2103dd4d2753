"""Telemetry query API against a real influxd (and the real registry app): known data, exact values.

The data set is in ``tests/query_harness.py`` (written once per module, read
by every test); expected values are written out by hand, not recomputed.
"""

from __future__ import annotations

import csv
import io
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from device_registry.models_rules import AlertRow
from device_registry.telemetry import query, service
from iotfleet.influx import InfluxClient, encode_point
from iotfleet.stack.probes import free_port
from tests.query_harness import MIN, PROBLEM, World, get, iso, recent_lines, world_fixture  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# --- latest ------------------------------------------------------------------------------


async def test_latest_gives_each_fields_own_newest_value_and_time(world: World) -> None:
    w = world
    body = await get(w, f"/api/v1/devices/{w.a}/telemetry/latest")
    assert body["device_type"] == "thermostat"
    assert body["time"] == query.format_time(w.t(9))
    assert body["fields"] == {
        "temperature_c": {"value": 31.5, "time": query.format_time(w.t(9))},
        "humidity_pct": {"value": 55.5, "time": query.format_time(w.t(8))},
        "setpoint_c": {"value": 22.0, "time": query.format_time(w.t(8))},
        "mode": {"value": "off", "time": query.format_time(w.t(8))},
        "seq": {"value": 10, "time": query.format_time(w.t(8))},
    }
    # Whole floats stay floats, integers stay integers.
    assert isinstance(body["fields"]["setpoint_c"]["value"], float)
    air = await get(w, f"/api/v1/devices/{w.air}/telemetry/latest", fields="co2_ppm,ventilation_pct")
    assert air["fields"]["co2_ppm"]["value"] == 402 and isinstance(air["fields"]["co2_ppm"]["value"], int)
    assert air["fields"]["ventilation_pct"]["value"] == 20.0
    assert list(air["fields"]) == ["co2_ppm", "ventilation_pct"]
    plug = await get(w, f"/api/v1/devices/{w.plug}/telemetry/latest", fields="relay_on")
    assert plug["fields"] == {"relay_on": {"value": True, "time": query.format_time(w.t(1))}}


async def test_latest_widens_its_window_per_missing_field(world: World) -> None:
    w = world
    body = await get(w, f"/api/v1/devices/{w.stale}/telemetry/latest")
    recent = query.format_time(w.now - 90 * MIN)
    assert body["fields"] == {
        "temperature_c": {"value": 18.5, "time": recent},
        "humidity_pct": {"value": 41.0, "time": recent},
        "setpoint_c": {"value": 19.0, "time": recent},
        "mode": {"value": "cool", "time": recent},
        "seq": {"value": 7, "time": query.format_time(w.t(-1440))},
    }
    assert body["time"] == recent


async def test_latest_of_a_device_without_data_and_of_an_unknown_device(world: World) -> None:
    w = world
    body = await get(w, f"/api/v1/devices/{w.empty}/telemetry/latest")
    assert body == {"device_id": w.empty, "device_type": "thermostat", "time": None, "fields": {}}
    await get(w, "/api/v1/devices/no-such-device/telemetry/latest", 404)


# --- raw points ----------------------------------------------------------------------------


async def test_raw_range_is_time_ordered_half_open_and_paginated(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry"
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"fields": "temperature_c,mode", "start": w.t0, "end": w.t(10), "limit": 4}
    pages = 0
    while True:
        resp = await w.viewer.get(path, params=params)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages += 1
        assert len(body["points"]) <= 4
        seen += body["points"]
        if body["next_cursor"] is None:
            assert "link" not in resp.headers
            break
        assert 'rel="next"' in resp.headers["link"]
        params["cursor"] = body["next_cursor"]
    assert pages == 3
    expected_times = [w.t0 + i * 30_000 for i in range(10)] + [w.t(8), w.t(9)]
    assert [p["time"] for p in seen] == [query.format_time(t) for t in expected_times]
    assert [p["temperature_c"] for p in seen] == [20.0 + i for i in range(10)] + [30.0, 31.5]
    assert [p["mode"] for p in seen] == ["heat"] * 5 + ["cool"] * 5 + ["off", None]
    assert body["fields"] == ["temperature_c", "mode"]

    # end is exclusive, start inclusive.
    body = await get(w, path, fields="temperature_c", start=w.t0 + 30_000, end=w.t0 + 90_000)
    assert [p["temperature_c"] for p in body["points"]] == [21.0, 22.0]
    # Without fields: every catalogue field (seq is asked for explicitly).
    body = await get(w, path, start=w.t(8), end=w.t(8) + 1, limit=10)
    assert body["points"] == [
        {
            "time": query.format_time(w.t(8)),
            "temperature_c": 30.0,
            "humidity_pct": 55.5,
            "setpoint_c": 22.0,
            "mode": "off",
        }
    ]
    body = await get(w, path, fields="seq", start=w.t0, end=w.t(10), limit=100)
    assert [p["seq"] for p in body["points"]] == list(range(11))


async def test_cursor_is_exact_when_several_series_share_an_instant(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.multi}/telemetry"
    values: list[float] = []
    params: dict[str, Any] = {"fields": "temperature_c", "start": w.t0, "end": w.t(2), "limit": 1}
    for _ in range(10):
        body = await get(w, path, **params)
        values += [p["temperature_c"] for p in body["points"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert sorted(values[:3]) == [1.0, 2.0, 3.0] and values[3:] == [4.0]


async def test_rfc3339_bounds_with_offsets_are_the_same_instant(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry"
    start, end = w.t0 + 60_000, w.t0 + 120_000  # readings 2 and 3
    expected = [22.0, 23.0]
    forms = [
        (start, end),
        (iso(start), iso(end)),  # +00:00
        (iso(start).replace("+00:00", "Z"), iso(end).replace("+00:00", "z")),
        (iso(start, 2), iso(end, -5)),  # 02:00 local and 19:00 the day before in -05:00
        (iso(start, 5) + "", iso(end, 14)),
    ]
    for s, e in forms:
        body = await get(w, path, fields="temperature_c", start=s, end=e)
        assert [p["temperature_c"] for p in body["points"]] == expected, (s, e)
        assert body["start"] == query.format_time(start) and body["end"] == query.format_time(end)
    # A '+' that was not percent-encoded arrives as a space: still the same instant.
    raw = f"{path}?fields=temperature_c&start={iso(start, 2)}&end={iso(end, 3)}"
    assert "+" in raw
    resp = await w.viewer.get(raw)
    assert resp.status_code == 200, resp.text
    assert [p["temperature_c"] for p in resp.json()["points"]] == expected
    # Fractions of a second: truncated to the millisecond (start + 1 ms excludes reading 2).
    body = await get(w, path, fields="temperature_c", start=iso(start)[:19] + ".001999999Z", end=iso(end))
    assert [p["temperature_c"] for p in body["points"]] == [23.0]
    # No offset: refused rather than guessed.
    problem = await get(w, path, 422, start=iso(start)[:19], end=iso(end))
    assert "offset" in problem["detail"]
    # Seconds instead of milliseconds: refused.
    await get(w, path, 422, start=str(start // 1000))
    await get(w, path, 422, start=iso(end), end=iso(start))  # start after end


async def test_csv_export_streams_the_whole_range(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    monkeypatch.setattr(query, "EXPORT_PAGE_ROWS", 5)  # several InfluxDB pages per export
    resp = await w.viewer.get(
        f"/api/v1/devices/{w.a}/telemetry",
        params={"fields": "temperature_c,mode", "start": w.t0, "end": w.t(10), "limit": 2},
        headers={"Accept": "text/csv"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in resp.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0] == ["time", "temperature_c", "mode"]
    assert len(rows) == 13  # the whole range, not one page of limit=2
    assert rows[1] == [query.format_time(w.t0), "20.0", "heat"]
    assert rows[-1] == [query.format_time(w.t(9)), "31.5", ""]
    plug = await w.viewer.get(
        f"/api/v1/devices/{w.plug}/telemetry",
        params={"fields": "relay_on,power_w", "start": w.t0, "end": w.t(5), "format": "csv"},
    )
    assert [r[1:] for r in csv.reader(io.StringIO(plug.text))][1:] == [
        ["true", "100.0"],
        ["false", "0.0"],
        ["true", "50.5"],
    ]
    # Rows sharing an instant (several series of one device) all come out across page boundaries.
    multi = await w.viewer.get(
        f"/api/v1/devices/{w.multi}/telemetry",
        params={"fields": "temperature_c", "start": w.t0, "end": w.t(2), "format": "csv"},
    )
    monkeypatch.setattr(query, "EXPORT_PAGE_ROWS", 1)
    one_by_one = await w.viewer.get(
        f"/api/v1/devices/{w.multi}/telemetry",
        params={"fields": "temperature_c", "start": w.t0, "end": w.t(2), "format": "csv"},
    )
    for resp in (multi, one_by_one):
        values = [r[1] for r in csv.reader(io.StringIO(resp.text))][1:]
        assert sorted(values[:3]) == ["1.0", "2.0", "3.0"] and values[3:] == ["4.0"]
    # JSON wins when listed first.
    resp = await w.viewer.get(
        f"/api/v1/devices/{w.a}/telemetry", headers={"Accept": "application/json, text/csv"}
    )
    assert resp.headers["content-type"].startswith("application/json")


async def test_csv_export_beyond_the_bound_is_refused_before_streaming(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    monkeypatch.setattr(query, "MAX_EXPORT_ROWS", 5)
    resp = await w.viewer.get(
        f"/api/v1/devices/{w.a}/telemetry",
        params={"start": w.t0, "end": w.t(10)},
        headers={"Accept": "text/csv"},
    )
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert "12 points" in resp.json()["detail"]


# --- aggregates ----------------------------------------------------------------------------


async def test_aggregate_functions_and_fill_modes(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    window = {"start": iso(w.t0), "end": iso(w.t(10)), "every": "1m", "fields": "temperature_c"}

    def series(body: dict[str, Any], name: str = "temperature_c") -> list[tuple[int, Any]]:
        return [(round((_ms(p["time"]) - w.t0) / MIN), p[name]) for p in body["points"]]

    body = await get(w, path, **window, fn="mean", fill="none")
    assert series(body) == [(0, 20.5), (1, 22.5), (2, 24.5), (3, 26.5), (4, 28.5), (8, 30.0), (9, 31.5)]
    assert (body["fn"], body["every"], body["fill"]) == ("mean", "1m", "none")
    body = await get(w, path, **window, fn="mean", fill="null")
    assert series(body) == [
        (0, 20.5), (1, 22.5), (2, 24.5), (3, 26.5), (4, 28.5), (5, None), (6, None), (7, None),
        (8, 30.0), (9, 31.5),
    ]  # fmt: skip
    body = await get(w, path, **window, fn="mean", fill="previous")
    assert [v for _, v in series(body)] == [20.5, 22.5, 24.5, 26.5, 28.5, 28.5, 28.5, 28.5, 30.0, 31.5]
    body = await get(w, path, **window, fn="min")
    assert [v for _, v in series(body)] == [20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 31.5]
    body = await get(w, path, **window, fn="max")
    assert [v for _, v in series(body)] == [21.0, 23.0, 25.0, 27.0, 29.0, 30.0, 31.5]
    body = await get(w, path, **window, fn="sum")
    assert [v for _, v in series(body)] == [41.0, 45.0, 49.0, 53.0, 57.0, 30.0, 31.5]
    body = await get(w, path, **window, fn="count", fill="null")  # InfluxDB fills count with 0
    assert [v for _, v in series(body)] == [2, 2, 2, 2, 2, 0, 0, 0, 1, 1]
    body = await get(w, path, **{**window, "fields": "mode"}, fn="last")
    assert series(body, "mode") == [
        (0, "heat"),
        (1, "heat"),
        (2, "cool"),
        (3, "cool"),
        (4, "cool"),
        (8, "off"),
    ]
    # Several fields at once; the default fields of mean are the numeric ones.
    body = await get(w, path, start=w.t0, end=w.t(2), every="2m", fn="mean")
    assert body["fields"] == ["temperature_c", "humidity_pct", "setpoint_c"]
    assert body["points"] == [
        {"time": query.format_time(w.t0), "temperature_c": 21.5, "humidity_pct": 50.0, "setpoint_c": 21.0}
    ]
    # Booleans: min/max/last/count apply, mean does not.
    plug = f"/api/v1/devices/{w.plug}/telemetry/aggregate"
    body = await get(w, plug, fields="relay_on", start=w.t0, end=w.t(2), every="1m", fn="min")
    assert [p["relay_on"] for p in body["points"]] == [False, True]
    body = await get(w, plug, fields="relay_on", start=w.t0, end=w.t(2), every="1m", fn="max")
    assert [p["relay_on"] for p in body["points"]] == [True, True]
    problem = await get(w, plug, 422, fields="relay_on", start=w.t0, end=w.t(2), fn="mean")
    assert "relay_on" in problem["detail"]
    await get(w, path, 422, fields="mode", start=w.t0, end=w.t(2), fn="sum")


async def test_aggregate_bucket_alignment_and_offsets(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    # A start in +05:30 that is t0 + 1 min: buckets are still aligned to UTC minutes.
    body = await get(
        w, path, fields="temperature_c", start=iso(w.t(1), 0).replace("+00:00", "Z"), end=iso(w.t(3), 5)
    )
    assert [p["temperature_c"] for p in body["points"]] == [22.5, 24.5]
    assert body["points"][0]["time"] == query.format_time(w.t(1))


async def test_buckets_aligned_to_a_time_zone(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    window = {"fields": "temperature_c", "start": w.t0, "end": w.t(10), "fn": "count", "every": "1h"}
    # UTC: one hourly bucket from t0 (on the hour). Kolkata (+05:30): its hours start at :30 UTC.
    body = await get(w, path, **window)
    assert [(p["time"], p["temperature_c"]) for p in body["points"]] == [(query.format_time(w.t0), 12)]
    assert body["tz"] == "UTC"
    body = await get(w, path, **window, tz="Asia/Kolkata")
    assert [(p["time"], p["temperature_c"]) for p in body["points"]] == [(query.format_time(w.t(-30)), 12)]
    assert body["tz"] == "Asia/Kolkata"
    typ = "/api/v1/device-types/thermostat/telemetry/aggregate"
    body = await get(w, typ, **window, tz="Asia/Kolkata", tag=f"device_id={w.a}")
    assert body["groups"][0]["points"][0]["time"] == query.format_time(w.t(-30))
    await get(w, path, 422, **window, tz="Mars/Olympus")
    await get(w, path, 422, **window, tz="Europe/Paris') fill(none); DROP DATABASE x; --")


async def test_too_many_points_is_a_422_suggesting_a_coarser_every(world: World) -> None:
    w = world
    problem = await get(
        w, f"/api/v1/devices/{w.a}/telemetry/aggregate", 422, start="-7d", end="now", every="1m"
    )
    assert problem["suggested_every"] == "5m"
    assert "every=5m" in problem["detail"]
    # The suggestion works.
    await get(w, f"/api/v1/devices/{w.a}/telemetry/aggregate", start="-7d", end="now", every="5m")
    # 24 h at 1 min: 1440 buckets, fine.
    await get(w, f"/api/v1/devices/{w.a}/telemetry/aggregate", start="-24h", every="1m")


async def test_type_aggregate_all_by_device_and_by_tag(world: World) -> None:
    w = world
    path = "/api/v1/device-types/thermostat/telemetry/aggregate"
    window = {"fields": "temperature_c", "start": w.t0, "end": w.t(5), "fn": "mean"}
    body = await get(w, path, **window, every="5m")
    assert body["group_by"] is None and len(body["groups"]) == 1
    # a: 20..29 (sum 245), b: 10 x 5, multi: 1, 2, 3, 4  → (245 + 50 + 10) / 19
    assert body["groups"][0]["tags"] == {}
    assert body["groups"][0]["points"][0]["temperature_c"] == pytest.approx(305 / 19)

    body = await get(w, path, **window, every="5m", group_by="device")
    by_device = {g["tags"]["device_id"]: g["points"][0]["temperature_c"] for g in body["groups"]}
    assert by_device == {w.a: 24.5, w.b: 10.0, w.multi: 2.5}

    body = await get(w, path, **window, every="1m", group_by="site", fill="null")
    by_site = {g["tags"]["site"]: [p["temperature_c"] for p in g["points"]] for g in body["groups"]}
    assert by_site["paris"] == [20.5, 22.5, 24.5, 26.5, 28.5]
    assert by_site["lyon"] == [10.0] * 5
    assert by_site["x"] == [1.0, 4.0, None, None, None]

    body = await get(w, "/api/v1/device-types/smart_plug/telemetry/aggregate", start=w.t0, end=w.t(2),
                      every="2m", fn="count", fields="relay_on,power_w")  # fmt: skip
    assert body["groups"][0]["points"][0] | {"time": None} == {"time": None, "relay_on": 3, "power_w": 3}

    # Tag filters: only paris (device a), or a device by its id tag; a value nobody has: nothing.
    body = await get(w, path, **window, every="5m", tag="site=paris")
    assert body["tags"] == {"site": "paris"}
    assert [g["points"][0]["temperature_c"] for g in body["groups"]] == [24.5]
    body = await get(w, path, **window, every="5m", tag=[f"device_id={w.b}", "site=lyon"])
    assert [g["points"][0]["temperature_c"] for g in body["groups"]] == [10.0]
    body = await get(w, path, **window, every="5m", tag="site=' OR site =~ /.*/ OR 'a'='a")
    assert body["groups"] == []
    await get(w, path, 422, tag="site")
    await get(w, path, 422, tag="temperature_c=1")

    await get(w, "/api/v1/device-types/toaster/telemetry/aggregate", 404)
    await get(w, path, 422, group_by="temperature_c", start=w.t0, end=w.t(5))
    await get(w, path, 422, group_by="si te")


async def test_type_aggregate_refuses_too_many_groups(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    monkeypatch.setattr(query, "MAX_AGGREGATE_POINTS", 10)
    problem = await get(
        w, "/api/v1/device-types/thermostat/telemetry/aggregate", 422,
        fields="temperature_c", start=w.t0, end=w.t(5), every="1m", group_by="device",
    )  # fmt: skip
    assert "suggested_every" in problem


# --- fleet summary ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees current counts (the cache itself has its own test)."""
    monkeypatch.setattr(service, "SUMMARY_TTL_S", 0.0)
    monkeypatch.setattr(service, "HOUR_TTL_S", 0.0)


async def _add_alerts(w: World) -> None:
    now = datetime.now(UTC)
    rows = [
        ("thermostat", w.a, "active"),
        ("thermostat", w.b, "active"),
        ("thermostat", w.multi, "acknowledged"),
        ("thermostat", w.a, "cleared"),
        ("air_quality", w.air, "acknowledged"),
    ]
    async with w.api.state.sessions() as session:
        for i, (device_type, device_id, status) in enumerate(rows):
            session.add(
                AlertRow(
                    id=f"alert-{secrets.token_hex(6)}",
                    rule_id=f"rule-{i}",
                    rule_name=f"rule {i}",
                    device_id=device_id,
                    device_type=device_type,
                    severity="major",
                    message="test",
                    status=status,
                    values={},
                    open_key=None if status == "cleared" else f"rule-{i}:{device_id}:{secrets.token_hex(3)}",
                    raised_at=now,
                )
            )
        await session.commit()


async def test_fleet_summary_counts(world: World) -> None:
    w = world
    await w.influx.write("\n".join(recent_lines(w, time.time_ns() // 1_000_000)))
    await _add_alerts(w)
    body = await get(w, "/api/v1/fleet/summary")
    by_type = {t["device_type"]: t for t in body["types"]}
    assert list(by_type) == ["thermostat", "air_quality", "smart_plug", "gps_tracker"]
    assert by_type["thermostat"] == {
        "device_type": "thermostat",
        "devices": 6,
        "online": 1,
        "readings_last_minute": 1,
        "readings_last_hour": 3,
        "deadlettered_last_hour": 2,
        "active_alerts": 2,
        "open_alerts": 3,
    }
    assert by_type["air_quality"] | {"device_type": "", "devices": 0} == {
        "device_type": "",
        "devices": 0,
        "online": 0,
        "readings_last_minute": 0,
        "readings_last_hour": 0,
        "deadlettered_last_hour": 1,
        "active_alerts": 0,
        "open_alerts": 1,
    }
    assert by_type["air_quality"]["devices"] == 1 and by_type["smart_plug"]["devices"] == 1
    assert by_type["gps_tracker"]["devices"] == 0
    for key in ("devices", "online", "readings_last_minute", "readings_last_hour", "active_alerts"):
        assert body["totals"][key] == sum(t[key] for t in body["types"]), key
    assert body["totals"]["devices"] == 8 and body["totals"]["deadlettered_last_hour"] == 3
    assert body["totals"]["active_alerts"] == 2 and body["totals"]["open_alerts"] == 4
    assert body["counts_age_s"] < 1 and body["hour_counts_age_s"] < 1  # just computed


async def test_fleet_counts_are_reused_for_a_few_seconds(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world

    def plug_reading(ago_s: float) -> str:
        now = time.time_ns() // 1_000_000
        return encode_point("smart_plug", {"device_id": w.plug}, {"power_w": 1.0}, now - int(ago_s * 1000))

    first = await get(w, "/api/v1/fleet/summary")
    plug = next(t for t in first["types"] if t["device_type"] == "smart_plug")
    monkeypatch.setattr(service, "SUMMARY_TTL_S", 60.0)
    monkeypatch.setattr(service, "HOUR_TTL_S", 60.0)
    await w.influx.write("\n".join([plug_reading(1), plug_reading(600)]))
    cached = await get(w, "/api/v1/fleet/summary")
    assert cached["types"] == first["types"]
    assert cached["counts_age_s"] > 0 and cached["hour_counts_age_s"] > 0
    # Minute counts refreshed, hour counts still reused: the hour is at least the minute.
    monkeypatch.setattr(service, "SUMMARY_TTL_S", 0.0)
    partly = await get(w, "/api/v1/fleet/summary")
    plug_now = next(t for t in partly["types"] if t["device_type"] == "smart_plug")
    assert plug_now["readings_last_minute"] == plug["readings_last_minute"] + 1
    assert plug_now["readings_last_hour"] == max(plug["readings_last_hour"], plug_now["readings_last_minute"])
    assert partly["counts_age_s"] < partly["hour_counts_age_s"]
    monkeypatch.setattr(service, "HOUR_TTL_S", 0.0)
    fresh = await get(w, "/api/v1/fleet/summary")
    plug_fresh = next(t for t in fresh["types"] if t["device_type"] == "smart_plug")
    assert plug_fresh["readings_last_hour"] == plug["readings_last_hour"] + 2


# --- auth and bad parameters ------------------------------------------------------------------


async def test_every_telemetry_route_needs_a_key(world: World) -> None:
    w = world
    paths = [
        f"/api/v1/devices/{w.a}/telemetry/latest",
        f"/api/v1/devices/{w.a}/telemetry",
        f"/api/v1/devices/{w.a}/telemetry/aggregate",
        "/api/v1/device-types/thermostat/telemetry/aggregate",
        "/api/v1/fleet/summary",
    ]
    async with w.api.as_(None) as anonymous:
        for path in paths:
            resp = await anonymous.get(path)
            assert resp.status_code == 401, path
    for path in paths:
        assert (await w.viewer.get(path)).status_code == 200, path


async def test_bad_parameters_are_422_problems(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry"
    problem = await get(w, path, 422, fields="temperature_c,nope")
    assert "'nope'" in problem["detail"] and problem["errors"][0]["field"] == "query.fields"
    await get(w, path, 422, cursor="not-a-cursor")
    await get(w, path, 422, limit=0)
    await get(w, path, 422, limit=query.MAX_RAW_LIMIT + 1)
    await get(w, path, 422, format="xml")
    agg = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    await get(w, agg, 422, fn="median")
    await get(w, agg, 422, fill="linear")
    await get(w, agg, 422, every="0s")
    await get(w, agg, 422, every="1y")
    await get(w, agg, 422, every="500ms")


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


async def test_no_database_yet_is_empty_and_influxdb_down_is_503(world: World) -> None:
    w = world
    app_state = w.api.app.state
    original = app_state.telemetry_influx
    settings = original.settings
    try:
        # Before the ingest's first write the database does not exist: empty answers, not errors.
        app_state.telemetry_influx = InfluxClient(settings.model_copy(update={"database": "never_written"}))
        body = await get(w, f"/api/v1/devices/{w.a}/telemetry/latest")
        assert body["fields"] == {} and body["time"] is None
        body = await get(w, f"/api/v1/devices/{w.a}/telemetry/aggregate", start=w.t0, end=w.t(10))
        assert body["points"] == []
        summary = await get(w, "/api/v1/fleet/summary")
        assert summary["totals"]["readings_last_hour"] == 0 and summary["totals"]["devices"] == 8
        await app_state.telemetry_influx.aclose()
        # InfluxDB unreachable: 503 problem with Retry-After.
        app_state.telemetry_influx = InfluxClient(
            settings.model_copy(update={"url": f"http://127.0.0.1:{free_port()}"})
        )
        for path in (f"/api/v1/devices/{w.a}/telemetry/latest", "/api/v1/fleet/summary"):
            resp = await w.viewer.get(path)
            assert resp.status_code == 503, resp.text
            assert resp.headers["content-type"].startswith(PROBLEM)
            assert resp.headers["retry-after"] == "5"
        await app_state.telemetry_influx.aclose()
    finally:
        app_state.telemetry_influx = original


ERRORS_JSON = '[{"field": "temperature_c", "message": "Input should be less than or equal to 85", "reason": "out_of_range"}]'


async def test_device_deadletters_lists_the_newest_first(world: World) -> None:
    w = world
    now = time.time_ns() // 1_000_000
    tags = {"device_type": "thermostat", "device_id": w.multi}  # no other test writes its dead letters
    await w.influx.write(
        "\n".join(
            [
                encode_point("deadletters", {**tags, "reason": "out_of_range"}, {"count": 1}, now - 3 * MIN),
                encode_point("deadletters", {**tags, "reason": "not_json"}, {"count": 1}, now - 2 * MIN),
                encode_point(
                    "deadletters",
                    {**tags, "reason": "out_of_range"},
                    {"count": 1, "errors": ERRORS_JSON, "errors_cut": 3},  # as the ingest writes them
                    now - 1 * MIN,
                ),
                encode_point(
                    "deadletters", {**tags, "reason": "not_json"}, {"count": 1}, now - 30 * 60 * MIN
                ),
            ]
        )
    )
    body = await get(w, f"/api/v1/devices/{w.multi}/deadletters")
    assert [item["reason"] for item in body["items"]] == ["out_of_range", "not_json", "out_of_range"]
    assert body["by_reason"] == {"out_of_range": 2, "not_json": 1}
    assert body["items"][0]["time"] == query.format_time(now - 1 * MIN)
    assert body["items"][0]["errors"] == [
        {
            "field": "temperature_c",
            "message": "Input should be less than or equal to 85",
            "reason": "out_of_range",
        }
    ]
    assert body["items"][0]["errors_cut"] == 3
    assert body["items"][1]["errors"] == [] and body["items"][1]["errors_cut"] == 0  # an older record
    limited = await get(w, f"/api/v1/devices/{w.multi}/deadletters", limit=1)
    assert [item["reason"] for item in limited["items"]] == ["out_of_range"]
    # a device with none, an unknown device, a bad bound
    assert (await get(w, f"/api/v1/devices/{w.empty}/deadletters"))["items"] == []
    await get(w, "/api/v1/devices/nope-nope/deadletters", status=404)
    await get(w, f"/api/v1/devices/{w.multi}/deadletters", status=422, start="yesterday';DROP")
