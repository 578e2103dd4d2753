"""The pipeline's ordering, retry and buffering rules, with a scripted writer and transport."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from iotfleet.catalogue import get_device_type
from iotfleet.influx import InfluxError
from iotfleet.settings import IngestSettings
from telemetry_ingest import backoff
from telemetry_ingest.metrics import IngestMetrics
from telemetry_ingest.pipeline import Pipeline

NOW_MS = 1_764_240_000_000
TOPIC = "devices/thermostat/t1/telemetry"


def reading(seq: int) -> bytes:
    return orjson.dumps(
        {
            "ts": NOW_MS + seq,
            "seq": seq,
            "temperature_c": 20.0,
            "humidity_pct": 40,
            "setpoint_c": 20,
            "mode": "off",
        }
    )


class FakeTransport:
    connected = True

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self.paused = False

    def ack(self, tokens: list[int]) -> None:
        self.acked.extend(tokens)

    def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class ScriptedWriter:
    """Each write waits for the test to release it, or fails with the queued errors first."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.errors: list[InfluxError] = []
        self.gates: list[asyncio.Event] = []
        self.hold = False

    async def write(self, lines: bytes | str, *, database: str | None = None, precision: str = "ms") -> None:
        if self.errors:
            raise self.errors.pop(0)
        body = lines if isinstance(lines, bytes) else lines.encode()
        if self.hold:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if b"REFUSE" in body or b"temperature_c=66.0" in body:
            raise InfluxError("field type conflict", status=400, retryable=False)
        self.bodies.append(body)

    async def ensure_database(self) -> None:
        pass


def make(**overrides: object) -> tuple[Pipeline, FakeTransport, ScriptedWriter]:
    settings = IngestSettings(**{"batch_max_readings": 2, "batch_max_age_ms": 20, **overrides})  # type: ignore[arg-type]
    transport = FakeTransport()
    writer = ScriptedWriter()
    pipe = Pipeline(
        get_device_type("thermostat"),
        settings,
        writer,
        transport,
        IngestMetrics("thermostat"),
        clock_ms=lambda: NOW_MS,
    )
    return pipe, transport, writer


async def until(check: Callable[[], object]) -> None:
    """Poll a condition on the fakes (they have no events to wait on), for at most 5 s."""
    async with asyncio.timeout(5.0):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff, "BACKOFF_FIRST_S", 0.001)
    monkeypatch.setattr(backoff, "BACKOFF_CAP_S", 0.01)


async def test_acks_wait_for_storage_and_keep_arrival_order() -> None:
    pipe, transport, writer = make()
    writer.hold = True
    for token in range(1, 5):  # two batches of two
        pipe.handle(TOPIC, reading(token), token)
    await until(lambda: len(writer.gates) == 2)
    assert transport.acked == []
    writer.gates[1].set()  # the second batch is stored first...
    await asyncio.sleep(0.02)
    assert transport.acked == []  # ...but its acks wait for the first
    writer.gates[0].set()
    await until(lambda: transport.acked == [1, 2, 3, 4])
    assert pipe.buffered == 0


async def test_invalid_message_is_acked_after_earlier_valid_ones() -> None:
    pipe, transport, writer = make(batch_max_readings=10)
    writer.hold = True
    pipe.handle(TOPIC, reading(1), 1)
    pipe.handle(TOPIC, b"garbage", 2)
    pipe.handle(TOPIC, reading(3), 3)
    assert transport.published and transport.published[0][0] == "deadletter/thermostat/t1"
    await until(lambda: writer.gates)
    assert transport.acked == []
    writer.gates[0].set()
    await until(lambda: transport.acked == [1, 2, 3])


async def test_invalid_message_alone_is_acked_at_once() -> None:
    pipe, transport, _ = make()
    pipe.handle(TOPIC, b"[]", 9)
    assert transport.acked == [9]
    assert pipe.metrics.rejected["empty_batch"]._value.get() == 1


async def test_influx_down_is_retried_until_it_takes_the_batch() -> None:
    pipe, transport, writer = make()
    writer.errors = [InfluxError("connection refused")] * 5 + [InfluxError("503", status=503)]
    pipe.handle(TOPIC, reading(1), 1)
    pipe.handle(TOPIC, reading(2), 2)
    await until(lambda: transport.acked == [1, 2])
    assert len(writer.bodies) == 1
    assert pipe.metrics.write_errors["retryable"]._value.get() == 6
    assert pipe.influx_ok


async def test_refused_batch_is_split_and_the_refused_message_dead_lettered() -> None:
    pipe, transport, writer = make(batch_max_readings=3)
    bad = orjson.loads(reading(2))
    bad["temperature_c"] = 66.0  # the scripted writer refuses this one, as a type conflict would be
    pipe.handle(TOPIC, reading(1), 1)
    pipe.handle(TOPIC, orjson.dumps(bad), 2)
    pipe.handle(TOPIC, reading(3), 3)
    await until(lambda: transport.acked == [1, 2, 3])
    assert len(writer.bodies) == 2  # readings 1 and 3, one by one
    (topic, body) = transport.published[0]
    assert topic == "deadletter/thermostat/t1"
    assert orjson.loads(body)["reason"] == "storage_refused"


async def test_buffer_bound_pauses_reading_until_acks_free_it() -> None:
    pipe, transport, writer = make(batch_max_readings=500, buffer_max_readings=1000)
    writer.hold = True
    for token in range(1, 1001):
        pipe.handle(TOPIC, reading(token), token)
    assert transport.paused
    await until(lambda: len(writer.gates) == 2)
    for gate in writer.gates:
        gate.set()
    await until(lambda: not transport.paused)
    assert len(transport.acked) == 1000


async def test_drain_with_influx_down_gives_up_without_acking() -> None:
    pipe, transport, writer = make(batch_max_readings=100)
    writer.errors = [InfluxError("down")] * 10_000
    pipe.handle(TOPIC, reading(1), 1)
    assert await pipe.drain(0.1) is False
    assert transport.acked == []


async def test_drain_flushes_the_open_batch() -> None:
    pipe, transport, _ = make(batch_max_readings=100, batch_max_age_ms=60_000)
    pipe.handle(TOPIC, reading(1), 1)
    assert await pipe.drain(5) is True
    assert transport.acked == [1]


async def test_foreign_type_topic_is_dead_lettered() -> None:
    pipe, transport, _ = make()
    pipe.handle("devices/toaster/x1/telemetry", reading(1), 4)
    assert transport.acked == [4]
    assert orjson.loads(transport.published[0][1])["reason"] == "unknown_device_type"


async def test_catch_all_dead_letters_only_unknown_types() -> None:
    transport = FakeTransport()
    pipe = Pipeline(None, IngestSettings(), ScriptedWriter(), transport, IngestMetrics("unknown-types"))
    pipe.handle("devices/thermostat/t1/telemetry", reading(1), 0)
    pipe.handle("devices/toaster/x1/telemetry", reading(1), 0)
    # the dead letter, then the device's own feedback on its errors topic
    assert [t for t, _ in transport.published] == ["deadletter/toaster/x1", "devices/toaster/x1/errors"]
    body = orjson.loads(transport.published[0][1])
    assert body["errors"][0]["field"] == "topic"
    assert "toaster" in body["errors"][0]["message"]


async def test_idle_writer_writes_after_the_linger_and_batches_grow_while_busy() -> None:
    pipe, transport, writer = make(batch_max_readings=1000, batch_max_age_ms=60_000, batch_linger_ms=5)
    writer.hold = True
    pipe.handle(TOPIC, reading(1), 1)  # writer idle: closed after 5 ms, not 60 s
    await until(lambda: len(writer.gates) == 1)
    for token in range(2, 52):  # arrive while the first write is in flight: they wait for it...
        pipe.handle(TOPIC, reading(token), token)
    await asyncio.sleep(0.05)
    assert len(writer.gates) == 1
    writer.gates[0].set()  # ...and go out as one batch the moment it completes
    await until(lambda: len(writer.gates) == 2)
    writer.gates[1].set()
    await until(lambda: transport.acked == list(range(1, 52)))
    assert [body.count(b"\n") for body in writer.bodies] == [1, 50]


async def test_without_linger_a_batch_waits_for_its_age() -> None:
    pipe, _, writer = make(batch_max_readings=1000, batch_max_age_ms=200, batch_linger_ms=0)
    pipe.handle(TOPIC, reading(1), 1)
    await asyncio.sleep(0.1)
    assert writer.bodies == []
    await until(lambda: writer.bodies)


async def test_an_unexpected_error_dead_letters_the_message_and_the_stream_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe, transport, writer = make(batch_max_readings=2)
    assert pipe._encoder is not None
    real_encode = pipe._encoder.encode

    def flaky(prefix: str, reading: object, ts: int) -> str:
        if getattr(reading, "seq", None) == 2:
            raise ValueError("cannot encode")
        return real_encode(prefix, reading, ts)  # type: ignore[arg-type]

    monkeypatch.setattr(pipe._encoder, "encode", flaky)
    for token in (1, 2, 3):
        pipe.handle(TOPIC, reading(token), token)
    await until(lambda: transport.acked == [1, 2, 3])
    assert [line.split(b",")[0] for line in writer.bodies[0].splitlines()] == [b"thermostat", b"thermostat"]
    # readings 1 and 3 stored; the failure counted in the dead-letter records
    [record] = writer.bodies[1].splitlines()
    assert record.startswith(b"deadletters,") and b"reason=invalid_value" in record
    assert "internal error" in orjson.loads(transport.published[0][1])["errors"][0]["message"]
