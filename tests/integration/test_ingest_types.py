"""Each device type's readings, single and batched, land in InfluxDB exactly as the model says."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.influx import quote_identifier
from tests.harness import Broker, Influxd
from tests.ingest_support import (
    BASE_TS_MS,
    IngestProcess,
    Publisher,
    device_rows,
    influx_query,
    provision_publisher,
    stored_count,
    telemetry,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(fresh_broker: Broker) -> Broker:
    """A broker of this test's own: ingest sessions are persistent and their shared subscriptions
    outlive the test, so on a shared broker an earlier test's offline session would take a share
    of this test's messages (see telemetry_ingest/README.md, "Replicas")."""
    return fresh_broker


# Per type: two readings (the second with a JSON int in a float field) and the InfluxDB field types.
CASES: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {
    "thermostat": (
        [
            {"temperature_c": 21.5, "humidity_pct": 40.5, "setpoint_c": 20.5, "mode": "heat"},
            {"temperature_c": 22, "humidity_pct": 41, "setpoint_c": 21, "mode": "cool"},
        ],
        {"temperature_c": "float", "humidity_pct": "float", "setpoint_c": "float", "mode": "string"},
    ),
    "air_quality": (
        [
            {"co2_ppm": 612, "pm2_5_ugm3": 3.5, "voc_index": 100, "ventilation_pct": 25.0},
            {"co2_ppm": 1500, "pm2_5_ugm3": 12, "voc_index": 250, "ventilation_pct": 80},
        ],
        {"co2_ppm": "integer", "pm2_5_ugm3": "float", "voc_index": "integer", "ventilation_pct": "float"},
    ),
    "smart_plug": (
        [
            {"power_w": 120.5, "voltage_v": 230.1, "current_a": 0.52, "energy_kwh": 12.25, "relay_on": True},
            {"power_w": 0, "voltage_v": 229, "current_a": 0, "energy_kwh": 12.25, "relay_on": False},
        ],
        {
            "power_w": "float",
            "voltage_v": "float",
            "current_a": "float",
            "energy_kwh": "float",
            "relay_on": "boolean",
        },
    ),
    "gps_tracker": (
        [
            {"lat": 48.8566, "lon": 2.3522, "speed_kmh": 42.5, "heading_deg": 359.9, "battery_pct": 88.0},
            {"lat": -33.86, "lon": 151.2, "speed_kmh": 0, "heading_deg": 0, "battery_pct": 87},
        ],
        {
            "lat": "float",
            "lon": "float",
            "speed_kmh": "float",
            "heading_deg": "float",
            "battery_pct": "float",
        },
    ),
}


def test_every_catalogue_type_has_a_case() -> None:
    assert set(CASES) == set(DEVICE_TYPES)


@pytest.mark.parametrize("type_name", list(DEVICE_TYPES))
def test_readings_land_with_measurement_tags_fields_types_and_device_time(
    type_name: str,
    *,
    broker: Broker,
    influxd: Influxd,
    database: str,
    tmp_path: Path,
    uid: Callable[[str], str],
) -> None:
    (first, second), field_types = CASES[type_name]
    single_id, batch_id = uid("single"), uid("batch")
    ingest = IngestProcess(
        broker,
        influxd,
        database,
        tmp_path,
        device_type=type_name,
        extra_env={"IOTFLEET_INGEST__EXTRA_TAGS": '{"site": "lab 1"}'},
    ).start()
    try:
        ingest.wait_healthy()
        user, password = provision_publisher(broker, type_name, [single_id, batch_id])
        publisher = Publisher(broker, user, password).connect()
        ts1 = BASE_TS_MS + 1
        # one reading with an epoch-ms ts; one with an RFC 3339 ts (converted to the same ms)
        publisher.publish(telemetry(type_name, single_id), orjson.dumps({"ts": ts1, "seq": 1, **first}))
        ts2 = BASE_TS_MS + 2
        rfc3339 = datetime.fromtimestamp(ts2 / 1000, timezone(timedelta(hours=1))).isoformat(
            timespec="milliseconds"
        )
        assert rfc3339.endswith("+01:00")
        publisher.publish(telemetry(type_name, single_id), orjson.dumps({"ts": rfc3339, "seq": 2, **second}))
        # a batch of 50, as a JSON array
        batch = [{"ts": BASE_TS_MS + i, "seq": i, **(first if i % 2 else second)} for i in range(50)]
        publisher.publish(telemetry(type_name, batch_id), orjson.dumps(batch))
        publisher.wait_acked(3)
        assert publisher.refused == []
        wait_for(
            lambda: stored_count(influxd, database, type_name) == 52, timeout=20, what="52 readings stored"
        )

        rows = device_rows(influxd, database, type_name, single_id)
        assert [r["time"] for r in rows] == [ts1, ts2]
        by_seq = {r["seq"]: r for r in rows}
        for seq, sent in ((1, first), (2, second)):
            row = by_seq[seq]
            assert row["site"] == "lab 1"
            for name, value in sent.items():
                assert row[name] == value, name
        assert by_seq[1]["time"] == ts1
        assert by_seq[2]["time"] == ts2

        batch_rows = device_rows(influxd, database, type_name, batch_id)
        assert [r["seq"] for r in batch_rows] == list(range(50))
        assert [r["time"] for r in batch_rows] == [BASE_TS_MS + i for i in range(50)]

        types = {
            row["fieldKey"]: row["fieldType"]
            for row in influx_query(influxd, database, f"SHOW FIELD KEYS FROM {quote_identifier(type_name)}")
        }
        assert types == {**field_types, "seq": "integer"}
        tags = {
            r["tagKey"]
            for r in influx_query(influxd, database, f"SHOW TAG KEYS FROM {quote_identifier(type_name)}")
        }
        assert tags == {"device_id", "site"}
        publisher.close()
    finally:
        assert ingest.terminate() == 0, ingest.log_tail()


def test_reading_without_ts_takes_the_arrival_time(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    device = uid("nots")
    ingest = IngestProcess(broker, influxd, database, tmp_path).start()
    try:
        ingest.wait_healthy()
        user, password = provision_publisher(broker, "thermostat", [device])
        publisher = Publisher(broker, user, password).connect()
        before = int(time.time() * 1000)
        publisher.publish(
            telemetry("thermostat", device),
            orjson.dumps(
                {"seq": 1, "temperature_c": 20.0, "humidity_pct": 40, "setpoint_c": 20, "mode": "off"}
            ),
        )
        publisher.wait_acked(1)
        rows = wait_for(
            lambda: device_rows(influxd, database, "thermostat", device), timeout=20, what="stored"
        )
        after = int(time.time() * 1000)
        assert before - 1000 <= rows[0]["time"] <= after
        publisher.close()
    finally:
        ingest.terminate()
