"""Presence: online/offline from the broker's connection events, last_seen from telemetry, batched writes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from iotfleet import topics
from iotfleet.topics import Channel
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    Api,
    DeviceClient,
    connect_device,
    database_url,
    postgres,
    registry_settings,
    running_registry,
    wait_for,
)

pytestmark = pytest.mark.integration


async def _device(api: Api, device_id: str) -> dict[str, object]:
    resp = await api.http.get(f"/api/v1/devices/{device_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, object] = resp.json()
    return body


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _online_device(broker: Broker, dev: dict[str, object]) -> DeviceClient:
    """Connects with an LWT "offline" (retained) and announces "online" (retained), as devices must."""
    status = topics.device_topic(str(dev["type"]), str(dev["id"]), Channel.STATUS)
    creds = dev["credentials"]
    assert isinstance(creds, dict)
    client = DeviceClient(broker.settings_for(), creds["username"], creds["password"])
    client.will(status, topics.STATUS_OFFLINE)
    client.connect()
    assert not client.publish(status, topics.STATUS_ONLINE, retain=True).is_failure  # 16: no subscriber yet
    return client


def _die(client: DeviceClient) -> None:
    """Drop the connection so the broker publishes the will (MQTT 5 reason 0x04)."""
    client.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    client.client.loop_stop()


async def test_online_last_seen_offline_follow_the_device(
    broker: Broker,
    tmp_path: Path,
    uid: Callable[[str], str],
    database_url: str,  # noqa: F811  (SQLite, then PostgreSQL)
) -> None:
    settings = registry_settings(broker, tmp_path, database_url)
    async with running_registry(settings) as api:
        dev = (await api.http.post("/api/v1/devices", json={"id": uid("pres"), "type": "thermostat"})).json()
        device_id = dev["id"]
        client = _online_device(broker, dev)

        async def online() -> bool:
            return (await _device(api, device_id))["online"] is True

        await wait_for(online, what="online", within=5)
        first = await _device(api, device_id)
        assert first["connected_since"] is not None and first["last_seen"] is not None
        listed = (await api.http.get("/api/v1/devices", params={"online": "true", "q": device_id})).json()
        assert [d["id"] for d in listed["items"]] == [device_id]

        # Telemetry moves last_seen, in batches: 300 readings are not 300 DB writes.
        before = (await api.http.get("/metrics")).text
        for seq in range(300):
            client.client.publish(
                dev["topics"]["telemetry"], f'{{"seq": {seq}, "temperature_c": 20.0}}', qos=1
            )
        assert client.publish(dev["topics"]["telemetry"], b'{"temperature_c": 20.0}').value == 0

        async def seen_later() -> bool:
            current = (await _device(api, device_id))["last_seen"]
            return datetime.fromisoformat(str(current)) > datetime.fromisoformat(str(first["last_seen"]))

        await wait_for(seen_later, what="last_seen advanced", within=5)
        after = (await api.http.get("/metrics")).text
        seen = _metric(after, 'registry_presence_messages_total{channel="telemetry"}') - _metric(
            before, 'registry_presence_messages_total{channel="telemetry"}'
        )
        written = _metric(after, "registry_presence_devices_flushed_total") - _metric(
            before, "registry_presence_devices_flushed_total"
        )
        assert seen >= 300
        assert written <= 10, f"{written} presence rows written for {seen} readings"

        _die(client)

        async def offline() -> bool:
            d = await _device(api, device_id)
            return d["online"] is False and d["connected_since"] is None

        await wait_for(offline, what="offline after the disconnect", within=5)

    # While the registry is down the device comes back. Its retained "online" is only a hint
    # (it may be stale): the restarted registry shows it offline (registry_restart) until it
    # speaks, then online again (cause "message").
    client = _online_device(broker, dev)
    try:
        async with running_registry(settings) as api:
            await wait_for(lambda: api.state.presence.connected, what="presence link", within=5)
            assert client.publish(dev["topics"]["telemetry"], b'{"temperature_c": 20.0}').value == 0
            await wait_for(online, what="online again once it spoke", within=5)
            history = (await api.http.get(f"/api/v1/devices/{device_id}/presence")).json()
            causes = [(t["online"], t["cause"]) for t in history["items"]]
            assert causes[:2] == [(True, "connected"), (False, "disconnected")], causes
            assert causes[-1] == (True, "message"), causes
            # Disabling kicks it: the broker closes the connection, the registry marks it offline.
            assert (await api.http.post(f"/api/v1/devices/{device_id}/disable")).status_code == 200
            await wait_for(lambda: client.disconnected_at is not None, what="kicked", within=1)

            async def offline_disabled() -> bool:
                d = await _device(api, device_id)
                return d["online"] is False and d["enabled"] is False

            await wait_for(offline_disabled, what="offline after the kick", within=5)
            history = (await api.http.get(f"/api/v1/devices/{device_id}/presence")).json()
            assert [(t["online"], t["cause"]) for t in history["items"]][-1] == (False, "kicked"), history
    finally:
        client.close()


async def test_presence_ignores_unknown_devices_and_junk(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        dev = (await api.http.post("/api/v1/devices", json={"id": uid("junk"), "type": "smart_plug"})).json()
        client = connect_device(broker, dev["id"], dev["credentials"]["password"])
        status = dev["topics"]["status"]
        assert client.publish(status, b"\xff\xfe not a status").value == 0
        assert client.publish(dev["topics"]["telemetry"], b"\x00\x01").value == 0

        async def seen() -> bool:
            return (await _device(api, dev["id"]))["last_seen"] is not None

        # The junk telemetry still counts as "seen"; the junk status is counted as unparsed.
        await wait_for(seen, what="last_seen from junk telemetry", within=5)
        health = await api.http.get("/healthz")
        assert health.status_code == 200
        assert (await _device(api, dev["id"]))["online"] is True  # connected, whatever it published
        metrics = (await api.http.get("/metrics")).text
        assert _metric(metrics, "registry_presence_status_unparsed_total") >= 1
        client.close()
