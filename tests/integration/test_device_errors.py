"""A device learns why its reading was rejected, on its own ``errors`` topic (issue #16).

The device is provisioned the way the registry does it (through the broker agent into the
broker's device plugin), subscribes to its own errors topic (and may not subscribe to another
device's), publishes a bad reading and then a good one, and hears about the bad one only.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from iotfleet import broker_files, topics
from iotfleet.topics import Channel
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess, device_rows, wait_for
from tests.registry_harness import connect_device

pytestmark = pytest.mark.integration

GOOD = {"temperature_c": 21.5, "humidity_pct": 40.0, "setpoint_c": 20.0, "mode": "heat"}


@pytest.fixture
def broker(fresh_broker: Broker) -> Broker:
    return fresh_broker  # the ingest's persistent shared session must not outlive into other tests


def provision(broker: Broker, devices: dict[str, str]) -> None:
    """Thermostats with these passwords, through the agent (what the registry does)."""
    upsert = [
        {"id": device_id, "type": "thermostat", "hash": broker_files.hash_password(password)}
        for device_id, password in devices.items()
    ]
    resp = httpx.post(
        f"http://{broker.host}:{broker.agent_port}/v1/changes",
        json={"upsert": upsert, "remove": []},
        headers={"Authorization": f"Bearer {broker.agent_token}"},
        timeout=30,
    )
    assert resp.status_code == 200 and resp.json()["reloaded"], resp.text


def test_a_rejected_reading_is_reported_to_its_device(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    mine, other = uid("mine"), uid("other")
    passwords = {mine: secrets.token_urlsafe(16), other: secrets.token_urlsafe(16)}
    provision(broker, passwords)
    ingest = IngestProcess(broker, influxd, database, tmp_path).start()
    device = connect_device(broker, mine, passwords[mine])
    try:
        ingest.wait_healthy()
        own_errors = topics.device_topic("thermostat", mine, Channel.ERRORS)
        assert not device.subscribe(own_errors).is_failure
        assert device.subscribe(topics.device_topic("thermostat", other, Channel.ERRORS)).value == 135
        assert device.publish(topics.device_topic("thermostat", mine, Channel.ERRORS), b"{}").value == 135

        telemetry = topics.device_topic("thermostat", mine, Channel.TELEMETRY)
        now = int(time.time() * 1000)
        bad = orjson.dumps({"ts": now, "seq": 7, **GOOD, "temperature_c": 120.0})
        assert device.publish(telemetry, bad).value < 0x80
        assert device.publish(telemetry, orjson.dumps({"ts": now + 1, "seq": 8, **GOOD})).value < 0x80

        errors = wait_for(
            lambda: [m for m in device.messages if m.topic == own_errors], timeout=15, what="error report"
        )
        body = orjson.loads(errors[0].payload)
        assert body["seq"] == 7 and body["reason"] == "out_of_range", body
        assert body["errors"][0]["field"] == "temperature_c" and "85" in body["errors"][0]["message"]
        assert body["errors_cut"] == 0 and body["received_at"].endswith("Z")
        # The good reading is stored and reported nowhere: once it is queryable, no second report came.
        wait_for(lambda: device_rows(influxd, database, "thermostat", mine), timeout=15, what="good reading")
        assert len([m for m in device.messages if m.topic == own_errors]) == 1
    finally:
        device.close()
        assert ingest.terminate() == 0, ingest.log_tail()
