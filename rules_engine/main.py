"""Entry point of the rules engine (``iotfleet-rules``).

Foundation stage: a supervised process with its MQTT session, /healthz and
/metrics; rule evaluation lands with the rules issue.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet.errors import ConfigError
from iotfleet.lifecycle import HealthServer, ServiceLifecycle, configure_logging, fail_fast
from iotfleet.settings import Settings, load_settings

SERVICE = "rules-engine"


def run(settings: Settings) -> None:
    lifecycle = ServiceLifecycle(SERVICE)
    lifecycle.install_signal_handlers()
    lifecycle.starting(broker=f"{settings.mqtt.host}:{settings.mqtt.port}")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="iotfleet-rules", protocol=mqtt.MQTTv5)
    if settings.mqtt.username:
        password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else None
        client.username_pw_set(settings.mqtt.username, password)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.connect_async(settings.mqtt.host, settings.mqtt.port, keepalive=settings.mqtt.keepalive_s)
    client.loop_start()
    health = HealthServer(
        settings.health,
        lambda: {
            "status": "ok" if client.is_connected() else "degraded",
            "mqtt_connected": client.is_connected(),
        },
    )
    health.start()
    lifecycle.ready(health_port=health.port)
    lifecycle.stop_requested.wait()
    client.disconnect()
    client.loop_stop()
    health.stop()
    lifecycle.stopped()


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as error:
        fail_fast(error, SERVICE)
        return
    configure_logging(settings.log_level)
    run(settings)


if __name__ == "__main__":
    main()
