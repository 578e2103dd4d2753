"""Telemetry query API against a real influxd (and the real registry app): known data, exact values.

One registry and one InfluxDB database per module: the data set below is
written once (line protocol, exactly as the ingest stores it) and every test
reads it through the API; no test writes to it after the fixture, so they are
order-independent. Expected values are written out by hand, not recomputed.
"""

from __future__ import annotations

import csv
import io
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update

from device_registry.models import Device
from device_registry.telemetry import query
from iotfleet.influx import InfluxClient, encode_point, quote_identifier
from tests.harness import Broker, Influxd
from tests.registry_harness import Api, registry_settings, running_registry

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROBLEM = "application/problem+json"
MIN = 60_000


def _iso(ms: int, offset_h: int = 0) -> str:
    """``ms`` as RFC 3339 in the zone UTC+offset_h (same instant)."""
    zone = timezone(timedelta(hours=offset_h))
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).astimezone(zone).isoformat()


@dataclass
class World:
    api: Api
    viewer: httpx.AsyncClient
    influx: InfluxClient
    t0: int
    now: int
    a: str  # thermostat, site=paris: the main series
    b: str  # thermostat, site=lyon
    plug: str  # smart_plug: booleans
    air: str  # air_quality: integer fields
    empty: str  # thermostat without any data
    recent: str  # thermostat with readings in the last hour
    multi: str  # thermostat with three series (tag changes) stamped at the same instants

    def t(self, minutes: float) -> int:
        return self.t0 + int(minutes * MIN)


def _dataset(w: World) -> list[str]:
    lines = []
    th = {"setpoint_c": 21.0, "humidity_pct": 50.0}
    # a: ten readings 30 s apart from t0 (minutes 0-4), a gap (5-7), a full reading at 8 min and one
    # with only temperature_c at 9 min; plus a reading a day earlier, outside every queried range.
    for i in range(10):
        fields = {"temperature_c": 20.0 + i, **th, "mode": "heat" if i < 5 else "cool", "seq": i}
        lines.append(
            encode_point("thermostat", {"device_id": w.a, "site": "paris"}, fields, w.t0 + i * 30_000)
        )
    full = {"temperature_c": 30.0, "humidity_pct": 55.5, "setpoint_c": 22.0, "mode": "off", "seq": 10}
    lines.append(encode_point("thermostat", {"device_id": w.a, "site": "paris"}, full, w.t(8)))
    lines.append(
        encode_point("thermostat", {"device_id": w.a, "site": "paris"}, {"temperature_c": 31.5}, w.t(9))
    )
    old = {"temperature_c": 5.0, **th, "mode": "off", "seq": 99}
    lines.append(encode_point("thermostat", {"device_id": w.a, "site": "paris"}, old, w.t(-1440)))
    # b: 10.0 every minute for 5 minutes.
    for i in range(5):
        fields = {"temperature_c": 10.0, "humidity_pct": 60.0, "setpoint_c": 20.0, "mode": "auto", "seq": i}
        lines.append(encode_point("thermostat", {"device_id": w.b, "site": "lyon"}, fields, w.t(i)))
    # plug: relay on, off, on.
    for i, (on, power) in enumerate([(True, 100.0), (False, 0.0), (True, 50.5)]):
        fields = {"power_w": power, "voltage_v": 230.0, "current_a": power / 230, "energy_kwh": 1.0 + i}
        lines.append(
            encode_point("smart_plug", {"device_id": w.plug}, {**fields, "relay_on": on}, w.t(i * 0.5))
        )
    # air: integer fields.
    for i in range(3):
        fields = {"co2_ppm": 400 + i, "pm2_5_ugm3": 5.0, "voc_index": 100, "ventilation_pct": 20.0}
        lines.append(encode_point("air_quality", {"device_id": w.air}, fields, w.t(i)))
    # multi: three series (site x, y, z) with a point each at t0, then one point at t0 + 1 min.
    for site, temp in (("x", 1.0), ("y", 2.0), ("z", 3.0)):
        fields = {"temperature_c": temp, "mode": "off"}
        lines.append(encode_point("thermostat", {"device_id": w.multi, "site": site}, fields, w.t0))
    lines.append(
        encode_point("thermostat", {"device_id": w.multi, "site": "x"}, {"temperature_c": 4.0}, w.t(1))
    )
    return lines


def _recent(w: World, now: int) -> list[str]:
    """Readings and dead letters relative to ``now`` (written by the summary test, just before it asks)."""
    lines = []
    # recent: 20 s, 5 min and 30 min ago.
    for ago_s in (20, 300, 1800):
        fields = {"temperature_c": 19.0, "humidity_pct": 40.0, "setpoint_c": 20.0, "mode": "heat"}
        lines.append(encode_point("thermostat", {"device_id": w.recent}, fields, now - ago_s * 1000))
    # dead letters: three in the last hour (thermostat 2, air_quality 1), one two hours ago.
    for device_type, device_id, ago_min in (
        ("thermostat", w.a, 10),
        ("thermostat", w.b, 50),
        ("air_quality", w.air, 5),
        ("thermostat", w.a, 120),
    ):
        tags = {"device_type": device_type, "device_id": device_id, "reason": "validation"}
        lines.append(encode_point("deadletters", tags, {"count": 1}, now - ago_min * MIN))
    return lines


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    session_broker: Broker, session_influxd: Influxd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    database = f"test_query_{secrets.token_hex(5)}"
    settings = registry_settings(session_broker, tmp_path_factory.mktemp("query-registry"))
    settings = settings.model_copy(update={"influx": session_influxd.settings_for(database)})
    now = time.time_ns() // 1_000_000
    # Two days ago, on the hour: inside the 30 d retention, far from "now" and from bucket edges.
    t0 = (now // 3_600_000) * 3_600_000 - 2 * 86_400_000
    token = secrets.token_hex(3)
    async with InfluxClient(settings.influx) as influx, running_registry(settings) as api:
        await influx.ensure_database()
        ids = {
            "a": ("thermostat", f"q-a-{token}"),
            "b": ("thermostat", f"q-b-{token}"),
            "plug": ("smart_plug", f"q-plug-{token}"),
            "air": ("air_quality", f"q-air-{token}"),
            "empty": ("thermostat", f"q-empty-{token}"),
            "recent": ("thermostat", f"q-recent-{token}"),
            "multi": ("thermostat", f"q-multi-{token}"),
        }
        resp = await api.http.post(
            "/api/v1/devices/bulk", json={"devices": [{"id": i, "type": t} for t, i in ids.values()]}
        )
        assert resp.status_code == 201, resp.text
        resp = await api.http.post("/api/v1/api-keys", json={"name": "query viewer", "role": "viewer"})
        assert resp.status_code == 201, resp.text
        async with api.state.sessions() as session:  # presence would set this from the status topic
            await session.execute(update(Device).where(Device.id == ids["a"][1]).values(online=True))
            await session.commit()
        async with api.as_(resp.json()["key"]) as viewer:
            w = World(api, viewer, influx, t0, now, **{k: v[1] for k, v in ids.items()})
            await influx.write("\n".join(_dataset(w)))
            yield w
        await influx.query(f"DROP DATABASE {quote_identifier(database)}")


async def _get(w: World, path: str, status: int = 200, **params: Any) -> Any:
    resp = await w.viewer.get(path, params=params)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert resp.headers["content-type"].startswith(PROBLEM)
        body = resp.json()
        assert body["status"] == status and body["detail"]
        return body
    return resp.json()


# --- latest ------------------------------------------------------------------------------


async def test_latest_gives_each_fields_own_newest_value_and_time(world: World) -> None:
    w = world
    body = await _get(w, f"/api/v1/devices/{w.a}/telemetry/latest")
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
    air = await _get(w, f"/api/v1/devices/{w.air}/telemetry/latest", fields="co2_ppm,ventilation_pct")
    assert air["fields"]["co2_ppm"]["value"] == 402 and isinstance(air["fields"]["co2_ppm"]["value"], int)
    assert air["fields"]["ventilation_pct"]["value"] == 20.0
    assert list(air["fields"]) == ["co2_ppm", "ventilation_pct"]
    plug = await _get(w, f"/api/v1/devices/{w.plug}/telemetry/latest", fields="relay_on")
    assert plug["fields"] == {"relay_on": {"value": True, "time": query.format_time(w.t(1))}}


async def test_latest_of_a_device_without_data_and_of_an_unknown_device(world: World) -> None:
    w = world
    body = await _get(w, f"/api/v1/devices/{w.empty}/telemetry/latest")
    assert body == {"device_id": w.empty, "device_type": "thermostat", "time": None, "fields": {}}
    await _get(w, "/api/v1/devices/no-such-device/telemetry/latest", 404)


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
    body = await _get(w, path, fields="temperature_c", start=w.t0 + 30_000, end=w.t0 + 90_000)
    assert [p["temperature_c"] for p in body["points"]] == [21.0, 22.0]
    # Without fields: every catalogue field (seq is asked for explicitly).
    body = await _get(w, path, start=w.t(8), end=w.t(8) + 1, limit=10)
    assert body["points"] == [
        {
            "time": query.format_time(w.t(8)),
            "temperature_c": 30.0,
            "humidity_pct": 55.5,
            "setpoint_c": 22.0,
            "mode": "off",
        }
    ]
    body = await _get(w, path, fields="seq", start=w.t0, end=w.t(10), limit=100)
    assert [p["seq"] for p in body["points"]] == list(range(11))


async def test_cursor_is_exact_when_several_series_share_an_instant(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.multi}/telemetry"
    values: list[float] = []
    params: dict[str, Any] = {"fields": "temperature_c", "start": w.t0, "end": w.t(2), "limit": 1}
    for _ in range(10):
        body = await _get(w, path, **params)
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
        (_iso(start), _iso(end)),  # +00:00
        (_iso(start).replace("+00:00", "Z"), _iso(end).replace("+00:00", "z")),
        (_iso(start, 2), _iso(end, -5)),  # 02:00 local and 19:00 the day before in -05:00
        (_iso(start, 5) + "", _iso(end, 14)),
    ]
    for s, e in forms:
        body = await _get(w, path, fields="temperature_c", start=s, end=e)
        assert [p["temperature_c"] for p in body["points"]] == expected, (s, e)
        assert body["start"] == query.format_time(start) and body["end"] == query.format_time(end)
    # A '+' that was not percent-encoded arrives as a space: still the same instant.
    raw = f"{path}?fields=temperature_c&start={_iso(start, 2)}&end={_iso(end, 3)}"
    assert "+" in raw
    resp = await w.viewer.get(raw)
    assert resp.status_code == 200, resp.text
    assert [p["temperature_c"] for p in resp.json()["points"]] == expected
    # Fractions of a second: truncated to the millisecond (start + 1 ms excludes reading 2).
    body = await _get(w, path, fields="temperature_c", start=_iso(start)[:19] + ".001999999Z", end=_iso(end))
    assert [p["temperature_c"] for p in body["points"]] == [23.0]
    # No offset: refused rather than guessed.
    problem = await _get(w, path, 422, start=_iso(start)[:19], end=_iso(end))
    assert "offset" in problem["detail"]
    # Seconds instead of milliseconds: refused.
    await _get(w, path, 422, start=str(start // 1000))
    await _get(w, path, 422, start=_iso(end), end=_iso(start))  # start after end


async def test_csv_export_streams_the_whole_range(world: World) -> None:
    w = world
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
    window = {"start": _iso(w.t0), "end": _iso(w.t(10)), "every": "1m", "fields": "temperature_c"}

    def series(body: dict[str, Any], name: str = "temperature_c") -> list[tuple[int, Any]]:
        return [(round((_ms(p["time"]) - w.t0) / MIN), p[name]) for p in body["points"]]

    body = await _get(w, path, **window, fn="mean", fill="none")
    assert series(body) == [(0, 20.5), (1, 22.5), (2, 24.5), (3, 26.5), (4, 28.5), (8, 30.0), (9, 31.5)]
    assert (body["fn"], body["every"], body["fill"]) == ("mean", "1m", "none")
    body = await _get(w, path, **window, fn="mean", fill="null")
    assert series(body) == [
        (0, 20.5), (1, 22.5), (2, 24.5), (3, 26.5), (4, 28.5), (5, None), (6, None), (7, None),
        (8, 30.0), (9, 31.5),
    ]  # fmt: skip
    body = await _get(w, path, **window, fn="mean", fill="previous")
    assert [v for _, v in series(body)] == [20.5, 22.5, 24.5, 26.5, 28.5, 28.5, 28.5, 28.5, 30.0, 31.5]
    body = await _get(w, path, **window, fn="min")
    assert [v for _, v in series(body)] == [20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 31.5]
    body = await _get(w, path, **window, fn="max")
    assert [v for _, v in series(body)] == [21.0, 23.0, 25.0, 27.0, 29.0, 30.0, 31.5]
    body = await _get(w, path, **window, fn="sum")
    assert [v for _, v in series(body)] == [41.0, 45.0, 49.0, 53.0, 57.0, 30.0, 31.5]
    body = await _get(w, path, **window, fn="count", fill="null")  # InfluxDB fills count with 0
    assert [v for _, v in series(body)] == [2, 2, 2, 2, 2, 0, 0, 0, 1, 1]
    body = await _get(w, path, **{**window, "fields": "mode"}, fn="last")
    assert series(body, "mode") == [
        (0, "heat"),
        (1, "heat"),
        (2, "cool"),
        (3, "cool"),
        (4, "cool"),
        (8, "off"),
    ]
    # Several fields at once; the default fields of mean are the numeric ones.
    body = await _get(w, path, start=w.t0, end=w.t(2), every="2m", fn="mean")
    assert body["fields"] == ["temperature_c", "humidity_pct", "setpoint_c"]
    assert body["points"] == [
        {"time": query.format_time(w.t0), "temperature_c": 21.5, "humidity_pct": 50.0, "setpoint_c": 21.0}
    ]
    # Booleans: min/max/last/count apply, mean does not.
    plug = f"/api/v1/devices/{w.plug}/telemetry/aggregate"
    body = await _get(w, plug, fields="relay_on", start=w.t0, end=w.t(2), every="1m", fn="min")
    assert [p["relay_on"] for p in body["points"]] == [False, True]
    body = await _get(w, plug, fields="relay_on", start=w.t0, end=w.t(2), every="1m", fn="max")
    assert [p["relay_on"] for p in body["points"]] == [True, True]
    problem = await _get(w, plug, 422, fields="relay_on", start=w.t0, end=w.t(2), fn="mean")
    assert "relay_on" in problem["detail"]
    await _get(w, path, 422, fields="mode", start=w.t0, end=w.t(2), fn="sum")


async def test_aggregate_bucket_alignment_and_offsets(world: World) -> None:
    w = world
    path = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    # A start in +05:30 that is t0 + 1 min: buckets are still aligned to UTC minutes.
    body = await _get(
        w, path, fields="temperature_c", start=_iso(w.t(1), 0).replace("+00:00", "Z"), end=_iso(w.t(3), 5)
    )
    assert [p["temperature_c"] for p in body["points"]] == [22.5, 24.5]
    assert body["points"][0]["time"] == query.format_time(w.t(1))


async def test_too_many_points_is_a_422_suggesting_a_coarser_every(world: World) -> None:
    w = world
    problem = await _get(
        w, f"/api/v1/devices/{w.a}/telemetry/aggregate", 422, start="-7d", end="now", every="1m"
    )
    assert problem["suggested_every"] == "5m"
    assert "every=5m" in problem["detail"]
    # The suggestion works.
    await _get(w, f"/api/v1/devices/{w.a}/telemetry/aggregate", start="-7d", end="now", every="5m")
    # 24 h at 1 min: 1440 buckets, fine.
    await _get(w, f"/api/v1/devices/{w.a}/telemetry/aggregate", start="-24h", every="1m")


async def test_type_aggregate_all_by_device_and_by_tag(world: World) -> None:
    w = world
    path = "/api/v1/device-types/thermostat/telemetry/aggregate"
    window = {"fields": "temperature_c", "start": w.t0, "end": w.t(5), "fn": "mean"}
    body = await _get(w, path, **window, every="5m")
    assert body["group_by"] is None and len(body["groups"]) == 1
    # a: 20..29 (sum 245), b: 10 x 5, multi: 1, 2, 3, 4  → (245 + 50 + 10) / 19
    assert body["groups"][0]["tags"] == {}
    assert body["groups"][0]["points"][0]["temperature_c"] == pytest.approx(305 / 19)

    body = await _get(w, path, **window, every="5m", group_by="device")
    by_device = {g["tags"]["device_id"]: g["points"][0]["temperature_c"] for g in body["groups"]}
    assert by_device == {w.a: 24.5, w.b: 10.0, w.multi: 2.5}

    body = await _get(w, path, **window, every="1m", group_by="site", fill="null")
    by_site = {g["tags"]["site"]: [p["temperature_c"] for p in g["points"]] for g in body["groups"]}
    assert by_site["paris"] == [20.5, 22.5, 24.5, 26.5, 28.5]
    assert by_site["lyon"] == [10.0] * 5
    assert by_site["x"] == [1.0, 4.0, None, None, None]

    body = await _get(w, "/api/v1/device-types/smart_plug/telemetry/aggregate", start=w.t0, end=w.t(2),
                      every="2m", fn="count", fields="relay_on,power_w")  # fmt: skip
    assert body["groups"][0]["points"][0] | {"time": None} == {"time": None, "relay_on": 3, "power_w": 3}

    await _get(w, "/api/v1/device-types/toaster/telemetry/aggregate", 404)
    await _get(w, path, 422, group_by="temperature_c", start=w.t0, end=w.t(5))
    await _get(w, path, 422, group_by="si te")


async def test_type_aggregate_refuses_too_many_groups(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    monkeypatch.setattr(query, "MAX_AGGREGATE_POINTS", 10)
    problem = await _get(
        w, "/api/v1/device-types/thermostat/telemetry/aggregate", 422,
        fields="temperature_c", start=w.t0, end=w.t(5), every="1m", group_by="device",
    )  # fmt: skip
    assert "suggested_every" in problem


# --- fleet summary ----------------------------------------------------------------------------


async def test_fleet_summary_counts(world: World) -> None:
    w = world
    await w.influx.write("\n".join(_recent(w, time.time_ns() // 1_000_000)))
    body = await _get(w, "/api/v1/fleet/summary")
    by_type = {t["device_type"]: t for t in body["types"]}
    assert list(by_type) == ["thermostat", "air_quality", "smart_plug", "gps_tracker"]
    assert by_type["thermostat"] == {
        "device_type": "thermostat",
        "devices": 5,
        "online": 1,
        "readings_last_minute": 1,
        "readings_last_hour": 3,
        "deadlettered_last_hour": 2,
        "active_alerts": 0,
    }
    assert by_type["air_quality"]["deadlettered_last_hour"] == 1
    assert by_type["air_quality"]["devices"] == 1 and by_type["smart_plug"]["devices"] == 1
    assert by_type["gps_tracker"]["devices"] == 0
    assert body["totals"]["devices"] == 7 and body["totals"]["deadlettered_last_hour"] == 3


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
    problem = await _get(w, path, 422, fields="temperature_c,nope")
    assert "'nope'" in problem["detail"] and problem["errors"][0]["field"] == "query.fields"
    await _get(w, path, 422, cursor="not-a-cursor")
    await _get(w, path, 422, limit=0)
    await _get(w, path, 422, limit=query.MAX_RAW_LIMIT + 1)
    await _get(w, path, 422, format="xml")
    agg = f"/api/v1/devices/{w.a}/telemetry/aggregate"
    await _get(w, agg, 422, fn="median")
    await _get(w, agg, 422, fill="linear")
    await _get(w, agg, 422, every="0s")
    await _get(w, agg, 422, every="1y")
    await _get(w, agg, 422, every="500ms")


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
