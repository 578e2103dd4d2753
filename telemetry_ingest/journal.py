"""The ingest's local write-ahead journal: a reading is acked once it is fsync'd here, not in InfluxDB.

Why: Mosquitto 2.0 persists by periodic snapshot only, so whatever a broker holds
(the backlog of a stalled ingest, or of all ingests while InfluxDB is down) dies
with a ``kill -9`` of the broker. With the journal the ingest takes every valid
reading it is offered, appends it to a local file, and acks the broker only once
the append is durable (``fdatasync``); a background drainer then writes the
journal to InfluxDB, retrying forever. An InfluxDB outage queues here, on the
ingest's disk, not in the broker.

Layout: ``<dir>/<segment id>.seg`` files of framed records (length, CRC32,
precision, line-protocol body), plus ``checkpoint`` (segment id and offset up to
which InfluxDB has taken everything). Group commit: every append that arrives
while an fsync is running is written with the next one (one fsync per pipeline
batch or fewer, never one per message). Bounded disk: ``max_bytes`` (segments on
disk, drained or not); a full journal makes appends wait, so the pipeline stops
acking and the broker's receive window fills (backpressure, nothing dropped).
Bounded memory: the drainer reads at most ``drain_read_bytes`` per InfluxDB write.

Crash safety: a kill -9 (or an OS crash) leaves at worst a torn last record that
was never fsync'd, hence never acked: it is cut off on open and the broker
redelivers its messages. The checkpoint is written without fsync: after an OS
crash the drainer may resend what InfluxDB already has, which overwrites itself
(same series + device timestamp), so storage stays exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iotfleet.errors import ConfigError
from iotfleet.influx import InfluxError
from telemetry_ingest.backoff import retry_delay

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIB")  # body length, CRC32 of the body, precision code
PRECISIONS = ("ms", "ns")
SEGMENT_SUFFIX = ".seg"
INLINE_READ_BYTES = 256 * 1024
_DEVICE_ID = re.compile(rb",device_id=((?:[^,\\ ]|\\.)*)")


class InfluxWriter(Protocol):
    async def write(
        self, lines: bytes | str, *, database: str | None = None, precision: str = "ms"
    ) -> None: ...

    async def ensure_database(self) -> None: ...


@dataclass(frozen=True, slots=True, order=True)
class Position:
    segment: int
    offset: int


def _segment_name(segment: int) -> str:
    return f"{segment:016d}{SEGMENT_SUFFIX}"


def _scan(data: bytes, start: int = 0) -> tuple[list[tuple[str, bytes, int]], int]:
    """Records in ``data`` from ``start``: [(precision, body, end offset)], and where the valid part ends."""
    out: list[tuple[str, bytes, int]] = []
    pos = start
    size = HEADER.size
    while pos + size <= len(data):
        length, crc, code = HEADER.unpack_from(data, pos)
        end = pos + size + length
        if end > len(data) or code >= len(PRECISIONS):
            break
        body = data[pos + size : end]
        if zlib.crc32(body) != crc:
            break
        out.append((PRECISIONS[code], body, end))
        pos = end
    return out, pos


class Journal:
    """Append (group-committed, fsync'd) and read back, with a drained-up-to checkpoint."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock_fd = -1
        self._fd = -1  # the open (last) segment, append only
        self._segments: dict[int, int] = {}  # segment id -> committed (fsync'd) size
        self._last = 0
        self.checkpoint = Position(0, 0)
        self.disk_bytes = 0  # on disk + reserved by waiting appends
        self._staged: list[tuple[bytes, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._space = asyncio.Condition()
        self.committed = asyncio.Event()  # set after each commit: the drainer has data
        self.waiting_for_space = 0

    # --- open / close --------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory (one process per journal), cut a torn tail, load the checkpoint."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"IOTFLEET_INGEST__JOURNAL__DIRECTORY: {self.directory} is in use by another ingest process"
                " (each replica needs its own journal: set IOTFLEET_INGEST__REPLICA)"
            ) from None
        ids = sorted(
            int(p.name[: -len(SEGMENT_SUFFIX)])
            for p in self.directory.iterdir()
            if p.name.endswith(SEGMENT_SUFFIX) and p.name[: -len(SEGMENT_SUFFIX)].isdigit()
        )
        for segment in ids:
            self._segments[segment] = (self.directory / _segment_name(segment)).stat().st_size
        if ids:
            last = ids[-1]
            path = self.directory / _segment_name(last)
            _, valid = _scan(path.read_bytes())
            if valid != self._segments[last]:
                log.warning(
                    "journal: cutting a torn tail of %d bytes off %s (never fsync'd, never acked)",
                    self._segments[last] - valid,
                    path.name,
                )
                os.truncate(path, valid)
                self._segments[last] = valid
            self._last = last
        else:
            self._last = 1
            self._segments[1] = 0
        self._fd = os.open(
            self.directory / _segment_name(self._last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        self._fsync_dir()
        self.checkpoint = self._load_checkpoint()
        self.disk_bytes = sum(self._segments.values())

    def _load_checkpoint(self) -> Position:
        first = min(self._segments)
        try:
            segment, offset = (int(x) for x in (self.directory / "checkpoint").read_text().split())
        except (FileNotFoundError, ValueError):
            return Position(first, 0)
        if segment not in self._segments or offset > self._segments[segment]:
            # Older than the first segment (deleted after a drain whose checkpoint an OS crash lost),
            # or beyond what survived: replay from the first segment (idempotent).
            return Position(first, 0)
        return Position(segment, offset)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- append (group commit) -----------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Committed bytes InfluxDB has not taken yet."""
        total = 0
        for segment, size in list(self._segments.items()):  # the commit thread may add one
            if segment > self.checkpoint.segment:
                total += size
            elif segment == self.checkpoint.segment:
                total += size - self.checkpoint.offset
        return total

    async def append(self, body: bytes, precision: str = "ms") -> None:
        """Return once ``body`` is durable on disk; wait while the journal is full."""
        record = HEADER.pack(len(body), zlib.crc32(body), PRECISIONS.index(precision)) + body

        def room() -> bool:
            # A record larger than the free space still goes in once everything else is drained
            # (disk is then bounded by max_bytes plus one pipeline batch), or it would wait forever.
            return self.disk_bytes + len(record) <= self.max_bytes or (
                self.pending_bytes == 0 and not self._staged
            )

        if not room():
            self.waiting_for_space += 1
            try:
                async with self._space:
                    await self._space.wait_for(room)
            finally:
                self.waiting_for_space -= 1
        self.disk_bytes += len(record)  # reserved now: concurrent appends cannot overshoot
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._staged.append((record, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())
        try:
            await future
        except BaseException:
            if not future.done():
                future.cancel()
            raise

    async def _commit_loop(self) -> None:
        while self._staged:
            staged, self._staged = self._staged, []
            records = [record for record, future in staged if not future.cancelled()]
            dropped = sum(len(record) for record, future in staged if future.cancelled())
            self.disk_bytes -= dropped
            try:
                await asyncio.to_thread(self._write, b"".join(records))
            except OSError as exc:
                self.disk_bytes -= sum(len(r) for r in records)
                error = InfluxError(f"journal write failed: {exc}", retryable=True)
                for _, future in staged:
                    if not future.done():
                        future.set_exception(error)
                continue
            for _, future in staged:
                if not future.done():
                    future.set_result(None)
            self.committed.set()

    def _write(self, data: bytes) -> None:
        """Blocking: append + fdatasync (a thread); roll to a new segment once this one is full."""
        if not data:
            return
        if self._segments[self._last] >= self.segment_bytes:
            new = self._last + 1
            fd = os.open(self.directory / _segment_name(new), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fsync_dir()  # the new file's name must survive an OS crash too
            os.close(self._fd)
            self._fd = fd
            self._segments[new] = 0
            self._last = new
        size = self._segments[self._last]
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fdatasync(self._fd)
        except OSError:
            # A partial record would misframe every later one: cut back to the committed end.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self._segments[self._last] = size + len(data)

    # --- read back / checkpoint ----------------------------------------------------------

    def read(self, start: Position, max_bytes: int) -> tuple[list[tuple[str, bytes]], Position]:
        """Blocking: committed records from ``start`` (about ``max_bytes`` at most) and the position after."""
        segment, offset = start.segment, start.offset
        while segment in self._segments and offset >= self._segments[segment] and segment < self._last:
            segment, offset = segment + 1, 0
        committed = self._segments.get(segment, 0)
        if offset >= committed:
            return [], Position(segment, offset)
        with (self.directory / _segment_name(segment)).open("rb") as f:
            f.seek(offset)
            data = f.read(min(committed - offset, max(max_bytes, 1)))
            records, valid = _scan(data)
            if not records:  # one record larger than max_bytes: read exactly it
                length = HEADER.unpack_from(data, 0)[0] if len(data) >= HEADER.size else 0
                f.seek(offset)
                data = f.read(HEADER.size + length)
                records, valid = _scan(data)
        if not records:
            raise RuntimeError(f"journal segment {segment} is corrupt at offset {offset}")
        return [(precision, body) for precision, body, _ in records], Position(segment, offset + valid)

    async def advance(self, position: Position) -> None:
        """InfluxDB has everything before ``position``: save it, delete drained segments, free space."""
        self.checkpoint = position
        freed = 0
        for segment in sorted(self._segments):
            if segment >= position.segment or segment == self._last:
                break
            freed += self._segments.pop(segment)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / _segment_name(segment))
        tmp = self.directory / "checkpoint.tmp"
        tmp.write_text(f"{position.segment} {position.offset}\n")
        os.replace(tmp, self.directory / "checkpoint")
        self.disk_bytes -= freed
        if self.waiting_for_space:
            async with self._space:
                self._space.notify_all()

    def bytes_after(self, position: Position) -> int:
        """Committed bytes after ``position``."""
        if position.segment >= self._last:
            return max(0, self._segments.get(self._last, 0) - position.offset)
        return self.segment_bytes  # at least one more segment: a backlog

    @property
    def end(self) -> Position:
        return Position(self._last, self._segments[self._last])

    def health(self) -> dict[str, Any]:
        return {
            "journal_bytes": self.disk_bytes,
            "journal_max_bytes": self.max_bytes,
            "journal_pending_bytes": self.pending_bytes,
            "journal_full": self.waiting_for_space > 0,
        }


class JournalWriter:
    """What the pipeline writes to instead of InfluxDB: a batch is "stored" once it is journaled."""

    def __init__(self, journal: Journal, influx: InfluxWriter) -> None:
        self.journal = journal
        self.influx = influx

    async def write(self, lines: bytes | str, *, database: str | None = None, precision: str = "ms") -> None:
        body = lines.encode() if isinstance(lines, str) else lines
        await self.journal.append(body, precision)

    async def ensure_database(self) -> None:
        await self.influx.ensure_database()


class JournalMetrics:
    """The journal's side of /metrics (same registry as IngestMetrics)."""

    def __init__(self, device_type: str, registry: CollectorRegistry) -> None:
        labels = {"device_type": device_type}
        self.disk_bytes = Gauge(
            "iotfleet_ingest_journal_bytes",
            "Bytes of journal segments on disk (drained or not)",
            ["device_type"],
            registry=registry,
        ).labels(**labels)
        self.pending_bytes = Gauge(
            "iotfleet_ingest_journal_pending_bytes",
            "Journaled (acked) bytes InfluxDB has not taken yet",
            ["device_type"],
            registry=registry,
        ).labels(**labels)
        self.written_readings = Counter(
            "iotfleet_ingest_influx_written_readings",
            "Readings written from the journal to InfluxDB (replays after a crash count again)",
            ["device_type"],
            registry=registry,
        ).labels(**labels)
        self.write_seconds = Histogram(
            "iotfleet_ingest_influx_write_seconds",
            "Duration of successful InfluxDB writes from the journal",
            ["device_type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        ).labels(**labels)


RefusedCallback = Callable[[str, bytes, str], None]
"""(device id, the refused line, InfluxDB's message): the runner dead-letters it."""
StateCallback = Callable[[bool, str], None]


class Drainer:
    """Writes the journal to InfluxDB in order, up to ``concurrency`` writes in flight, retrying forever."""

    def __init__(
        self,
        journal: Journal,
        influx: InfluxWriter,
        *,
        concurrency: int,
        read_bytes: int,
        on_refused: RefusedCallback,
        on_state: StateCallback,
        metrics: Any,
        journal_metrics: JournalMetrics,
    ) -> None:
        self.journal = journal
        self.influx = influx
        self.concurrency = concurrency
        self.read_bytes = read_bytes
        self.on_refused = on_refused
        self.on_state = on_state
        self.metrics = metrics  # IngestMetrics: write_errors
        self.journal_metrics = journal_metrics
        self.written_readings = 0
        self.last_error = ""
        self._stop_deadline: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until ``stop`` is set and ``finish`` has had its chance (see ``finish``)."""
        journal = self.journal
        position = journal.checkpoint
        in_flight: deque[tuple[asyncio.Task[bool], Position]] = deque()
        while True:
            while len(in_flight) < self.concurrency:
                if in_flight and journal.bytes_after(position) < self.read_bytes // 2:
                    # Like the pipeline's batches: a second write only when there is a backlog;
                    # otherwise the next one collects what arrives meanwhile (fewer, larger writes).
                    break
                if journal.bytes_after(position) <= INLINE_READ_BYTES:
                    # caught up: a small read from the page cache costs less than a thread hop
                    records, after = journal.read(position, self.read_bytes)
                else:
                    records, after = await asyncio.to_thread(journal.read, position, self.read_bytes)
                if not records:
                    position = after  # past fully drained segments: they can go
                    break
                in_flight.append((asyncio.create_task(self._store(records)), after))
                position = after
            if in_flight:
                task, after = in_flight[0]
                done = await task
                if not done:  # stopping with InfluxDB down: what is left is replayed on the next start
                    for other, _ in in_flight:
                        other.cancel()
                    return
                in_flight.popleft()
                await journal.advance(after)
                self.publish_gauges()
                continue
            if position > journal.checkpoint:
                await journal.advance(position)
            self.publish_gauges()
            if stop.is_set():
                return
            journal.committed.clear()
            if journal.end > position:
                continue
            waiter = asyncio.create_task(journal.committed.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    def publish_gauges(self) -> None:
        self.journal_metrics.disk_bytes.set(self.journal.disk_bytes)
        self.journal_metrics.pending_bytes.set(self.journal.pending_bytes)

    def finish_by(self, deadline: float) -> None:
        """Stopping: give up retrying at ``deadline`` (monotonic); the rest stays journaled."""
        self._stop_deadline = deadline

    async def _store(self, records: list[tuple[str, bytes]]) -> bool:
        """Write records (grouped by precision); False if stopping gave up with InfluxDB down."""
        groups: list[tuple[str, list[bytes]]] = []
        for precision, body in records:
            if groups and groups[-1][0] == precision:
                groups[-1][1].append(body)
            else:
                groups.append((precision, [body]))
        for precision, bodies in groups:
            body = b"".join(bodies)
            stored = await self._write_with_retry(body, precision)
            if stored is None:
                return False
            if not stored and not await self._write_lines_one_by_one(body, precision):
                return False
        return True

    async def _write_with_retry(self, body: bytes, precision: str) -> bool | None:
        """True once stored; False if InfluxDB refuses the data itself; None if stopping gave up."""
        attempt = 0
        readings = body.count(b"\n")
        while True:
            started = time.perf_counter()
            try:
                await self.influx.write(body, precision=precision)
            except InfluxError as exc:
                message = str(exc)
                self.last_error = message
                if not exc.retryable and "database not found" not in message:
                    self.metrics.write_errors["refused"].inc()
                    self.on_state(True, "")
                    return False
                self.metrics.write_errors["retryable"].inc()
                self.on_state(False, message)
                if "database not found" in message:
                    try:
                        await self.influx.ensure_database()
                        continue
                    except InfluxError as ensure_error:
                        self.last_error = str(ensure_error)
                if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    return None
                delay = retry_delay(attempt, self._stop_deadline)
                attempt += 1
                await asyncio.sleep(delay)
            else:
                if precision == "ms":  # ns: the dead-letter counts, not readings
                    self.journal_metrics.write_seconds.observe(time.perf_counter() - started)
                    self.journal_metrics.written_readings.inc(readings)
                    self.written_readings += readings
                self.on_state(True, "")
                return True

    async def _write_lines_one_by_one(self, body: bytes, precision: str) -> bool:
        """InfluxDB refused a batch (a 4xx, e.g. a field type conflict): store what it takes and
        hand each refused line to ``on_refused`` (a dead letter), so one line cannot block the rest."""
        log.warning("InfluxDB refused a journaled batch (%s); writing it line by line", self.last_error)
        for line in body.splitlines():
            if not line:
                continue
            stored = await self._write_with_retry(line + b"\n", precision)
            if stored is None:
                return False
            if not stored:
                match = _DEVICE_ID.search(line)
                device_id = (
                    re.sub(rb"\\(.)", rb"\1", match.group(1)).decode(errors="replace") if match else "_"
                )
                self.on_refused(device_id, line, self.last_error)
        return True
