"""Injection attempts against every telemetry parameter: each is a 4xx problem and changes nothing.

"Nothing changed" is checked on the real influxd: the databases, measurements,
series and per-measurement point counts are read before and after, and the
known data set still answers with its known values; the registry's devices
are read back too.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from iotfleet.influx import quote_identifier, series_rows
from tests.query_harness import PROBLEM, World, world_fixture  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def attacks(database: str) -> list[str]:
    db = quote_identifier(database)
    return [
        "'",
        '"',
        "\\",
        ";",
        f"; DROP DATABASE {db}",
        f"temperature_c; DROP DATABASE {db}",
        f"temperature_c\nDROP DATABASE {db}",
        "temperature_c\r\nDROP MEASUREMENT thermostat",
        '"; DROP MEASUREMENT "thermostat',
        f'"temperature_c" FROM thermostat; DROP DATABASE {db}; SELECT "x',
        "temperature_c) FROM thermostat; DELETE FROM thermostat; SELECT (x",
        "' OR '1'='1",
        "x' OR device_id =~ /.*/ OR 'a'='a",
        "/.*/",
        "=~ /.*/",
        "*",
        "time",
        "$device_id",
        "temperature_c AS x",
        "temperature_c\x00",
        "%00",
        "1m) fill(none); DROP SERIES FROM thermostat; SELECT MEAN(x",
        "now() - 1h",
        "1764240000000; DROP DATABASE x",
        "2026-11-27T00:00:00Z' OR 1=1 --",
        "ｔｅｍｐｅｒａｔｕｒｅ_c",
        "x" * 300,
    ]


async def snapshot(w: World) -> dict[str, Any]:
    """Everything an injection could change: databases, measurements, series, point counts."""
    influx = w.influx
    databases = sorted(r["name"] for r in series_rows(await influx.query("SHOW DATABASES")))
    measurements = sorted(r["name"] for r in series_rows(await influx.query("SHOW MEASUREMENTS")))
    series = sorted(r["key"] for r in series_rows(await influx.query("SHOW SERIES")))
    counts = {}
    for name in measurements:
        rp = quote_identifier(influx.settings.retention_policy)
        rows = list(series_rows(await influx.query(f"SELECT COUNT(*) FROM {rp}.{quote_identifier(name)}")))
        counts[name] = rows[0] if rows else {}
    resp = await w.api.http.get("/api/v1/devices", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    devices = sorted(d["id"] for d in resp.json()["items"])
    return {
        "databases": databases,
        "measurements": measurements,
        "series": series,
        "counts": counts,
        "devices": devices,
    }


def _requests(w: World, attack: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    dev = f"/api/v1/devices/{w.a}/telemetry"
    typ = "/api/v1/device-types/thermostat/telemetry/aggregate"
    bad_dev = f"/api/v1/devices/{quote(attack, safe='')}/telemetry"
    bad_type = f"/api/v1/device-types/{quote(attack, safe='')}/telemetry/aggregate"
    csv = {"Accept": "text/csv"}
    window = {"start": str(w.t0), "end": str(w.t(10))}
    return [
        (f"{bad_dev}/latest", {}, {}),
        (bad_dev, {}, {}),
        (f"{bad_dev}/aggregate", {}, {}),
        (bad_type, {}, {}),
        (f"{dev}/latest", {"fields": attack}, {}),
        (dev, {"fields": attack}, {}),
        (dev, {"fields": attack, **window}, csv),
        (dev, {"fields": f"temperature_c,{attack}"}, {}),
        (dev, {"start": attack}, {}),
        (dev, {"end": attack}, csv),
        (dev, {"cursor": attack}, {}),
        (dev, {"format": attack}, {}),
        (f"{dev}/aggregate", {"fields": attack}, {}),
        (f"{dev}/aggregate", {"start": attack}, {}),
        (f"{dev}/aggregate", {"end": attack}, {}),
        (f"{dev}/aggregate", {"every": attack}, {}),
        (f"{dev}/aggregate", {"fn": attack}, {}),
        (f"{dev}/aggregate", {"fill": attack}, {}),
        (f"{dev}/aggregate", {"tz": attack}, {}),
        (typ, {"fields": attack}, {}),
        (typ, {"group_by": attack, **window}, {}),
        (typ, {"group_by": f"tag:{attack}", **window}, {}),
        (typ, {"every": attack}, {}),
        (typ, {"fn": attack}, {}),
        (typ, {"fill": attack}, {}),
        (typ, {"tz": attack}, {}),
        (typ, {"start": attack}, {}),
        (typ, {"tag": f"{attack}=x", **window}, {}),
    ]


async def test_injection_attempts_are_4xx_and_change_nothing(world: World) -> None:
    w = world
    database = w.influx.settings.database
    before = await snapshot(w)
    assert before["counts"]["thermostat"]  # the data set is there to be destroyed
    assert database in before["databases"]
    tried = 0
    for attack in attacks(database):
        for path, params, headers in _requests(w, attack):
            resp = await w.viewer.get(path, params=params, headers=headers)
            tried += 1
            where = f"{path} {params} -> {resp.status_code} {resp.text[:300]}"
            assert 400 <= resp.status_code < 500, where
            assert resp.headers["content-type"].startswith(PROBLEM), where
    assert tried > 500
    # A tag filter's value is data, not syntax: bound, it matches nothing and is answered 200.
    for attack in attacks(database):
        if "\x00" in attack or len(attack) > 256:
            continue
        resp = await w.viewer.get(
            "/api/v1/device-types/thermostat/telemetry/aggregate",
            params={"tag": f"site={attack}", "start": str(w.t0), "end": str(w.t(10)), "every": "10m"},
        )
        assert resp.status_code == 200, (attack, resp.text)
        assert resp.json()["groups"] == [], attack
    after = await snapshot(w)
    assert after == before
    # And the data still answers with its known values.
    resp = await w.viewer.get(
        f"/api/v1/devices/{w.a}/telemetry", params={"fields": "temperature_c", "start": w.t0, "end": w.t(10)}
    )
    assert [p["temperature_c"] for p in resp.json()["points"]] == [20.0 + i for i in range(10)] + [30.0, 31.5]


async def test_a_quoted_value_in_a_valid_tag_key_group_is_only_a_group(world: World) -> None:
    """The permitted tag-key alphabet (the registry's) includes ':' '.' '-': still one quoted identifier."""
    w = world
    resp = await w.viewer.get(
        "/api/v1/device-types/thermostat/telemetry/aggregate",
        params={
            "group_by": "a:b.c-d",
            "fields": "temperature_c",
            "start": w.t0,
            "end": w.t(5),
            "every": "5m",
        },
    )
    assert resp.status_code == 200, resp.text
    assert [g["tags"] for g in resp.json()["groups"]] == [{"a:b.c-d": ""}]
