"""Kill -9 and restart loses nothing; reconcile finds and repairs drift; the registry starts before the broker."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import dynsec
from iotfleet.stack import probes
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    RegistryProcess,
    connect_device,
    database_url,
    postgres,
    registry_settings,
    running_registry,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def registry_process(
    fresh_broker: Broker,
    tmp_path: Path,
    database_url: str,  # noqa: F811  (SQLite, then PostgreSQL)
    request: pytest.FixtureRequest,
) -> Iterator[RegistryProcess]:
    process = RegistryProcess(fresh_broker, tmp_path / "registry", database_url)
    yield process
    process.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print("----- registry log -----\n" + process.log_tail())


def _reconcile_report(http: httpx.Client) -> dict[str, Any]:
    def done() -> bool:
        return http.get("/api/v1/reconcile").status_code == 200

    probes.wait_until(done, timeout=15, what="reconcile report")
    report: dict[str, Any] = http.get("/api/v1/reconcile").json()
    return report


def test_kill_9_and_restart_loses_nothing(
    registry_process: RegistryProcess, fresh_broker: Broker, uid: Callable[[str], str]
) -> None:
    registry_process.start()
    with registry_process.client() as http:
        created = http.post(
            "/api/v1/devices/bulk",
            json={"devices": [{"id": f"{uid('dur')}-{i}", "type": "air_quality", "tags": {"n": str(i)}}
                              for i in range(40)]},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        devices = created.json()["devices"]
        key = http.post("/api/v1/api-keys", json={"name": "survivor", "role": "viewer"}).json()
        assert http.post(f"/api/v1/devices/{devices[1]['id']}/disable").status_code == 200
        rotated = http.post(f"/api/v1/devices/{devices[2]['id']}/rotate-credentials").json()
        assert http.delete(f"/api/v1/devices/{devices[3]['id']}").status_code == 204
        before = http.get("/api/v1/devices", params={"limit": 1000}).json()["items"]

    registry_process.kill()
    registry_process.start()

    with registry_process.client() as http:
        after = http.get("/api/v1/devices", params={"limit": 1000}).json()["items"]
        assert [(d["id"], d["enabled"], d["tags"]) for d in after] == [
            (d["id"], d["enabled"], d["tags"]) for d in before
        ]
        assert len(after) == 39
        with httpx.Client(
            base_url=registry_process.url, headers={"Authorization": f"Bearer {key['key']}"}
        ) as viewer:
            assert viewer.get("/api/v1/devices").status_code == 200
        report = _reconcile_report(http)
        assert report["ok"] is True
        assert report["drift_count"] == 0, report["drift"]
        assert report["devices_checked"] == 39
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["reconcile"]["drift_count"] == 0

    # Credentials survived: original, rotated; the disabled one is still refused.
    ok = connect_device(fresh_broker, devices[0]["id"], devices[0]["credentials"]["password"])
    assert not ok.connack.is_failure  # type: ignore[union-attr]
    ok.close()
    new = connect_device(fresh_broker, devices[2]["id"], rotated["credentials"]["password"])
    assert not new.connack.is_failure  # type: ignore[union-attr]
    new.close()
    for device_id, password in [
        (devices[1]["id"], devices[1]["credentials"]["password"]),
        (devices[2]["id"], devices[2]["credentials"]["password"]),
        (devices[3]["id"], devices[3]["credentials"]["password"]),
    ]:
        refused = connect_device(fresh_broker, device_id, password)
        assert refused.connack.value == 135, device_id  # type: ignore[union-attr]
        refused.close()


def _dynsec(broker: Broker, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tamper with the broker behind the registry's back, as the admin account."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])
    answer: list[list[dict[str, Any]]] = []
    subscribed = threading.Event()
    # The response topic is shared with the registry's own admin link: our answer is the one
    # carrying our correlation data (a bulk under way answers on the same topic).
    tag = secrets.token_hex(4)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        responses = json.loads(message.payload)["responses"]
        if responses and str(responses[0].get("correlationData", "")).startswith(f"{tag}:"):
            answer.append(responses)

    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe(dynsec.RESPONSE_TOPIC, qos=1)
    assert subscribed.wait(5)
    tagged = [{**command, "correlationData": f"{tag}:{i}"} for i, command in enumerate(commands)]
    client.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
    probes.wait_until(lambda: bool(answer), timeout=10, what="dynsec answer")
    client.disconnect()
    client.loop_stop()
    assert not [r for r in answer[0] if r.get("error")], answer[0]
    return answer[0]


async def test_reconcile_repairs_every_kind_of_drift(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    ids = [uid(f"drift{i}") for i in range(4)]
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        resp = await api.http.post(
            "/api/v1/devices/bulk", json={"devices": [{"id": i, "type": "thermostat"} for i in ids]}
        )
        assert resp.status_code == 201
        passwords = {d["id"]: d["credentials"]["password"] for d in resp.json()["devices"]}
        assert (await api.http.post(f"/api/v1/devices/{ids[2]}/disable")).status_code == 200
        role1 = dynsec.device_role_name(ids[1])
        _dynsec(
            fresh_broker,
            [
                {"command": "deleteClient", "username": ids[0]},
                {"command": "removeRoleACL", "rolename": role1, "acltype": "subscribePattern",
                 "topic": f"devices/thermostat/{ids[1]}/commands"},
                {"command": "addRoleACL", "rolename": role1, "acltype": "publishClientSend",
                 "topic": "devices/#", "allow": True, "priority": 0},
                {"command": "enableClient", "username": ids[2]},
                {"command": "removeClientRole", "username": ids[3], "rolename": dynsec.device_role_name(ids[3])},
                {"command": "createRole", "rolename": "device-rogue", "textname": "iotfleet device"},
                {"command": "createClient", "username": "rogue", "password": "x", "textname": "iotfleet device",
                 "roles": [{"rolename": "device-rogue"}]},
                # Made by another tool (no registry marker): reported, left alone.
                {"command": "createRole", "rolename": "device-other-tool"},
                {"command": "createClient", "username": "other-tool", "password": "x",
                 "roles": [{"rolename": "device-other-tool"}]},
            ],
        )  # fmt: skip
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert report["ok"]
        found = {(d["device_id"], d["kind"]) for d in report["drift"]}
        assert found == {
            (ids[0], "missing_client"),
            (ids[1], "acl_mismatch"),
            (ids[2], "enabled_mismatch"),
            (ids[3], "role_not_assigned"),
            ("rogue", "orphan_client"),
            ("rogue", "orphan_role"),
        }
        assert set(report["unmanaged"]) == {"client other-tool", "role device-other-tool"}
        again = (await api.http.post("/api/v1/reconcile")).json()
        assert again["drift_count"] == 0, again["drift"]
        assert again["unmanaged_count"] == 2
        text = (await api.http.get("/metrics")).text
        assert "registry_reconcile_drift 0.0" in text

        # The repaired broker enforces the registry's view again.
        refused = connect_device(fresh_broker, ids[2], passwords[ids[2]])
        assert refused.connack.value == 135  # type: ignore[union-attr]
        refused.close()
        device = connect_device(fresh_broker, ids[1], passwords[ids[1]])
        assert not device.subscribe(f"devices/thermostat/{ids[1]}/commands").is_failure
        assert device.publish(f"devices/thermostat/{ids[0]}/telemetry", b"{}").value == 135
        device.close()
        # The recreated client has a password nobody knows: rotating gives a working one.
        rotated = (await api.http.post(f"/api/v1/devices/{ids[0]}/rotate-credentials")).json()
        back = connect_device(fresh_broker, ids[0], rotated["credentials"]["password"])
        assert not back.connack.is_failure  # type: ignore[union-attr]
        back.close()


async def test_registry_starts_before_the_broker(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late-broker")  # port chosen, not started yet
    settings = registry_settings(broker, tmp_path / "state")
    from device_registry.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded"
            assert health.json()["checks"]["database"] == "ok"
            # Writes that need the broker say so clearly; reads work.
            from tests.registry_harness import ADMIN_KEY

            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
            resp = await http.post("/api/v1/devices", json={"type": "thermostat"}, headers=auth)
            assert resp.status_code == 503 and resp.json()["type"].endswith("broker-unavailable")
            assert (await http.get("/api/v1/devices", headers=auth)).json()["items"] == []
            broker.start()
            try:
                await wait_for(lambda: app.state.registry.broker.connected, what="broker link", within=20)
                await wait_for(
                    lambda: app.state.registry.reconciler.last is not None, what="reconcile", within=10
                )
                health = await http.get("/healthz")
                assert health.status_code == 200, health.text
                resp = await http.post("/api/v1/devices", json={"type": "thermostat"}, headers=auth)
                assert resp.status_code == 201
            finally:
                broker.stop()


def test_kill_9_in_the_middle_of_a_bulk_leaves_no_stray_credentials(
    registry_process: RegistryProcess, fresh_broker: Broker, uid: Callable[[str], str]
) -> None:
    registry_process.start()
    prefix = uid("mid")
    body = {"devices": [{"id": f"{prefix}-{i:04d}", "type": "thermostat"} for i in range(400)]}

    def post() -> None:
        with registry_process.client() as http, contextlib.suppress(httpx.HTTPError):
            http.post("/api/v1/devices/bulk", json=body)

    def device_clients() -> list[str]:
        [listing] = _dynsec(fresh_broker, [{"command": "listClients", "count": -1}])
        return [c for c in listing["data"]["clients"] if str(c).startswith(prefix)]  # type: ignore[index]

    sender = threading.Thread(target=post)
    sender.start()
    probes.wait_until(lambda: len(device_clients()) > 0, timeout=30, what="bulk under way")
    registry_process.kill()  # broker entries exist, the DB commit never happened
    sender.join(timeout=30)
    assert device_clients(), "the kill came too late to leave broker entries behind"

    registry_process.start()
    with registry_process.client() as http:
        report = _reconcile_report(http)
        assert report["ok"] and report["devices_checked"] == 0
        assert set(report["drift_by_kind"]) <= {"orphan_client", "orphan_role"}
        assert report["drift_by_kind"]["orphan_client"] >= 1
        assert http.get("/api/v1/devices").json()["items"] == []
        assert http.post("/api/v1/reconcile").json()["drift_count"] == 0
    assert device_clients() == []
