"""The services' MQTT clients over TLS (issue #19): IOTFLEET_MQTT__TLS / __CA_FILE / __TLS_SERVER_NAME.

Against a real mosquitto with the platform's TLS listener: the asyncio client of the ingest and the
rules engine (iotfleet/mqtt_client.py) and a paho client configured like the registry's
(tls_clients.apply_to_paho) connect with a service account, verify the broker's certificate, and
check the name IOTFLEET_MQTT__TLS_SERVER_NAME gives instead of the host (a wrong one is refused).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import pki, tls_clients
from iotfleet.mqtt_client import MqttClient, SessionConfig
from iotfleet.settings import MqttSettings, TlsSettings
from iotfleet.stack import configs, probes
from tests.harness import Broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, int, Path]]:
    state = tmp_path_factory.mktemp("service-tls")
    platform = pki.ensure_platform_pki(TlsSettings(), state, ["127.0.0.1"])
    port, cert_port = probes.free_ports(2)
    broker = Broker(
        state / "mosquitto", config={"tls": configs.TlsListeners(platform, "127.0.0.1", port, cert_port)}
    )
    broker.start()
    try:
        yield broker, port, platform.ca_cert_path
    finally:
        broker.stop()


def service_settings(broker: Broker, port: int, ca: Path, server_name: str | None) -> MqttSettings:
    return MqttSettings(
        host="127.0.0.1",
        port=port,
        username="iotfleet-ingest",
        password=broker.passwords["iotfleet-ingest"],
        tls=True,
        ca_file=ca,
        tls_server_name=server_name,
    )


def asyncio_client_connects(settings: MqttSettings) -> tuple[bool, str]:
    async def run() -> tuple[bool, str]:
        states: list[tuple[bool, str]] = []
        client = MqttClient(
            settings,
            SessionConfig("svc-tls-test", ("devices/thermostat/+/telemetry",), 1, 10),
            lambda _t, _p, _k: None,
            lambda up, why: states.append((up, why)),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(client.run(stop))
        for _ in range(100):
            if states:
                break
            await asyncio.sleep(0.05)
        if states and states[0][0]:
            await client.disconnect(end_session=True)
        stop.set()
        await asyncio.wait_for(task, 10)
        return states[0] if states else (False, "no state change")

    return asyncio.run(run())


def paho_client_connects(settings: MqttSettings) -> tuple[bool, str]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="svc-tls-paho", protocol=mqtt.MQTTv5)
    assert settings.password is not None
    client.username_pw_set(settings.username, settings.password.get_secret_value())
    tls_clients.apply_to_paho(client, settings)
    done = threading.Event()
    outcome: list[bool] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        outcome.append(not reason.is_failure)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(settings.host, settings.port, keepalive=10)
    except ssl.SSLError as exc:
        return False, str(exc)
    client.loop_start()
    try:
        done.wait(10)
        return (bool(outcome and outcome[0]), "connected" if outcome else "no CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()


Connects = Callable[[MqttSettings], tuple[bool, str]]


@pytest.mark.parametrize("connects", [asyncio_client_connects, paho_client_connects], ids=["asyncio", "paho"])
def test_service_clients_verify_the_broker_and_the_name(
    tls_broker: tuple[Broker, int, Path], connects: Connects
) -> None:
    broker, port, ca = tls_broker
    ok, why = connects(service_settings(broker, port, ca, None))  # the host, 127.0.0.1, is a SAN
    assert ok, why
    ok, why = connects(service_settings(broker, port, ca, "localhost"))  # another SAN
    assert ok, why
    refused, why = connects(service_settings(broker, port, ca, "not-the-broker.example"))
    assert not refused and "certificate" in why.lower(), why


def test_a_ca_that_did_not_sign_the_broker_is_refused(
    tls_broker: tuple[Broker, int, Path], tmp_path: Path
) -> None:
    broker, port, _ = tls_broker
    other = pki.ensure_platform_pki(TlsSettings(), tmp_path, ["127.0.0.1"]).ca_cert_path
    ok, why = asyncio_client_connects(service_settings(broker, port, other, None))
    assert not ok and "certificate verify failed" in why, why
