"""Prometheus metrics of the registry, on a registry of their own per app (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "registry_http_requests", "API requests", ["method", "route", "status"], registry=registry
        )
        self.http_latency = Histogram(
            "registry_http_request_seconds", "API request latency", ["method", "route"], registry=registry
        )
        self.devices_provisioned = Counter(
            "registry_devices_provisioned", "Devices created with broker credentials", registry=registry
        )
        self.devices_deleted = Counter("registry_devices_deleted", "Devices deleted", registry=registry)
        self.credentials_rotated = Counter(
            "registry_credentials_rotated", "Device passwords rotated", registry=registry
        )
        self.dynsec_commands = Counter(
            "registry_dynsec_commands",
            "Dynamic-security commands sent (now only to retire devices' legacy dynsec clients)",
            ["outcome"],
            registry=registry,
        )
        self.broker_changes = Counter(
            "registry_broker_changes",
            "Device entries sent to the broker agent (added, replaced or removed)",
            ["outcome"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "registry_auth_failures",
            "Requests refused for a missing/invalid key or role",
            ["reason"],
            registry=registry,
        )
        self.reconcile_drift = Gauge(
            "registry_reconcile_drift",
            "Differences found by the last registry/broker reconcile",
            registry=registry,
        )
        self.reconcile_runs = Counter(
            "registry_reconcile_runs", "Reconcile runs", ["outcome"], registry=registry
        )
        self.agent_reachable = Gauge(
            "registry_broker_agent_reachable", "1 when the broker agent answered last", registry=registry
        )
        self.broker_connected = Gauge(
            "registry_broker_connected", "1 when the registry's MQTT link is up", ["link"], registry=registry
        )
