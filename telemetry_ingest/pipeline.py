"""The ingest pipeline: validate, batch, write to InfluxDB, then acknowledge to the broker in order.

Everything here runs on one asyncio loop. A transport (``mqtt.py``) feeds
messages in arrival order through ``handle(topic, payload, token)`` and gets
back ``ack(tokens)`` calls, also in arrival order, only once every reading of
those messages is in InfluxDB (or the message was dead-lettered). Messages that
are never acked (crash, InfluxDB down at shutdown) are redelivered by the broker
from the persistent session, and re-stored idempotently: InfluxDB overwrites a
point with the same measurement, tag set and timestamp.

Batches close at ``batch_max_readings`` or ``batch_max_age_ms``, or as soon as the
writer is idle (after ``batch_linger_ms``), so the batch size follows the load; up to
``write_concurrency`` writes are in flight, so the next batch fills while the
previous one is written. While InfluxDB is down the batch is retried with capped
exponential backoff, forever: nothing is dropped. Unacked readings are bounded by
``buffer_max_readings``: above it the transport stops reading its socket, the
broker's receive-maximum window fills and the backlog stays in the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from iotfleet.catalogue import DEVICE_TYPES, DeviceType
from iotfleet.errors import TopicError
from iotfleet.influx import InfluxError, encode_point
from iotfleet.settings import IngestSettings
from iotfleet.topics import Channel, deadletter_topic, device_topic, parse_device_topic
from telemetry_ingest.backoff import retry_delay
from telemetry_ingest.lines import LineEncoder
from telemetry_ingest.metrics import IngestMetrics
from telemetry_ingest.validation import (
    BAD_TOPIC,
    INVALID_VALUE,
    STORAGE_REFUSED,
    UNKNOWN_DEVICE_TYPE,
    Admission,
    Limits,
    Rejected,
    dead_letter,
    device_error,
)

log = logging.getLogger(__name__)


DEADLETTER_MEASUREMENT = "deadletters"
DEADLETTER_RECORD_ERRORS = 5
"""Field-level errors kept with each dead-letter record in InfluxDB (the MQTT dead letter has more)."""
"""InfluxDB measurement counting dead letters: tags device_type, device_id, reason; field count=1i."""


class Transport(Protocol):
    """What the pipeline needs from the MQTT side."""

    @property
    def connected(self) -> bool: ...

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge these messages (in this order); tokens of an older connection are ignored."""

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 (dead letters)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Writer(Protocol):
    async def write(
        self, lines: bytes | str, *, database: str | None = None, precision: str = "ms"
    ) -> None: ...

    async def ensure_database(self) -> None: ...


@dataclass(slots=True, eq=False)
class Batch:
    """Lines of consecutive messages, plus the tokens to ack once they are stored."""

    lines: list[str] = field(default_factory=list)
    # One entry per message, in arrival order: (token, its number of lines, device id). A
    # dead-lettered message has 0 lines: it is acked with the batch, keeping the ack order.
    messages: list[tuple[int, int, str]] = field(default_factory=list)
    # Dead-letter records (measurement ``deadletters``) written along with the readings. They
    # are statistics, not readings: a rejected message is acked without waiting for them.
    records: list[str] = field(default_factory=list)
    done: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _TopicInfo:
    device_type: str
    device_id: str
    prefix: str  # line-protocol measurement + tags; "" when the type is not ours


class Pipeline:
    """One device type's ingest (or, with ``device_type=None``, the catch-all for unknown types)."""

    def __init__(
        self,
        device_type: DeviceType | None,
        settings: IngestSettings,
        writer: Writer,
        transport: Transport,
        metrics: IngestMetrics,
        *,
        on_influx_state: Callable[[bool, str], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.device_type = device_type
        self.settings = settings
        self.writer = writer
        self.transport = transport
        self.metrics = metrics
        self._encoder = LineEncoder(device_type, settings.extra_tags) if device_type else None
        self._on_influx_state = on_influx_state or (lambda _ok, _why: None)
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        # The same admission check (and settings) the rules engine applies to the same readings.
        self._admission = Admission(device_type, Limits.from_settings(settings)) if device_type else None
        self._topics: dict[str, _TopicInfo] = {}
        self._batch = Batch()
        self._batch_readings = 0
        self._pending: deque[Batch] = deque()  # closed batches, oldest first, not yet acked
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_slots = asyncio.Semaphore(settings.write_concurrency)
        self._writing = 0  # writes in flight (holding a slot)
        self.buffered = 0  # readings received and not yet acked
        self._paused = False
        self._stop_deadline: float | None = None
        self.influx_ok = False
        self.last_write_error = ""
        # Counted locally and added to the Prometheus counters per batch (see metrics.py).
        self._received_messages = 0
        self._received_readings = 0
        self._records_written = 0
        self.messages_seen = 0  # total, never reset: lets a retiring replica see that it is idle

    # --- the hot path --------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, token: int) -> None:
        """One message from the broker, in arrival order. Never raises: bad input is dead-lettered."""
        now_ms = self._clock_ms()
        self._received_messages += 1
        self.messages_seen += 1
        info = self._topics.get(topic)
        if info is None:
            try:
                info = self._topic_info(topic)
            except Rejected as rejected:
                self._reject(topic.split("/")[1:3], payload, token, rejected, now_ms)
                return
        encoder = self._encoder
        admission = self._admission
        if encoder is None or admission is None:  # catch-all: only types nobody ingests
            if info.prefix:
                self._ack_in_order(token)
            else:
                self._reject(
                    [info.device_type, info.device_id],
                    payload,
                    token,
                    Rejected.one(
                        UNKNOWN_DEVICE_TYPE,
                        f"device type {info.device_type!r} is not in the catalogue "
                        f"(known: {', '.join(DEVICE_TYPES)})",
                        "topic",
                    ),
                    now_ms,
                )
            return
        try:
            readings = admission.admit(payload, now_ms)
            prefix = info.prefix
            encode = encoder.encode
            new_lines = [encode(prefix, reading, reading.ts or now_ms) for reading in readings]
        except Rejected as rejected:
            self._reject([info.device_type, info.device_id], payload, token, rejected, now_ms)
            return
        except Exception as exc:
            # A bug (or a value the encoder cannot write) must not stop the stream either: the
            # message is dead-lettered with the error, logged with its traceback, and acked.
            log.exception("unexpected error handling a message on %s", topic)
            self._reject(
                [info.device_type, info.device_id],
                payload,
                token,
                Rejected.one(INVALID_VALUE, f"internal error: {exc!r}"),
                now_ms,
            )
            return
        batch = self._batch
        batch.lines.extend(new_lines)
        n = len(new_lines)
        batch.messages.append((token, n, info.device_id))
        self._received_readings += n
        self._batch_readings += n
        self.buffered += n
        if self._batch_readings >= self.settings.batch_max_readings:
            self._close_batch()
        elif batch.timer is None:
            self._arm_timer(batch)
        if self.buffered >= self.settings.buffer_max_readings and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _topic_info(self, topic: str) -> _TopicInfo:
        try:
            parsed = parse_device_topic(topic)
        except TopicError as exc:
            raise Rejected.one(BAD_TOPIC, str(exc), "topic") from None
        if parsed.channel is not Channel.TELEMETRY:
            raise Rejected.one(BAD_TOPIC, f"not a telemetry topic: {topic!r}", "topic")
        if self.device_type is None:
            # Catch-all: remember whether the type has its own ingest (then: not ours).
            prefix = "known" if parsed.device_type in DEVICE_TYPES else ""
        else:
            if parsed.device_type != self.device_type.name:
                raise Rejected.one(
                    UNKNOWN_DEVICE_TYPE,
                    f"this service ingests {self.device_type.name!r}, not {parsed.device_type!r}",
                    "topic",
                )
            assert self._encoder is not None
            prefix = self._encoder.prefix(parsed.device_id)
        info = _TopicInfo(parsed.device_type, parsed.device_id, prefix)
        if len(self._topics) < 1_000_000:
            self._topics[topic] = info
        return info

    def _reject(self, where: list[str], payload: bytes, token: int, rejected: Rejected, now_ms: int) -> None:
        dtype = where[0] if where and where[0] else "_"
        dev = where[1] if len(where) > 1 and where[1] else "_"
        self.metrics.rejected[rejected.reason].inc()
        body = dead_letter(
            device_type=dtype,
            device_id=dev,
            received_at_ms=now_ms,
            rejected=rejected,
            payload=payload,
            max_payload_chars=self.settings.deadletter_payload_chars,
            max_errors=self.settings.deadletter_max_errors,
        )
        self.transport.publish(deadletter_topic(dtype, dev), body)
        if dtype != "_" and dev != "_":
            # The device's own feedback (it may subscribe to its errors topic; if it does not,
            # the broker drops the message: no subscriber, no cost).
            self.transport.publish(
                device_topic(dtype, dev, Channel.ERRORS),
                device_error(
                    received_at_ms=now_ms,
                    rejected=rejected,
                    payload=payload,
                    max_errors=self.settings.deadletter_max_errors,
                ),
            )
        # The MQTT dead letter is the authoritative record; this count in InfluxDB lets
        # operators query dead letters per type, device and reason over time (the fleet
        # summary's "dead-lettered in the last hour"). Best effort: lost if we crash first.
        # Nanosecond timestamps with a counter keep two records of one millisecond apart
        # (same series and time would overwrite each other).
        self._records_written = (self._records_written + 1) % 1_000_000
        batch = self._batch
        # The field-level errors ride along (a few, JSON): GET /api/v1/devices/{id}/deadletters shows them.
        shown = rejected.capped(DEADLETTER_RECORD_ERRORS)
        batch.records.append(
            encode_point(
                DEADLETTER_MEASUREMENT,
                {"device_type": dtype, "device_id": dev, "reason": rejected.reason},
                {
                    "count": 1,
                    "errors": orjson.dumps([e.as_json() for e in shown.errors]).decode(),
                    "errors_cut": shown.errors_cut,
                },
                now_ms * 1_000_000 + self._records_written,
            )
        )
        self._ack_in_order(token)
        if batch.timer is None and self._batch is batch:
            self._arm_timer(batch)

    def _ack_in_order(self, token: int) -> None:
        """Ack a message that needs no write, but never before the messages that arrived earlier."""
        if not self._pending and not self._batch.messages:
            self.metrics.acked_messages.inc()
            self.transport.ack([token])
            return
        batch = self._batch
        batch.messages.append((token, 0, ""))
        if batch.timer is None:
            self._arm_timer(batch)

    # --- batches and writes --------------------------------------------------------------

    def _arm_timer(self, batch: Batch) -> None:
        """Close a new batch after ``batch_max_age_ms`` — or after ``batch_linger_ms`` when no write
        is in flight: at low rates a reading then waits milliseconds, not the full age. Under load
        a write is almost always in flight, and the batch grows until it completes (see _write)."""
        linger = self.settings.batch_linger_ms
        delay_ms = linger if linger and not self._writing else self.settings.batch_max_age_ms
        batch.timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self._close_batch)

    def _close_batch(self) -> None:
        batch = self._batch
        if batch.timer is not None:
            batch.timer.cancel()
        if not batch.messages and not batch.records:
            return
        self._batch = Batch()
        self._batch_readings = 0
        self._pending.append(batch)
        self.metrics.received_messages.inc(self._received_messages)
        self.metrics.received_readings.inc(self._received_readings)
        self._received_messages = self._received_readings = 0
        self.metrics.buffer_readings.set(self.buffered)
        if not batch.lines and not batch.records:
            batch.done = True
            self._release()
            return
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: Batch) -> None:
        async with self._write_slots:
            self._writing += 1
            try:
                stored: bool | None = True
                if batch.lines:
                    body = ("\n".join(batch.lines) + "\n").encode()
                    stored = await self._write_with_retry(body, len(batch.lines))
                if stored is None:
                    return  # stopping with InfluxDB down: not acked, the broker redelivers
                if not stored:
                    await self._write_messages_one_by_one(batch)
                batch.done = True
                self._release()
                if batch.records:  # after the acks: counts never hold readings back
                    await self._write_records(batch.records)
            finally:
                self._writing -= 1
            if (
                not self._writing
                and self.settings.batch_linger_ms
                and self._batch.messages
                and self._stop_deadline is None
            ):
                # The writer is idle and readings arrived meanwhile: write them now (the batch
                # size follows the write latency instead of waiting for the age limit).
                self._close_batch()

    async def _write_records(self, records: list[str]) -> None:
        """Dead-letter counts: one attempt, never blocking readings (see _reject)."""
        try:
            await self.writer.write(("\n".join(records) + "\n").encode(), precision="ns")
        except InfluxError as exc:
            self.metrics.write_errors["deadletter_records"].inc()
            log.warning("dead-letter counts not stored (%s)", exc)

    async def _write_with_retry(self, body: bytes, readings: int) -> bool | None:
        """True once stored; False if InfluxDB refuses the data itself; None if stopping gave up."""
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self.writer.write(body)
            except InfluxError as exc:
                message = str(exc)
                if not exc.retryable and "database not found" not in message:
                    self.metrics.write_errors["refused"].inc()
                    self.last_write_error = message
                    self.set_influx_state(True, "")
                    return False
                self.metrics.write_errors["retryable"].inc()
                self.last_write_error = message
                self.set_influx_state(False, message)
                if "database not found" in message:
                    try:
                        await self.writer.ensure_database()
                        continue
                    except InfluxError as ensure_error:
                        self.last_write_error = str(ensure_error)
                if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    return None
                delay = retry_delay(attempt, self._stop_deadline)
                attempt += 1
                await asyncio.sleep(delay)
            else:
                self.metrics.write_seconds.observe(time.perf_counter() - started)
                self.metrics.batch_size.observe(readings)
                self.metrics.stored_readings.inc(readings)
                self.set_influx_state(True, "")
                return True

    async def _write_messages_one_by_one(self, batch: Batch) -> None:
        """InfluxDB refused the batch (a 4xx, e.g. a field type conflict): store what it takes,
        dead-letter the messages it refuses, so one bad message cannot block the stream."""
        log.warning("InfluxDB refused a batch (%s); writing its messages one by one", self.last_write_error)
        offset = 0
        for _token, count, device_id in batch.messages:
            if not count:
                continue
            lines = batch.lines[offset : offset + count]
            offset += count
            body = ("\n".join(lines) + "\n").encode()
            stored = await self._write_with_retry(body, count)
            if stored is None:
                return
            if not stored:
                assert self.device_type is not None
                rejected = Rejected.one(
                    STORAGE_REFUSED, f"InfluxDB refused the reading: {self.last_write_error}"
                )
                self.metrics.rejected[STORAGE_REFUSED].inc()
                self.transport.publish(
                    deadletter_topic(self.device_type.name, device_id),
                    dead_letter(
                        device_type=self.device_type.name,
                        device_id=device_id,
                        received_at_ms=self._clock_ms(),
                        rejected=rejected,
                        payload=body,
                        max_payload_chars=self.settings.deadletter_payload_chars,
                    ),
                )

    def _release(self) -> None:
        """Ack every message of the oldest batches that are done, in arrival order."""
        tokens: list[int] = []
        readings = 0
        pending = self._pending
        while pending and pending[0].done:
            batch = pending.popleft()
            for token, count, _ in batch.messages:
                tokens.append(token)
                readings += count
        if not tokens:
            return
        self.transport.ack(tokens)
        self.metrics.acked_messages.inc(len(tokens))
        self.buffered -= readings
        self.metrics.buffer_readings.set(self.buffered)
        if self._paused and self.buffered <= self.settings.buffer_max_readings // 2:
            self._paused = False
            self.transport.resume_reading()

    def set_influx_state(self, ok: bool, why: str) -> None:
        if ok != self.influx_ok:
            self.influx_ok = ok
            self.metrics.influx_reachable.set(1 if ok else 0)
            self._on_influx_state(ok, why)

    # --- connection changes and shutdown --------------------------------------------------

    def connection_lost(self) -> None:
        """The broker will redeliver every unacked message: pending acks are now meaningless.

        The batches are still written (the redelivered copies overwrite them: idempotent);
        their tokens belong to the old connection and the transport ignores them.
        """
        self.metrics.buffer_readings.set(self.buffered)

    async def drain(self, timeout_s: float) -> bool:
        """Graceful stop: close the open batch, wait for the writes, ack what was stored.

        Returns False if InfluxDB did not take everything within ``timeout_s``; those
        messages stay unacked in the broker's session and are redelivered on restart.
        """
        self._stop_deadline = time.monotonic() + timeout_s
        self._close_batch()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s + 1)
        return not self._pending

    def health(self) -> dict[str, Any]:
        return {
            "influx_reachable": self.influx_ok,
            "buffer_readings": self.buffered,
            "buffer_max_readings": self.settings.buffer_max_readings,
            "pending_batches": len(self._pending),
            "reading_paused": self._paused,
            "last_write_error": self.last_write_error,
        }
