"""Prometheus metrics of one ingest process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iotfleet.admission import REASONS


class IngestMetrics:
    """Counters are incremented per batch or per rejected message, never per accepted reading:
    a prometheus_client call takes a lock, which the hot path does not need 15,000 times a second."""

    def __init__(self, device_type: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"device_type": device_type}
        r = self.registry
        self.received_messages = Counter(
            "iotfleet_ingest_received_messages",
            "Telemetry messages received from the broker",
            ["device_type"],
            registry=r,
        ).labels(**labels)
        self.received_readings = Counter(
            "iotfleet_ingest_received_readings",
            "Valid readings received (before storage)",
            ["device_type"],
            registry=r,
        ).labels(**labels)
        self.stored_readings = Counter(
            "iotfleet_ingest_stored_readings",
            "Readings InfluxDB accepted",
            ["device_type"],
            registry=r,
        ).labels(**labels)
        self.acked_messages = Counter(
            "iotfleet_ingest_acked_messages",
            "Messages acknowledged to the broker (stored or dead-lettered)",
            ["device_type"],
            registry=r,
        ).labels(**labels)
        self._rejected = Counter(
            "iotfleet_ingest_rejected_messages",
            "Messages dead-lettered, by reason",
            ["device_type", "reason"],
            registry=r,
        )
        self.rejected = {reason: self._rejected.labels(device_type, reason) for reason in REASONS}
        self.batch_size = Histogram(
            "iotfleet_ingest_batch_readings",
            "Readings per InfluxDB write",
            ["device_type"],
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
            registry=r,
        ).labels(**labels)
        self.write_seconds = Histogram(
            "iotfleet_ingest_write_seconds",
            "Duration of successful InfluxDB writes",
            ["device_type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        ).labels(**labels)
        self._write_errors = Counter(
            "iotfleet_ingest_write_errors",
            "Failed InfluxDB write attempts, by kind (retryable writes are retried)",
            ["device_type", "kind"],
            registry=r,
        )
        self.write_errors = {
            kind: self._write_errors.labels(device_type, kind)
            for kind in ("retryable", "refused", "deadletter_records")
        }
        self.buffer_readings = Gauge(
            "iotfleet_ingest_buffer_readings",
            "Readings received but not yet acknowledged (waiting for or in an InfluxDB write)",
            ["device_type"],
            registry=r,
        ).labels(**labels)
        self.mqtt_connected = Gauge(
            "iotfleet_ingest_mqtt_connected", "1 while connected to the broker", ["device_type"], registry=r
        ).labels(**labels)
        self.influx_reachable = Gauge(
            "iotfleet_ingest_influx_reachable",
            "1 while the last InfluxDB write or ping succeeded",
            ["device_type"],
            registry=r,
        ).labels(**labels)
