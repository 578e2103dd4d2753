"""The harness itself: real servers answer, dynsec denies by default, databases are isolated."""

from __future__ import annotations

import time

import pytest

from iotfleet import dynsec
from iotfleet.influx import InfluxClient, series_rows
from iotfleet.stack import probes
from tests.harness import Broker, Influxd

pytestmark = pytest.mark.integration


def test_broker_accepts_accounts_and_refuses_anonymous(broker: Broker) -> None:
    for user in dynsec.SERVICE_USERS:
        assert probes.mqtt_ok(broker.host, broker.port, user, broker.passwords[user])
    assert not probes.mqtt_ok(broker.host, broker.port, "iotfleet-ingest", "wrong")
    assert not probes.mqtt_ok(broker.host, broker.port, "nobody", "x")


async def test_influx_database_and_retention_are_created(influxd: Influxd, database: str) -> None:
    settings = influxd.settings_for(database)
    async with InfluxClient(settings) as client:
        await client.ensure_database()
        await client.ensure_database()  # idempotent
        now_ms = int(time.time() * 1000)
        await client.write(f"thermostat,device_id=t1 temperature_c=21.5 {now_ms}\n")
        rows = list(series_rows(await client.query('SELECT "temperature_c" FROM "thermostat"')))
        policies = list(series_rows(await client.query(f'SHOW RETENTION POLICIES ON "{database}"')))
    assert rows == [{"time": now_ms, "temperature_c": 21.5}]
    assert any(p["name"] == "raw" and p["default"] for p in policies)
