"""The broker's device file end to end (issue #15): thousands of devices, then one more, kicks, isolation, drift.

Devices are lines of the broker's device file, written by iotfleet-broker-agent
and read by the broker's device plugin; every change is one atomic file write and
one SIGHUP. With a few thousand devices present, each single-device change must
still take effect within 1 s, and a reconcile must see a change made behind the
registry's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from device_registry import legacy_dynsec
from device_registry.models import Device
from iotfleet import topics
from iotfleet.topics import Channel
from tests.devices import admin_call, dynsec_commands
from tests.harness import Broker
from tests.registry_harness import connect_device, registry_settings, running_registry, wait_for

pytestmark = pytest.mark.integration

FLEET = 3_000
NOT_AUTHORIZED = 135


async def _timed_kick(api: Any, device: Any, method: str, path: str) -> float:
    started = time.monotonic()
    resp = await api.http.request(method, path)
    assert resp.status_code in (200, 204), resp.text
    await wait_for(
        lambda: device.disconnected_at is not None, what=f"kick by {path}", within=1.0, interval=0.005
    )
    return float(device.disconnected_at - started)


async def test_one_more_device_kicks_and_drift_with_thousands_present(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    prefix = uid("fleet")
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        body = {"devices": [{"id": f"{prefix}-{i:05d}", "type": "thermostat"} for i in range(FLEET)]}
        started = time.monotonic()
        resp = await api.http.post("/api/v1/devices/bulk", json=body)
        assert resp.status_code == 201, resp.text
        print(f"{FLEET} devices provisioned in {time.monotonic() - started:.2f} s")
        fleet = resp.json()["devices"]
        # The file holds exactly one line per device (plus the agent's probe entry), nothing half-written.
        lines = (fresh_broker.state_dir / "devices").read_text().splitlines()
        assert sum(line.startswith(prefix) for line in lines) == FLEET

        # One more device: usable as soon as the API answered (the agent waited for the reload).
        started = time.monotonic()
        resp = await api.http.post("/api/v1/devices", json={"id": uid("late"), "type": "smart_plug"})
        assert resp.status_code == 201, resp.text
        late = resp.json()
        device = connect_device(fresh_broker, late["id"], late["credentials"]["password"])
        assert not device.connack.is_failure  # type: ignore[union-attr]
        connect_s = time.monotonic() - started
        print(f"create → connected: {connect_s * 1000:.0f} ms")
        assert connect_s < 1.0

        # Isolation: own topics yes; another device's id (same type or not), or its own id under
        # another type: PUBACK/SUBACK 135.
        other = fleet[0]["id"]
        assert device.publish(late["topics"]["telemetry"], b"{}").value == 0
        assert device.publish(topics.device_topic("smart_plug", other, Channel.TELEMETRY), b"{}").value == 135
        assert device.publish(topics.device_topic("thermostat", other, Channel.TELEMETRY), b"{}").value == 135
        assert device.publish(topics.device_topic("thermostat", other, Channel.ACKS), b"{}").value == 135
        assert device.publish(topics.device_topic("smart_plug", other, Channel.COMMANDS), b"{}").value == 135
        assert (
            device.publish(topics.device_topic("thermostat", late["id"], Channel.TELEMETRY), b"{}").value
            == 135
        )
        assert device.subscribe(topics.device_topic("thermostat", other, Channel.COMMANDS)).value == 135
        assert device.subscribe(topics.device_topic("thermostat", late["id"], Channel.COMMANDS)).value == 135
        assert device.subscribe("devices/#").value == 135
        assert not device.subscribe(late["topics"]["commands"]).is_failure

        # Rotate, disable, delete: each kicks within 1 s; the old credentials get CONNACK 135.
        rotate_s = await _timed_kick(api, device, "POST", f"/api/v1/devices/{late['id']}/rotate-credentials")
        device.close()
        refused = connect_device(fresh_broker, late["id"], late["credentials"]["password"])
        assert refused.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        refused.close()

        victim = fleet[1]
        device = connect_device(fresh_broker, victim["id"], victim["credentials"]["password"])
        disable_s = await _timed_kick(api, device, "POST", f"/api/v1/devices/{victim['id']}/disable")
        device.close()
        refused = connect_device(fresh_broker, victim["id"], victim["credentials"]["password"])
        assert refused.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        refused.close()

        victim = fleet[2]
        device = connect_device(fresh_broker, victim["id"], victim["credentials"]["password"])
        delete_s = await _timed_kick(api, device, "DELETE", f"/api/v1/devices/{victim['id']}")
        device.close()
        refused = connect_device(fresh_broker, victim["id"], victim["credentials"]["password"])
        assert refused.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        refused.close()
        print(f"kick latency: rotate {rotate_s * 1000:.0f} ms, disable {disable_s * 1000:.0f} ms,"
              f" delete {delete_s * 1000:.0f} ms")  # fmt: skip

        # Drift behind the registry's back is found among thousands, and repaired.
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert report["ok"] and report["drift_count"] == 0 and report["devices_checked"] == FLEET
        async with httpx.AsyncClient(
            base_url=f"http://{fresh_broker.host}:{fresh_broker.agent_port}",
            headers={"Authorization": f"Bearer {fresh_broker.agent_token}"},
        ) as agent:
            assert (await agent.post("/v1/changes", json={"remove": [fleet[3]["id"]]})).status_code == 200
            # The agent refuses the platform's namespace: it never touches those accounts.
            refused_names = await agent.post("/v1/changes", json={"remove": ["iotfleet-registry"]})
            assert refused_names.status_code == 422
            assert (
                await agent.post("/v1/changes", headers={"Authorization": "Bearer wrong"}, json={})
            ).status_code == 401
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert [(d["device_id"], d["kind"]) for d in report["drift"]] == [(fleet[3]["id"], "missing_entry")]
        back = connect_device(fresh_broker, fleet[3]["id"], fleet[3]["credentials"]["password"])
        assert not back.connack.is_failure  # type: ignore[union-attr]
        back.close()


async def test_devices_from_before_the_file_stay_safe_until_rotated(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """An upgraded registry: a device still has its dynsec client (no stored hash) — it works, and disable locks it out."""
    old_id, stray_id = uid("old"), uid("stray")
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        resp = await api.http.post("/api/v1/devices", json={"id": old_id, "type": "thermostat"})
        assert resp.status_code == 201, resp.text
        # Make it look like a device of an older registry: no hash, not in the file, a dynsec client.
        async with api.state.sessions() as session:
            await session.execute(update(Device).where(Device.id == old_id).values(password_hash=None))
            await session.commit()
        async with httpx.AsyncClient(
            base_url=f"http://{fresh_broker.host}:{fresh_broker.agent_port}",
            headers={"Authorization": f"Bearer {fresh_broker.agent_token}"},
        ) as agent:
            assert (await agent.post("/v1/changes", json={"remove": [old_id]})).status_code == 200
        commands = dynsec_commands(
            [("thermostat", old_id), ("thermostat", stray_id)], {old_id: "pw-old", stray_id: "x"}
        )
        for command in commands:
            command["textname"] = legacy_dynsec.TEXTNAME
        admin_call(fresh_broker, commands)

        device = connect_device(fresh_broker, old_id, "pw-old")
        assert not device.connack.is_failure  # type: ignore[union-attr]
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert report["legacy_dynsec"] == [old_id]
        assert [(d["device_id"], d["kind"]) for d in report["drift"]] == [(stray_id, "legacy_dynsec_client")]
        assert (await api.http.post("/api/v1/reconcile")).json()["drift_count"] == 0

        await _timed_kick(api, device, "POST", f"/api/v1/devices/{old_id}/disable")
        device.close()
        refused = connect_device(fresh_broker, old_id, "pw-old")
        assert refused.connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        refused.close()
        resp = await api.http.post(f"/api/v1/devices/{old_id}/enable")
        assert resp.status_code == 409 and "rotate" in resp.json()["detail"]
        rotated = (await api.http.post(f"/api/v1/devices/{old_id}/rotate-credentials")).json()
        assert (await api.http.post(f"/api/v1/devices/{old_id}/enable")).status_code == 200
        back = connect_device(fresh_broker, old_id, rotated["credentials"]["password"])
        assert not back.connack.is_failure  # type: ignore[union-attr]
        back.close()
        assert (await api.http.post("/api/v1/reconcile")).json()["legacy_dynsec_count"] == 0
