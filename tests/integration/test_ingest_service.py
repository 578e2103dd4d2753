"""The ingest as an operated service: starts before its dependencies, reports health, fails fast on
bad configuration, and on SIGTERM stores and acknowledges what it received."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from iotfleet.stack import probes
from tests.harness import Broker, Influxd, env_for
from tests.ingest_support import (
    IngestProcess,
    Publisher,
    provision_publisher,
    stored_count,
    telemetry,
    thermostat_reading,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(fresh_broker: Broker) -> Broker:
    """A broker of this test's own: ingest sessions are persistent and their shared subscriptions
    outlive the test, so on a shared broker an earlier test's offline session would take a share
    of this test's messages (see telemetry_ingest/README.md, "Replicas")."""
    return fresh_broker


def test_starts_degraded_without_broker_and_influxdb_then_becomes_healthy(
    tmp_path: Path, uid: Callable[[str], str]
) -> None:
    broker = Broker(tmp_path / "mosquitto")  # not started yet: only its free port is chosen
    influxd = Influxd(tmp_path / "influxd")
    ingest = IngestProcess(
        broker, influxd, "svc", tmp_path / "ingest", extra_env={"IOTFLEET_INGEST__TRANSPORT": "fast"}
    )
    ingest.env["IOTFLEET_MQTT__PASSWORD"] = broker.passwords["iotfleet-ingest"]
    ingest.start()
    try:
        body = wait_for(
            lambda: (b := ingest.health()) and "cannot connect" in b["mqtt_error"] and b,
            timeout=20,
            what="/healthz reports the broker unreachable",
        )
        assert body["http_status"] == 503
        assert body["status"] == "degraded"
        assert body["mqtt_connected"] is False and body["influx_reachable"] is False
        assert "cannot connect" in body["mqtt_error"]
        broker.start()
        influxd.start()
        body = ingest.wait_healthy(timeout=30)
        assert body["mqtt_connected"] and body["influx_reachable"]
        metrics = ingest.metrics()
        for name in (
            "iotfleet_ingest_received_messages_total",
            "iotfleet_ingest_stored_readings_total",
            "iotfleet_ingest_rejected_messages_total",
            "iotfleet_ingest_batch_readings_bucket",
            "iotfleet_ingest_write_seconds_bucket",
            "iotfleet_ingest_buffer_readings",
            "iotfleet_ingest_write_errors_total",
        ):
            assert name in metrics, name
        log = ingest.log_path.read_text()
        assert log.count(" ready ") == 1, log
        # one line per lifecycle event, not one per retry
        assert log.count("degraded: no broker session") == 1, log
        assert log.count("degraded: InfluxDB unavailable") == 1, log
    finally:
        assert ingest.terminate() == 0, ingest.log_tail()
        broker.stop()
        influxd.stop()


@pytest.mark.parametrize(
    ("env", "argv", "named"),
    [
        (
            {"IOTFLEET_INGEST__BATCH_MAX_READINGS": "0"},
            ["--type", "thermostat"],
            "IOTFLEET_INGEST__BATCH_MAX_READINGS",
        ),
        ({"IOTFLEET_INGEST__DEVICE_TYPE": "toaster"}, [], "IOTFLEET_INGEST__DEVICE_TYPE"),
        ({"IOTFLEET_MQTT__PORT": "not-a-port"}, ["--type", "thermostat"], "IOTFLEET_MQTT__PORT"),
        ({"IOTFLEET_INGEST__EXTRA_TAGS": '{"device_id": "x"}'}, ["--type", "thermostat"], "EXTRA_TAGS"),
        ({}, [], "IOTFLEET_INGEST__DEVICE_TYPE"),
    ],
)
def test_bad_configuration_fails_fast_naming_the_setting(
    env: dict[str, str], argv: list[str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "telemetry_ingest.runner", *argv],
        check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("IOTFLEET_")}, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_flushes_and_acks_what_was_received(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    # Batches would only close after a minute: only the graceful stop can store these readings.
    slow = {
        "IOTFLEET_INGEST__BATCH_MAX_AGE_MS": "60000",
        "IOTFLEET_INGEST__BATCH_MAX_READINGS": "100000",
        "IOTFLEET_INGEST__BATCH_LINGER_MS": "0",
    }
    replica = uid("r")
    device = uid("dev")
    # the per-type console script, as the stack starts it
    script = [str(Path(sys.executable).parent / "ingest-thermostat")]
    ingest = IngestProcess(broker, influxd, database, tmp_path, replica=replica, extra_env=slow)
    ingest.argv = script
    ingest.start()
    ingest.wait_healthy()
    user, password = provision_publisher(broker, "thermostat", [device])
    publisher = Publisher(broker, user, password).connect()
    for seq in range(300):
        publisher.publish(telemetry("thermostat", device), orjson.dumps(thermostat_reading(0, seq)))
    publisher.wait_acked(300)
    wait_for(
        lambda: (h := ingest.health()) is not None and h["buffer_readings"] == 300,
        timeout=10,
        what="300 readings buffered",
    )
    assert stored_count(influxd, database, "thermostat") == 0
    assert ingest.terminate() == 0
    assert stored_count(influxd, database, "thermostat") == 300
    assert "stopped unacked_readings=0 drained=True" in ingest.log_path.read_text()
    # Acked: the same session, restarted, gets nothing redelivered.
    again = IngestProcess(broker, influxd, database, tmp_path / "again", replica=replica)
    again.start()
    try:
        again.wait_healthy()
        publisher.publish(telemetry("thermostat", device), orjson.dumps(thermostat_reading(0, 300)))
        wait_for(lambda: stored_count(influxd, database, "thermostat") == 301, timeout=10, what="301 stored")
        assert again.metric("iotfleet_ingest_received_messages_total") == 1
    finally:
        again.terminate()
        publisher.close()


def test_health_port_in_use_fails_fast(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path
) -> None:
    port = probes.free_port()
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        env = env_for(broker, influxd, database, tmp_path)
        env.update({"IOTFLEET_HEALTH__PORT": str(port), "IOTFLEET_INGEST__DEVICE_TYPE": "thermostat"})
        result = subprocess.run(
            [sys.executable, "-m", "telemetry_ingest.runner"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2, result.stderr
    assert "IOTFLEET_HEALTH__PORT" in result.stderr
