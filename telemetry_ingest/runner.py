"""The one ingest runner: ``iotfleet-ingest --type thermostat`` (or ``ingest-thermostat``).

Every device type runs the same code: the catalogue entry gives the model and
the fields, the topic scheme gives the shared subscription. A new device type
adds a catalogue module and, for its own process, a 3-line entry module.

``iotfleet-ingest --unknown-types`` runs the catch-all instead: it subscribes
to every type's telemetry at QoS 0 (no session, no acks, nothing stored) and
dead-letters the messages whose type is not in the catalogue, with reason
``unknown_device_type``. Broker ACLs already refuse telemetry on a topic a
device was not provisioned for, so it only catches devices provisioned with a
type the ingest does not know (a catalogue/registry mismatch); it costs one
extra delivery per telemetry message, so the stack runs it only on request.

``--retire`` scales a replica down without losing its share: see README.md.

The service starts even if the broker or InfluxDB are down: it retries both and
reports ``degraded`` on /healthz (HTTP 503) until both answer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import Any

from iotfleet.catalogue import DeviceType, get_device_type
from iotfleet.errors import ConfigError, UnknownDeviceTypeError
from iotfleet.influx import InfluxClient, InfluxError
from iotfleet.lifecycle import HealthServer, ServiceLifecycle, configure_logging, fail_fast
from iotfleet.mqtt_client import MqttClient, SessionConfig
from iotfleet.settings import Settings, load_settings
from iotfleet.topics import Channel, device_filter, ingest_group, shared_filter
from telemetry_ingest.durable import DurableStage, JournaledPipeline
from telemetry_ingest.lines import LineEncoder
from telemetry_ingest.metrics import IngestMetrics
from telemetry_ingest.paho_transport import PahoClient
from telemetry_ingest.pipeline import Pipeline

RETIRE_IDLE_S = 3.0
CATCH_ALL = "unknown-types"
CATCH_ALL_GROUP = "ingest-unknown-types"


class IngestService:
    """Wires settings, the MQTT session, the pipeline, InfluxDB and /healthz together."""

    def __init__(self, settings: Settings, device_type: DeviceType | None, *, retire: bool = False) -> None:
        self.settings = settings
        self.device_type = device_type
        self.retire = retire
        name = device_type.name if device_type else CATCH_ALL
        self.name = f"ingest-{name.replace('_', '-')}"
        self.lifecycle = ServiceLifecycle(self.name)
        self.metrics = IngestMetrics(name)
        self.influx = InfluxClient(settings.influx, max_connections=settings.ingest.write_concurrency + 2)
        if device_type is not None:
            LineEncoder(device_type, settings.ingest.extra_tags)  # fail fast on a bad extra tag
            group = ingest_group(device_type.name)
            topic_filter = device_filter(Channel.TELEMETRY, device_type.name)
            if settings.ingest.shared_subscription:
                topic_filter = shared_filter(group, topic_filter)
            qos = 1
        else:
            group = CATCH_ALL_GROUP
            topic_filter = shared_filter(group, device_filter(Channel.TELEMETRY))
            qos = 0
        session = SessionConfig(
            client_id=settings.ingest.client_id or f"{group}-{settings.ingest.replica}",
            topic_filters=(topic_filter,),
            qos=qos,
            receive_maximum=settings.ingest.receive_maximum,
            retire=retire,
        )
        transport_cls = MqttClient if settings.ingest.transport == "fast" else PahoClient
        self.mqtt: MqttClient | PahoClient = transport_cls(
            settings.mqtt, session, self._on_message, self._on_mqtt_state
        )
        # The journal (default): acked once fsync'd locally, drained to InfluxDB (durable.py).
        self.durable = (
            DurableStage(settings, device_type, session.client_id, self.influx, self.metrics)
            if device_type is not None and settings.ingest.journal.enabled
            else None
        )
        self.pipeline = (JournaledPipeline if self.durable else Pipeline)(
            device_type,
            settings.ingest,
            self.durable.writer if self.durable else self.influx,
            self.mqtt,
            self.metrics,
            on_influx_state=self._on_influx_state,
        )
        # The transport exists before the pipeline (which needs it to ack); from here on it
        # calls the pipeline directly, without a wrapper frame per message.
        self.mqtt.sink = self.pipeline.handle
        if self.durable:
            assert isinstance(self.pipeline, JournaledPipeline)
            self.durable.attach(self.pipeline)
        self.mqtt_error = "not connected yet"
        self._ready_logged = False
        self._mqtt_down_logged = False
        self._influx_down_logged = False
        self._retired_idle = False
        self.stop = asyncio.Event()

    def _on_message(self, topic: str, payload: bytes, token: int) -> None:
        raise RuntimeError("a message arrived before the pipeline was wired")  # pragma: no cover

    def _on_mqtt_state(self, up: bool, why: str) -> None:
        self.metrics.mqtt_connected.set(1 if up else 0)
        if self.stop.is_set():
            return  # our own disconnect on the way out: not a degradation
        if up:
            if self._mqtt_down_logged:
                self.lifecycle.recovered("broker connection")
                self._mqtt_down_logged = False
            self.mqtt_error = ""
            self._maybe_ready()
        else:
            if not self._mqtt_down_logged:
                self.lifecycle.degraded(f"no broker session, retrying: {why}")
                self._mqtt_down_logged = True
            self.mqtt_error = why or "disconnected"
            self.pipeline.connection_lost()

    def _on_influx_state(self, ok: bool, why: str) -> None:
        if ok:
            if self._influx_down_logged:
                self.lifecycle.recovered("InfluxDB")
                self._influx_down_logged = False
            self._maybe_ready()
        elif not self._influx_down_logged:
            self.lifecycle.degraded(f"InfluxDB unavailable, retrying with backoff: {why}")
            self._influx_down_logged = True

    def _maybe_ready(self) -> None:
        if (
            not self._ready_logged
            and self.mqtt.connected
            and (self.pipeline.influx_ok or not self.device_type)
        ):
            self._ready_logged = True
            self.lifecycle.ready(
                subscription=", ".join(self.mqtt.session.topic_filters),
                client_id=self.mqtt.session.client_id,
                transport=self.settings.ingest.transport,
            )

    def health(self) -> dict[str, Any]:
        influx_needed = self.device_type is not None
        ok = self.mqtt.connected and (self.pipeline.influx_ok or not influx_needed)
        return {
            "status": "ok" if ok else "degraded",
            "service": self.name,
            "mqtt_connected": self.mqtt.connected,
            "mqtt_error": self.mqtt_error,
            **self.pipeline.health(),
            **(self.durable.health() if self.durable else {}),
        }

    async def _prepare_influx(self) -> None:
        """Create the database (idempotent) once InfluxDB answers; retry quietly until then."""
        delay = 0.2
        while not self.stop.is_set():
            try:
                await self.influx.ensure_database()
            except InfluxError as exc:
                self.pipeline.last_write_error = str(exc)
                self._on_influx_state(False, str(exc))
            else:
                if isinstance(self.pipeline, JournaledPipeline):
                    self.pipeline.storage_state(True, "")
                else:
                    self.pipeline.set_influx_state(True, "")
                return
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except TimeoutError:
                delay = min(5.0, delay * 2)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        self.lifecycle.starting(
            device_type=self.device_type.name if self.device_type else CATCH_ALL,
            broker=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}",
            influx=self.settings.influx.url,
            database=self.settings.influx.database,
        )
        if self.durable:
            self.durable.start(on_failure=self.stop.set)  # ConfigError if its journal is in use
        health = HealthServer(self.settings.health, self.health, registry=self.metrics.registry)
        health.start()
        if self.device_type is not None:
            prepare = asyncio.create_task(self._prepare_influx())
        session = asyncio.create_task(self.mqtt.run(self.stop))
        if self.retire:
            idle_watch = asyncio.create_task(self._stop_when_idle())
        await self.stop.wait()
        # Graceful stop: no new messages, write what was received, ack it, then disconnect.
        self.mqtt.pause_reading()
        drained = await self.pipeline.drain(self.settings.ingest.drain_timeout_s)
        # A retired replica deletes its session only once everything it held is stored.
        end_session = self.retire and drained and self._retired_idle
        await self.mqtt.disconnect(end_session=end_session)
        if self.retire:
            idle_watch.cancel()
        await session
        details_journal = True
        if self.durable:
            details_journal = await self.durable.finish(self.settings.ingest.drain_timeout_s)
        if self.device_type is not None:
            prepare.cancel()
        await self.influx.aclose()
        health.stop()
        details: dict[str, object] = {"unacked_readings": self.pipeline.buffered, "drained": drained}
        if self.retire:
            details["session_deleted"] = end_session
        if self.durable:
            details["journal_drained"] = details_journal
        self.lifecycle.stopped(**details)

    async def _stop_when_idle(self) -> None:
        """Retiring: once connected (unsubscribed), stop after RETIRE_IDLE_S without a message."""
        self.lifecycle.log.info("retiring: storing the session's backlog, then deleting the session")
        seen = -1
        quiet_since = time.monotonic()
        while not self.stop.is_set():
            await asyncio.sleep(0.25)
            if not self.mqtt.connected:
                quiet_since = time.monotonic()
                continue
            busy = self.pipeline.buffered or (self.durable is not None and not self.durable.idle)
            if self.pipeline.messages_seen != seen or busy:
                seen = self.pipeline.messages_seen
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= RETIRE_IDLE_S:
                self._retired_idle = True
                self.lifecycle.log.info("retiring: backlog of %d messages stored", seen)
                self.stop.set()

    def _request_stop(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            self.lifecycle.log.info("stopping (signal %s)", sig.name)
            self.stop.set()


def run(settings: Settings, device_type: DeviceType | None, *, retire: bool = False) -> None:
    try:
        asyncio.run(IngestService(settings, device_type, retire=retire).run())
    except ConfigError as error:  # e.g. the health port is taken: a setting to change, not a bug
        fail_fast(error, "ingest")


def main(device_type: str | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ingest one device type's telemetry into InfluxDB.")
    parser.add_argument("--type", dest="device_type", default=None, help="device type (catalogue name)")
    parser.add_argument(
        "--unknown-types",
        action="store_true",
        help="run the catch-all that dead-letters telemetry of types not in the catalogue",
    )
    parser.add_argument(
        "--retire",
        action="store_true",
        help="retire this replica (IOTFLEET_INGEST__REPLICA): unsubscribe, store its session's backlog,"
        " then delete the session so the broker stops routing a share of the stream to it",
    )
    args = parser.parse_args()
    try:
        settings = load_settings()
        entry: DeviceType | None = None
        if not args.unknown_types:
            name = device_type or args.device_type or settings.ingest.device_type
            if not name:
                raise ConfigError(
                    "no device type: pass --type or set IOTFLEET_INGEST__DEVICE_TYPE (or --unknown-types)"
                )
            try:
                entry = get_device_type(name)
            except UnknownDeviceTypeError as error:
                raise ConfigError(f"IOTFLEET_INGEST__DEVICE_TYPE / --type: {error}") from None
        if settings.ingest.extra_tags and entry is not None:
            try:
                LineEncoder(entry, settings.ingest.extra_tags)
            except ValueError as error:
                raise ConfigError(f"IOTFLEET_INGEST__EXTRA_TAGS: {error}") from None
    except ConfigError as error:
        fail_fast(error, "ingest")
        return
    configure_logging(settings.log_level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    run(settings, entry, retire=args.retire and entry is not None)


if __name__ == "__main__":
    main()
