"""Bad input never stops the pipeline: each malformed payload is dead-lettered with a precise
reason and counted, and the valid reading sent right after it is stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import Broker, Influxd
from tests.ingest_support import (
    BASE_TS_MS,
    IngestProcess,
    Publisher,
    Subscriber,
    device_rows,
    provision_publisher,
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


GOOD = {"temperature_c": 21.5, "humidity_pct": 40.0, "setpoint_c": 20.0, "mode": "heat"}


def good(seq: int, **changes: object) -> bytes:
    return orjson.dumps({"ts": BASE_TS_MS + seq, "seq": seq, **GOOD, **changes})


def without(field: str) -> bytes:
    body = orjson.loads(good(0))
    del body[field]
    return orjson.dumps(body)


NOW_MS = int(time.time() * 1000)

# (case, payload, expected reason, expected error field, words in the message)
MATRIX: list[tuple[str, bytes, str, str, str]] = [
    ("not json", b"temperature=21.5", "not_json", "payload", "not JSON"),
    ("truncated json", b'{"ts": 17', "not_json", "payload", "not JSON"),
    ("json scalar", b"21.5", "wrong_shape", "payload", "JSON object"),
    ("array of scalars", b"[1, 2]", "wrong_shape", "[0]", "object"),
    ("empty batch", b"[]", "empty_batch", "payload", "empty"),
    ("wrong type", good(0, temperature_c="21.5"), "wrong_type", "temperature_c", "valid number"),
    ("bool for float", good(0, humidity_pct=True), "wrong_type", "humidity_pct", "valid number"),
    ("out of range", good(0, temperature_c=120.0), "out_of_range", "temperature_c", "85"),
    ("bad enum", good(0, mode="turbo"), "invalid_value", "mode", "'heat'"),
    ("missing field", without("setpoint_c"), "missing_field", "setpoint_c", "required"),
    ("unknown field", good(0, colour="red"), "unknown_field", "colour", "not permitted"),
    ("ts in seconds", good(0, ts=NOW_MS // 1000), "out_of_range", "ts", "greater than"),
    ("future ts", good(0, ts=NOW_MS + 3_600_000), "ts_in_future", "ts", "in the future"),
    ("past ts", good(0, ts=NOW_MS - 90 * 86_400_000), "ts_too_old", "ts", "in the past"),
    (
        "bad item in batch",
        orjson.dumps([orjson.loads(good(0)), orjson.loads(good(0, mode="x"))]),
        "invalid_value",
        "[1].mode",
        "'heat'",
    ),
    (
        "400 KB payload",  # over the ingest's limit, under the broker's (mosquitto/README.md)
        b'{"temperature_c": ' + b"1" * 400_000 + b"}",
        "payload_too_large",
        "payload",
        "exceeds",
    ),
    ("invalid UTF-8", b'{"mode": "\xff\xfe"}', "invalid_utf8", "payload", "UTF-8"),
]


def test_each_malformed_payload_is_dead_lettered_and_the_next_reading_stored(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    device = uid("bad")
    ingest = IngestProcess(broker, influxd, database, tmp_path).start()
    deadletters = Subscriber(broker, f"deadletter/thermostat/{device}")
    try:
        ingest.wait_healthy()
        user, password = provision_publisher(broker, "thermostat", [device])
        publisher = Publisher(broker, user, password).connect()
        for index, (_case, payload, *_rest) in enumerate(MATRIX, start=1):
            publisher.publish(telemetry("thermostat", device), payload)
            publisher.publish(telemetry("thermostat", device), good(index))  # must still flow
        publisher.wait_acked(2 * len(MATRIX))
        assert publisher.refused == []

        letters = wait_for(
            lambda: len(deadletters.messages) >= len(MATRIX) and deadletters.json_messages(),
            timeout=20,
            what=f"{len(MATRIX)} dead letters",
        )
        assert len(letters) == len(MATRIX)
        for (case, payload, reason, field, words), (topic, body) in zip(MATRIX, letters, strict=True):
            assert topic == f"deadletter/thermostat/{device}", case
            assert body["device_id"] == device and body["device_type"] == "thermostat", case
            assert body["reason"] == reason, (case, body)
            first = body["errors"][0]
            assert (first["field"], first["reason"]) == (field, reason), (case, body)
            assert words in first["message"], (case, first)
            assert body["received_at"].endswith("Z")
            assert body["payload_bytes"] == len(payload)
            assert len(body["payload"]) <= 1024
            assert body["payload_truncated"] == (len(payload) > 1024), case

        rows = wait_for(
            lambda: (
                (r := device_rows(influxd, database, "thermostat", device)) and len(r) == len(MATRIX) and r
            ),
            timeout=20,
            what="every valid reading after a bad one stored",
        )
        assert sorted(r["seq"] for r in rows) == list(range(1, len(MATRIX) + 1))

        counted = {reason: 0 for _c, _p, reason, _f, _w in MATRIX}
        for _c, _p, reason, _f, _w in MATRIX:
            counted[reason] += 1
        for reason, count in counted.items():
            assert ingest.metric("iotfleet_ingest_rejected_messages_total", reason=reason) == count, reason
        assert ingest.metric("iotfleet_ingest_stored_readings_total") == len(MATRIX)

        # Each dead letter is also counted in InfluxDB, by reason (the fleet summary reads it).
        def recorded() -> dict[str, int]:
            response = httpx.post(
                f"{influxd.url}/query",
                data={
                    "db": database,
                    "q": f'SELECT sum("count") FROM "deadletters" WHERE "device_id" = \'{device}\''
                    ' GROUP BY "reason"',
                },
                timeout=10,
            ).json()
            series = response["results"][0].get("series", [])
            return {row["tags"]["reason"]: int(row["values"][0][1]) for row in series}

        try:
            wait_for(lambda: recorded() == counted, timeout=20, what="dead letters in InfluxDB")
        except TimeoutError:
            raise AssertionError(f"{recorded()} != {counted}") from None
        publisher.close()
    finally:
        deadletters.close()
        assert ingest.terminate() == 0, ingest.log_tail()


def test_unknown_device_type_is_dead_lettered_by_the_catch_all(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    toaster, thermostat = uid("toast"), uid("thermo")
    catch_all = IngestProcess(broker, influxd, database, tmp_path / "c", args=["--unknown-types"]).start()
    ingest = IngestProcess(broker, influxd, database, tmp_path / "t").start()
    deadletters = Subscriber(broker, "deadletter/+/" + toaster)
    try:
        catch_all.wait_healthy()
        ingest.wait_healthy()
        user, password = provision_publisher(broker, "toaster", [toaster])
        toaster_pub = Publisher(broker, user, password).connect()
        user, password = provision_publisher(broker, "thermostat", [thermostat])
        thermo_pub = Publisher(broker, user, password).connect()
        toaster_pub.publish(telemetry("toaster", toaster), b'{"ts": 1, "crispness": 7}')
        thermo_pub.publish(telemetry("thermostat", thermostat), good(1))
        letters = wait_for(deadletters.json_messages, timeout=10, what="dead letter of the toaster")
        topic, body = letters[0]
        assert topic == f"deadletter/toaster/{toaster}"
        assert body["reason"] == "unknown_device_type"
        assert body["errors"][0]["field"] == "topic"
        assert "'toaster' is not in the catalogue" in body["errors"][0]["message"]
        # the known type is stored by its own ingest, and not dead-lettered by the catch-all
        wait_for(lambda: device_rows(influxd, database, "thermostat", thermostat), timeout=10, what="stored")
        assert catch_all.metric("iotfleet_ingest_rejected_messages_total", reason="unknown_device_type") == 1
        assert len(deadletters.messages) == 1
        toaster_pub.close()
        thermo_pub.close()
    finally:
        deadletters.close()
        catch_all.terminate()
        ingest.terminate()


def test_readings_influxdb_refuses_are_dead_lettered_and_do_not_block(
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """A 4xx from InfluxDB (here a real field type conflict, as after an incompatible catalogue
    change) is not retried forever: the refused messages are dead-lettered, the rest is stored."""
    conflicting, fine = uid("conflict"), uid("fine")
    ingest = IngestProcess(broker, influxd, database, tmp_path).start()
    deadletters = Subscriber(broker, "deadletter/thermostat/#")
    try:
        ingest.wait_healthy()  # it has created the database and its retention policy "raw"
        # Seed the shard of the last hour with temperature_c as a *string*: InfluxDB will refuse
        # float temperature_c points in that shard; a week ago is another shard and still fine.
        seeded = httpx.post(
            f"{influxd.url}/write",
            params={"db": database, "rp": "raw", "precision": "ms"},
            content=f'thermostat,device_id=seed temperature_c="warm" {BASE_TS_MS}\n',
            timeout=10,
        )
        assert seeded.status_code == 204, seeded.text
        user, password = provision_publisher(broker, "thermostat", [conflicting, fine])
        publisher = Publisher(broker, user, password).connect()
        week_ago = int(time.time() * 1000) - 7 * 86_400_000
        for seq in range(3):
            publisher.publish(telemetry("thermostat", conflicting), good(seq + 1))
            publisher.publish(telemetry("thermostat", fine), good(seq, ts=week_ago + seq))
        publisher.wait_acked(6)
        letters = wait_for(
            lambda: len(deadletters.messages) >= 3 and deadletters.json_messages(),
            timeout=30,
            what="3 storage_refused dead letters",
        )
        assert {topic for topic, _ in letters} == {f"deadletter/thermostat/{conflicting}"}
        assert all(body["reason"] == "storage_refused" for _, body in letters)
        assert "field type conflict" in letters[0][1]["errors"][0]["message"]
        rows = wait_for(
            lambda: (r := device_rows(influxd, database, "thermostat", fine)) and len(r) == 3 and r,
            timeout=20,
            what="the other device's readings stored",
        )
        assert [r["seq"] for r in rows] == [0, 1, 2]
        wait_for(
            lambda: ingest.metric("iotfleet_ingest_acked_messages_total") == 6,
            timeout=10,
            what="all 6 messages acked",
        )
        assert ingest.metric("iotfleet_ingest_write_errors_total", kind="refused") > 0
        publisher.close()
    finally:
        deadletters.close()
        assert ingest.terminate() == 0, ingest.log_tail()
