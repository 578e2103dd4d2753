"""The ingest's journal with the real processes: acked while InfluxDB is down, replayed after a kill -9."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.harness import Broker, Influxd
from tests.ingest_support import (
    IngestProcess,
    Publisher,
    provision_publisher,
    seqs_by_device,
    stored_count,
    telemetry,
    thermostat_reading,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 5_000


def test_kill_9_while_influxdb_is_down_then_the_journal_is_replayed_exactly_once(
    broker: Broker, fresh_influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    device_id = uid("j")
    user, password = provision_publisher(broker, "thermostat", [device_id])
    publisher = Publisher(broker, user, password).connect()
    replica = uid("r")
    ingest = IngestProcess(broker, fresh_influxd, database, tmp_path, replica=replica).start()
    restarted: IngestProcess | None = None
    try:
        ingest.wait_healthy()
        fresh_influxd.stop()
        topic = telemetry("thermostat", device_id)
        for seq in range(N):
            publisher.publish(topic, orjson.dumps(thermostat_reading(0, seq)))
        publisher.wait_acked(N)
        # Acked to the broker although InfluxDB is down: the readings are in the journal.
        wait_for(
            lambda: ingest.metric("iotfleet_ingest_acked_messages_total") >= N, timeout=30, what="all acked"
        )
        health = ingest.health()
        assert health is not None and health["journal_pending_bytes"] > 0 and not health["influx_reachable"]
        ingest.kill9()  # the broker has nothing left to redeliver: only the journal has them
        fresh_influxd.start()
        restarted = IngestProcess(broker, fresh_influxd, database, tmp_path, replica=replica).start()
        wait_for(
            lambda: stored_count(fresh_influxd, database, "thermostat") >= N, timeout=60, what=f"{N} stored"
        )
        seqs = seqs_by_device(fresh_influxd, database, "thermostat")[device_id]
        assert sorted(seqs) == list(range(N))  # every one, once
        assert restarted.metric("iotfleet_ingest_influx_written_readings_total") >= N  # replayed
        assert "journal: replaying" in restarted.log_path.read_text()

        # A second process on the same journal (same replica name and state dir) refuses to start.
        twin = IngestProcess(broker, fresh_influxd, database, tmp_path, replica=replica).start()
        assert twin.proc is not None
        assert twin.proc.wait(timeout=30) == 2
        assert "IOTFLEET_INGEST__JOURNAL__DIRECTORY" in twin.log_tail()
    finally:
        publisher.close()
        ingest.terminate()
        if restarted is not None:
            assert restarted.terminate() == 0, restarted.log_tail()
