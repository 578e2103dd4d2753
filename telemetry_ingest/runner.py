"""The one ingest runner (placeholder until the ingest issue lands): health only."""

from __future__ import annotations

import argparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet.catalogue import get_device_type
from iotfleet.errors import ConfigError, UnknownDeviceTypeError
from iotfleet.lifecycle import HealthServer, ServiceLifecycle, configure_logging, fail_fast
from iotfleet.settings import Settings, load_settings


def run(settings: Settings, device_type: str) -> None:
    lifecycle = ServiceLifecycle(f"ingest-{device_type}")
    lifecycle.install_signal_handlers()
    lifecycle.starting(device_type=device_type)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ingest-{device_type}", protocol=mqtt.MQTTv5)
    if settings.mqtt.username:
        password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else None
        client.username_pw_set(settings.mqtt.username, password)
    client.connect_async(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    health = HealthServer(settings.health, lambda: {"status": "ok" if client.is_connected() else "degraded"})
    health.start()
    lifecycle.ready(health_port=health.port)
    lifecycle.stop_requested.wait()
    client.disconnect()
    client.loop_stop()
    health.stop()
    lifecycle.stopped()


def main(device_type: str | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ingest one device type's telemetry into InfluxDB.")
    parser.add_argument("--type", dest="device_type", default=None)
    args = parser.parse_args()
    try:
        settings = load_settings()
        name = device_type or args.device_type or settings.ingest.device_type
        if not name:
            raise ConfigError("no device type: pass --type or set IOTFLEET_INGEST__DEVICE_TYPE")
        get_device_type(name)
    except (ConfigError, UnknownDeviceTypeError) as error:
        fail_fast(ConfigError(str(error)), "ingest")
        return
    configure_logging(settings.log_level)
    run(settings, name)
