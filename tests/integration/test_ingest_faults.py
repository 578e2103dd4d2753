"""Nothing acknowledged is lost, and everything is stored exactly once, through crashes and outages.

Each test streams 20,000 QoS 1 readings (10 devices x 2,000, ts = base + seq) and
breaks something in the middle; afterwards the stored ``seq`` values of every
device must be exactly 0..1999 (no gap, no duplicate). The ingest runs as a
real subprocess; the broker and InfluxDB are real processes of the test's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Broker, Influxd
from tests.ingest_support import (
    IngestProcess,
    Publisher,
    StreamPublisher,
    provision_publisher,
    stored_count,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 10
PER_DEVICE = 2_000
RATE = 5_000  # readings/s: the stream lasts ~4 s, so there is a "middle" to break things in


def stream(
    broker: Broker,
    uid: Callable[[str], str],
    *,
    persistent: bool = False,
    resend_unrouted: bool = False,
    prefix: str = "d",
) -> StreamPublisher:
    devices = [uid(f"{prefix}{i}") for i in range(DEVICES)]
    user, password = provision_publisher(broker, "thermostat", devices)
    publisher = Publisher(
        broker, user, password, persistent=persistent, resend_unrouted=resend_unrouted
    ).connect()
    return StreamPublisher(publisher, devices, PER_DEVICE, RATE)


def wait_stored(influxd: Influxd, database: str, at_least: int, timeout: float) -> None:
    wait_for(
        lambda: stored_count(influxd, database, "thermostat") >= at_least,
        timeout=timeout,
        what=f"{at_least} readings stored",
        interval=0.02,
    )


@pytest.mark.parametrize("transport", ["fast", "paho"])
def test_kill_9_mid_stream_then_restart_loses_nothing(
    transport: str,
    *,
    fresh_broker: Broker,
    influxd: Influxd,
    database: str,
    tmp_path: Path,
    uid: Callable[[str], str],
) -> None:
    env = {"IOTFLEET_INGEST__TRANSPORT": transport}
    ingest = IngestProcess(fresh_broker, influxd, database, tmp_path, extra_env=env).start()
    ingest.wait_healthy()
    publisher = stream(fresh_broker, uid)
    publisher.start()
    wait_stored(influxd, database, 5_000, timeout=30)
    ingest.kill9()  # no flush, no ack of the last batches: the broker keeps them unacked
    at_kill = stored_count(influxd, database, "thermostat")
    assert at_kill < publisher.total, "the stream was over before the kill"
    # same replica name: same client id, same session, its unacked messages come back
    restarted = IngestProcess(fresh_broker, influxd, database, tmp_path, extra_env=env).start()
    restarted.wait_healthy()
    publisher.join(timeout=30)
    publisher.publisher.wait_acked(publisher.total)
    wait_stored(influxd, database, publisher.total, timeout=60)
    publisher.assert_stored_exactly_once(influxd, database)
    assert restarted.terminate() == 0
    publisher.publisher.close()


def test_influxdb_down_20_s_mid_stream_loses_nothing(
    fresh_broker: Broker, fresh_influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    broker = fresh_broker
    ingest = IngestProcess(
        broker,
        fresh_influxd,
        database,
        tmp_path,
        replica=uid("r"),
        extra_env={"IOTFLEET_INGEST__BUFFER_MAX_READINGS": "5000"},
    ).start()
    try:
        ingest.wait_healthy()
        publisher = stream(broker, uid)
        publisher.start()
        wait_stored(fresh_influxd, database, 5_000, timeout=30)
        fresh_influxd.stop()
        down_since = time.monotonic()
        # Readings that surely arrive during the outage, however fast the first stream went (on a
        # loaded machine it could be stored whole before the stop).
        late = stream(broker, uid, prefix="late")
        late.start()
        # The outage itself is the test's subject (20 s, as the issue requires); meanwhile the
        # service must say it is degraded and hold at most its bounded buffer.
        max_buffer = 0
        saw_degraded = False
        while time.monotonic() - down_since < 20:
            health = ingest.health()
            assert health is not None, ingest.log_tail()
            if health["http_status"] == 503 and not health["influx_reachable"]:
                saw_degraded = True
            max_buffer = max(max_buffer, health["buffer_readings"])
            time.sleep(0.2)
        assert saw_degraded
        # bounded: the buffer bound plus what one socket read can bring in before reading pauses
        assert 0 < max_buffer <= 5_000 + 3_000, max_buffer
        fresh_influxd.start()
        for each in (publisher, late):
            each.join(timeout=30)
            each.publisher.wait_acked(each.total)
        wait_stored(fresh_influxd, database, publisher.total + late.total, timeout=60)
        publisher.assert_stored_exactly_once(fresh_influxd, database)
        late.assert_stored_exactly_once(fresh_influxd, database)
        ingest.wait_healthy()
        assert ingest.metric("iotfleet_ingest_write_errors_total", kind="retryable") > 0
        publisher.publisher.close()
        late.publisher.close()
    finally:
        assert ingest.terminate() == 0, ingest.log_tail()


@pytest.mark.parametrize(
    ("shared", "transport"),
    [
        pytest.param(True, "fast", id="shared-subscription+device-resends-0x10"),
        # Issue #19: ingest replicas on several hosts share one subscription; paho's transport
        # re-subscribes in on_connect too, so it keeps storing after the broker comes back.
        pytest.param(True, "paho", id="shared-subscription+paho-transport"),
        pytest.param(False, "fast", id="single-replica-non-shared-subscription"),
    ],
)
def test_broker_restart_mid_stream_loses_nothing(
    shared: bool,
    transport: str,
    *,
    fresh_broker: Broker,
    influxd: Influxd,
    database: str,
    tmp_path: Path,
    uid: Callable[[str], str],
) -> None:
    """Mosquitto 2.0 saves sessions and queues on SIGTERM but does not restore *shared*
    subscriptions: until the ingest has reconnected and subscribed again, a publish matches
    no subscriber and gets PUBACK 0x10. With a shared subscription the device must resend
    those (the contract in docs); a single replica can use a non-shared subscription, which
    the broker restores, and then needs nothing from the device."""
    ingest = IngestProcess(
        fresh_broker,
        influxd,
        database,
        tmp_path,
        extra_env={
            "IOTFLEET_INGEST__SHARED_SUBSCRIPTION": str(shared).lower(),
            "IOTFLEET_INGEST__TRANSPORT": transport,
        },
    ).start()
    try:
        ingest.wait_healthy()
        # persistent: the publisher's in-flight messages are resent after the restart
        publisher = stream(fresh_broker, uid, persistent=True, resend_unrouted=shared)
        publisher.start()
        wait_stored(influxd, database, 5_000, timeout=30)
        fresh_broker.restart()  # SIGTERM: mosquitto saves sessions and queues, then starts again
        assert stored_count(influxd, database, "thermostat") < publisher.total, "stream over before restart"
        publisher.join(timeout=60)
        publisher.publisher.wait_acked(publisher.total)
        wait_stored(influxd, database, publisher.total, timeout=60)
        publisher.assert_stored_exactly_once(influxd, database)
        ingest.wait_healthy()
        publisher.publisher.close()
    finally:
        assert ingest.terminate() == 0, ingest.log_tail()


def test_two_replicas_split_the_stream_and_the_union_is_complete(
    fresh_broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    replicas = [
        IngestProcess(fresh_broker, influxd, database, tmp_path / name, replica=name).start()
        for name in ("a", "b")
    ]
    try:
        for replica in replicas:
            replica.wait_healthy()
        publisher = stream(fresh_broker, uid)
        publisher.start()
        publisher.join(timeout=30)
        publisher.publisher.wait_acked(publisher.total)
        wait_stored(influxd, database, publisher.total, timeout=60)
        publisher.assert_stored_exactly_once(influxd, database)
        shares = [r.metric("iotfleet_ingest_stored_readings_total") for r in replicas]
        assert all(share > 0 for share in shares), shares
        assert sum(shares) == publisher.total, shares  # split, not duplicated
        publisher.publisher.close()
    finally:
        for replica in replicas:
            assert replica.terminate() == 0, replica.log_tail()


def test_retired_replica_hands_back_its_share(
    fresh_broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """Scaling down: a stopped replica's persistent session keeps receiving its share of the shared
    subscription; ``--retire`` stores that backlog and deletes the session, so nothing is stranded."""
    a = IngestProcess(fresh_broker, influxd, database, tmp_path / "a", replica="a").start()
    b = IngestProcess(fresh_broker, influxd, database, tmp_path / "b", replica="b").start()
    try:
        a.wait_healthy()
        b.wait_healthy()
        assert b.terminate() == 0  # gone, but its session (and subscription) stays in the group
        first = stream(fresh_broker, uid)
        first.per_device = 200
        first.start()
        first.join(timeout=30)
        first.publisher.wait_acked(first.total)
        wait_for(
            lambda: (h := a.health()) is not None and h["buffer_readings"] == 0 and h["pending_batches"] == 0,
            timeout=20,
            what="replica a idle",
        )
        stranded = first.total - stored_count(influxd, database, "thermostat")
        assert stranded > 0, "the offline replica's session got no share"

        retiring = IngestProcess(
            fresh_broker, influxd, database, tmp_path / "b", replica="b", args=["--retire"]
        )
        retiring.start()
        assert retiring.proc is not None
        assert retiring.proc.wait(timeout=60) == 0, retiring.log_tail()
        assert "session_deleted=True" in retiring.log_path.read_text()
        first.assert_stored_exactly_once(influxd, database)

        # The group is down to replica a: a new stream is stored completely by it alone.
        second = stream(fresh_broker, uid, prefix="e")
        second.per_device = 100
        second.start()
        second.join(timeout=30)
        second.publisher.wait_acked(second.total)
        wait_stored(influxd, database, first.total + second.total, timeout=30)
        second.assert_stored_exactly_once(influxd, database)
        first.publisher.close()
        second.publisher.close()
    finally:
        assert a.terminate() == 0, a.log_tail()
