"""The services' MQTT client against a real broker: a resumed session's backlog flows in full."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from iotfleet.mqtt_client import MqttClient, SessionConfig
from tests.devices import provision
from tests.harness import Broker
from tests.rules_support import SimThermostat

RECEIVE_MAXIMUM = 10
BACKLOG = 5 * RECEIVE_MAXIMUM


def test_a_backlog_larger_than_the_receive_maximum_is_delivered_after_a_reconnect(
    broker: Broker, uid: Callable[[str], str]
) -> None:
    """Mosquitto sends a resumed session's queued messages right after the CONNACK, before the
    SUBACK: their acks must go out, or the broker's window stays full and nothing more comes
    (a rules engine back from a host failure evaluated nothing)."""
    device_id = uid("backlog")
    device = SimThermostat(broker, device_id, provision(broker, [("thermostat", device_id)])[device_id])
    device.connect()
    settings = broker.settings_for("iotfleet-rules")
    session = SessionConfig(uid("resume"), (f"devices/thermostat/{device_id}/telemetry",), 1, RECEIVE_MAXIMUM)

    async def connect_and_collect(wanted: int, within_s: float) -> int:
        received: list[int] = []
        up, done = asyncio.Event(), asyncio.Event()
        client: MqttClient

        def sink(_topic: str, _payload: bytes, token: int) -> None:
            received.append(token)
            client.ack([token])
            if len(received) >= wanted:
                done.set()

        client = MqttClient(settings, session, sink, lambda ok, _why: up.set() if ok else None)
        stop = asyncio.Event()
        task = asyncio.create_task(client.run(stop))
        await asyncio.wait_for(up.wait(), 20)
        if wanted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), within_s)
        await client.disconnect()  # the session stays on the broker for the next connection
        stop.set()
        await asyncio.wait_for(task, 10)
        return len(received)

    try:
        assert asyncio.run(connect_and_collect(0, 0)) == 0  # the session and its subscription exist
        for _ in range(BACKLOG):
            device.publish(21.0)  # queued for the offline session
        assert asyncio.run(connect_and_collect(BACKLOG, 20)) == BACKLOG
    finally:
        device.disconnect()
