"""Acceptance: provisioned credentials and ACLs as the real broker enforces them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iotfleet import topics
from iotfleet.topics import Channel
from tests.harness import Broker
from tests.registry_harness import (
    DeviceClient,
    admin_listener,
    connect_device,
    registry_settings,
    running_registry,
    wait_for,
)

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 135


async def test_device_speaks_only_for_itself(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        resp = await api.http.post(
            "/api/v1/devices/bulk",
            json={
                "devices": [{"id": uid("a"), "type": "thermostat"}, {"id": uid("b"), "type": "thermostat"}]
            },
        )
        assert resp.status_code == 201, resp.text
        a, b = resp.json()["devices"]
        assert a["credentials"]["username"] == a["id"] == a["credentials"]["client_id"]
        assert a["topics"]["telemetry"] == topics.device_topic("thermostat", a["id"], Channel.TELEMETRY)

        listener = admin_listener(broker, topics.device_filter(Channel.TELEMETRY))
        device = connect_device(broker, a["id"], a["credentials"]["password"])
        try:
            assert not device.connack.is_failure  # type: ignore[union-attr]
            # Its own telemetry goes through and is delivered.
            assert device.publish(a["topics"]["telemetry"], b'{"temperature_c": 21.5}').value == 0
            await wait_for(
                lambda: any(m.topic == a["topics"]["telemetry"] for m in listener.messages), what="own"
            )
            # Another device's telemetry: PUBACK 135 and nothing delivered.
            assert device.publish(b["topics"]["telemetry"], b'{"temperature_c": 99}').value == NOT_AUTHORIZED
            # Another device's commands, or all commands: SUBACK 135 (the broker's device plugin
            # checks subscriptions too); its own: granted. A command to b and then one to a —
            # only a's arrives.
            assert device.subscribe(b["topics"]["commands"]).value == NOT_AUTHORIZED
            assert device.subscribe(topics.device_filter(Channel.COMMANDS)).value == NOT_AUTHORIZED
            assert not device.subscribe(a["topics"]["commands"]).is_failure
            platform = DeviceClient(
                broker.settings_for("iotfleet-rules"), "iotfleet-rules", broker.passwords["iotfleet-rules"],
                client_id=f"platform-{uid('p')}",
            )  # fmt: skip
            platform.connect()
            try:
                assert platform.publish(b["topics"]["commands"], b"for-b").value in (0, 16)
                assert platform.publish(a["topics"]["commands"], b"for-a").value == 0
                await wait_for(
                    lambda: any(m.payload == b"for-a" for m in device.messages), what="own command"
                )
                assert not any(m.payload == b"for-b" for m in device.messages)
            finally:
                platform.close()
            # A marker published after the forbidden one: once it arrives, the forbidden one would have too.
            assert device.publish(a["topics"]["telemetry"], b"marker").value == 0
            await wait_for(lambda: any(m.payload == b"marker" for m in listener.messages), what="marker")
            assert not any(m.topic == b["topics"]["telemetry"] for m in listener.messages)
        finally:
            device.close()
            listener.close()

        # Wrong password, and a device id used as client id by another username: CONNACK 135.
        wrong = connect_device(broker, a["id"], "not-the-password")
        assert wrong.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        wrong.close()


async def test_disabled_device_is_kicked_and_refused_until_enabled(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        resp = await api.http.post("/api/v1/devices", json={"id": uid("kick"), "type": "smart_plug"})
        assert resp.status_code == 201, resp.text
        dev = resp.json()
        password = dev["credentials"]["password"]
        device = connect_device(broker, dev["id"], password)
        assert device.is_connected

        started = time.monotonic()
        resp = await api.http.post(f"/api/v1/devices/{dev['id']}/disable")
        assert resp.status_code == 200, resp.text
        assert resp.json()["enabled"] is False
        await wait_for(lambda: device.disconnected_at is not None, what="kick", within=1.0, interval=0.005)
        assert device.disconnected_at is not None
        kick_latency = device.disconnected_at - started
        print(f"disable → disconnect: {kick_latency * 1000:.1f} ms")
        assert kick_latency < 1.0
        device.close()

        again = connect_device(broker, dev["id"], password)
        assert again.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        again.close()

        resp = await api.http.post(f"/api/v1/devices/{dev['id']}/enable")
        assert resp.status_code == 200 and resp.json()["enabled"] is True
        back = connect_device(broker, dev["id"], password)
        assert not back.connack.is_failure  # type: ignore[union-attr]
        back.close()


async def test_rotate_and_delete_kick_the_live_connection(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        dev = (await api.http.post("/api/v1/devices", json={"id": uid("rot"), "type": "thermostat"})).json()
        old = dev["credentials"]["password"]
        device = connect_device(broker, dev["id"], old)
        resp = await api.http.post(f"/api/v1/devices/{dev['id']}/rotate-credentials")
        assert resp.status_code == 200
        new = resp.json()["credentials"]["password"]
        await wait_for(lambda: device.disconnected_at is not None, what="kick on rotate", within=1.0)
        device.close()
        refused = connect_device(broker, dev["id"], old)
        assert refused.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        refused.close()
        device = connect_device(broker, dev["id"], new)
        assert not device.connack.is_failure  # type: ignore[union-attr]

        assert (await api.http.delete(f"/api/v1/devices/{dev['id']}")).status_code == 204
        await wait_for(lambda: device.disconnected_at is not None, what="kick on delete", within=1.0)
        device.close()
        gone = connect_device(broker, dev["id"], new)
        assert gone.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        gone.close()
