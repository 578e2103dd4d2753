"""Telemetry query test support: a registry and an InfluxDB database holding a known data set.

Used by ``tests/integration/test_query_*.py`` (one registry + database per
module). The data is written once, as line protocol exactly as the ingest
stores it (measurement = type, tag device_id, optional extra tags, one field
per reading field, ``seq`` an integer field); tests only read it, so they are
order-independent. Expected values in the tests are written out by hand.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import pytest_asyncio

from iotfleet.influx import InfluxClient, encode_point, quote_identifier
from tests.harness import Broker, Influxd
from tests.registry_harness import Api, connect_device, registry_settings, running_registry

PROBLEM = "application/problem+json"
MIN = 60_000


def iso(ms: int, offset_h: int = 0) -> str:
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
    stale: str  # thermostat last heard 90 min ago, its seq only a day before t0

    def t(self, minutes: float) -> int:
        return self.t0 + int(minutes * MIN)


def dataset(w: World) -> list[str]:
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
    # stale: outside the last hour (so latest has to widen its window) and outside every t0 range.
    fields = {"temperature_c": 18.5, "humidity_pct": 41.0, "setpoint_c": 19.0, "mode": "cool"}
    lines.append(encode_point("thermostat", {"device_id": w.stale}, fields, w.now - 90 * MIN))
    lines.append(
        encode_point("thermostat", {"device_id": w.stale}, {"temperature_c": 1.0, "seq": 7}, w.t(-1440))
    )
    return lines


def recent_lines(w: World, now: int) -> list[str]:
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


@pytest_asyncio.fixture(name="world", scope="module", loop_scope="module")
async def world_fixture(
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
            "stale": ("thermostat", f"q-stale-{token}"),
        }
        resp = await api.http.post(
            "/api/v1/devices/bulk", json={"devices": [{"id": i, "type": t} for t, i in ids.values()]}
        )
        assert resp.status_code == 201, resp.text
        passwords = {d["id"]: d["credentials"]["password"] for d in resp.json()["devices"]}
        resp = await api.http.post("/api/v1/api-keys", json={"name": "query viewer", "role": "viewer"})
        assert resp.status_code == 201, resp.text
        # Device a is really connected (presence follows the broker's connections): online.
        online = connect_device(session_broker, ids["a"][1], passwords[ids["a"][1]])
        try:
            await _until_online(api, ids["a"][1])
            async with api.as_(resp.json()["key"]) as viewer:
                w = World(api, viewer, influx, t0, now, **{k: v[1] for k, v in ids.items()})
                await influx.write("\n".join(dataset(w)))
                yield w
        finally:
            online.close()
        await influx.query(f"DROP DATABASE {quote_identifier(database)}")


async def _until_online(api: Api, device_id: str) -> None:
    for _ in range(200):  # 20 s
        if (await api.http.get(f"/api/v1/devices/{device_id}")).json().get("online") is True:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{device_id} never shown online")


async def get(w: World, path: str, status: int = 200, **params: Any) -> Any:
    resp = await w.viewer.get(path, params=params)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert resp.headers["content-type"].startswith(PROBLEM)
        body = resp.json()
        assert body["status"] == status and body["detail"]
        return body
    return resp.json()
