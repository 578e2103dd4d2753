"""Wiring of the journal into one ingest service (kept out of pipeline.py and runner.py on purpose).

With the journal (``IOTFLEET_INGEST__JOURNAL__ENABLED``, the default) the pipeline's
writer is the journal: a batch counts as stored, and its messages are acked, once
it is fsync'd locally. ``DurableStage`` owns the journal and its drainer (journal →
InfluxDB); ``JournaledPipeline`` takes its view of InfluxDB from the drainer, not
from its own (journal) writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from iotfleet.catalogue import DeviceType
from iotfleet.settings import Settings
from iotfleet.topics import deadletter_topic
from telemetry_ingest.journal import Drainer, InfluxWriter, Journal, JournalMetrics, JournalWriter
from telemetry_ingest.metrics import IngestMetrics
from telemetry_ingest.pipeline import Pipeline
from telemetry_ingest.validation import STORAGE_REFUSED, Rejected, dead_letter

log = logging.getLogger(__name__)

MAX_SEGMENT_BYTES = 64 * 1024**2


class JournaledPipeline(Pipeline):
    """The pipeline writing to the journal: its writes succeeding says nothing about InfluxDB."""

    def set_influx_state(self, ok: bool, why: str) -> None:
        """Called by the pipeline after each journal append: ignored (see ``storage_state``)."""

    def storage_state(self, ok: bool, why: str) -> None:
        """InfluxDB's state as the drainer (or the start-up database check) sees it."""
        if not ok:
            self.last_write_error = why
        Pipeline.set_influx_state(self, ok, why)


class DurableStage:
    """The journal and its drainer for one ingest process."""

    def __init__(
        self,
        settings: Settings,
        device_type: DeviceType,
        client_id: str,
        influx: InfluxWriter,
        metrics: IngestMetrics,
    ) -> None:
        journal_settings = settings.ingest.journal
        directory = journal_settings.directory or settings.state_dir / "ingest-journal" / client_id
        self.device_type = device_type
        self.settings = settings
        self.metrics = metrics
        self.journal = Journal(
            directory,
            max_bytes=journal_settings.max_bytes,
            segment_bytes=min(MAX_SEGMENT_BYTES, journal_settings.max_bytes // 8),
        )
        self.writer = JournalWriter(self.journal, influx)
        self.influx = influx
        self.pipeline: JournaledPipeline | None = None
        self.drainer: Drainer | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def attach(self, pipeline: JournaledPipeline) -> None:
        self.pipeline = pipeline
        self.drainer = Drainer(
            self.journal,
            self.influx,
            concurrency=self.settings.ingest.write_concurrency,
            read_bytes=self.settings.ingest.journal.drain_read_bytes,
            on_refused=self._dead_letter_refused,
            on_state=pipeline.storage_state,
            metrics=self.metrics,
            journal_metrics=JournalMetrics(self.device_type.name, self.metrics.registry),
        )

    def start(self, on_failure: Any) -> None:
        """Open the journal (ConfigError if another process holds it) and start draining it."""
        assert self.drainer is not None, "attach() first"
        self.journal.open()
        pending = self.journal.pending_bytes
        if pending:
            log.info("journal: replaying %d bytes not yet in InfluxDB (%s)", pending, self.journal.directory)
        self._task = asyncio.create_task(self.drainer.run(self._stop))

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("journal drainer failed", exc_info=task.exception())
                on_failure()

        self._task.add_done_callback(done)

    @property
    def idle(self) -> bool:
        return self.journal.pending_bytes == 0

    async def finish(self, timeout_s: float) -> bool:
        """Stopping (after the pipeline drained): give InfluxDB ``timeout_s`` to take the rest;
        whatever it does not take stays journaled and is replayed on the next start."""
        assert self.drainer is not None
        self.drainer.finish_by(time.monotonic() + timeout_s)
        self._stop.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout_s + 1)
            if not self._task.done():
                self._task.cancel()
        drained = self.idle
        self.journal.close()
        return drained

    def health(self) -> dict[str, Any]:
        return self.journal.health()

    def _dead_letter_refused(self, device_id: str, line: bytes, message: str) -> None:
        """InfluxDB refused a journaled line (e.g. a field type conflict): dead-letter it, go on."""
        assert self.pipeline is not None
        name = self.device_type.name
        self.metrics.rejected[STORAGE_REFUSED].inc()
        self.pipeline.transport.publish(
            deadletter_topic(name, device_id),
            dead_letter(
                device_type=name,
                device_id=device_id,
                received_at_ms=time.time_ns() // 1_000_000,
                rejected=Rejected.one(STORAGE_REFUSED, f"InfluxDB refused the reading: {message}"),
                payload=line,
                max_payload_chars=self.settings.ingest.deadletter_payload_chars,
            ),
        )
