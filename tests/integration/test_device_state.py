"""Device shadow against the real stack: registry over HTTP, real broker with the device plugin, MQTT devices.

One registry (and one rules engine) per module; each test provisions its own
devices. Devices are plain paho MQTT 5 clients speaking the public wire format:
they subscribe to their retained ``state/delta``, apply it and publish a partial
document on ``state/reported``.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotfleet import topics
from iotfleet.topics import Channel
from simulators.fleet import DeviceCredentials, Fleet, FleetConfig
from tests.harness import Broker
from tests.integration.test_rules_registry import Platform, platform_settings
from tests.registry_harness import ADMIN_KEY
from tests.rules_support import RegistryServer, wait

pytestmark = pytest.mark.integration


class ShadowDevice:
    """A device that converges: applies each delta it receives and reports the result (if ``obey``)."""

    def __init__(
        self, broker: Broker, device_type: str, device_id: str, password: str, obey: bool = True
    ) -> None:
        self.device_type, self.device_id, self.obey = device_type, device_id, obey
        self.state: dict[str, Any] = {}
        self.deltas: list[bytes] = []
        self.errors: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.host, self.port = broker.host, broker.port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.on_message = self._on_message
        self.subacks: dict[int, list[int]] = {}
        self.client.on_subscribe = self._on_subscribe

    def topic(self, channel: Channel, device_id: str | None = None) -> str:
        return topics.device_topic(self.device_type, device_id or self.device_id, channel)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        self.subacks[mid] = [int(r.value) for r in reasons]

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/errors"):
            with self.lock:
                self.errors.append(orjson.loads(msg.payload))
            return
        with self.lock:
            self.deltas.append(bytes(msg.payload))
        if not msg.payload or not self.obey:
            return  # an empty message clears the retained delta: nothing to do
        delta = orjson.loads(msg.payload)["state"]
        with self.lock:
            self.state.update(delta)
        client.publish(self.topic(Channel.STATE_REPORTED), orjson.dumps(delta), qos=1)

    def connect(self) -> ShadowDevice:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self.client.connect(self.host, self.port, keepalive=30, clean_start=True, properties=props)
        self.client.loop_start()
        self.subscribe(self.topic(Channel.STATE_DELTA), self.topic(Channel.ERRORS))
        return self

    def subscribe(self, *filters: str) -> list[int]:
        _rc, mid = self.client.subscribe([(f, 1) for f in filters])
        wait(lambda: mid in self.subacks, "SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        done = threading.Event()
        codes: list[int] = []

        def acked(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
            codes.append(int(reason.value))
            done.set()

        self.client.on_publish = acked
        self.client.publish(topic, payload, qos=1)
        assert done.wait(10), "no PUBACK"
        return codes[0]

    def report(self, state: dict[str, Any]) -> int:
        return self.publish(self.topic(Channel.STATE_REPORTED), orjson.dumps(state))

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def shadow_platform(session_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp: Path = tmp_path_factory.mktemp("shadow")
    token = secrets.token_hex(4)
    registry_settings, engine_settings = platform_settings(session_broker, tmp, uid=lambda p: f"{p}-{token}")
    registry = RegistryServer(registry_settings).start()
    http = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    env = Platform(session_broker, registry, registry_settings, engine_settings, http)
    wait(env.tracker_connected, "tracker connected")
    wait(shadow_of(env).connected.is_set, "shadow connected")
    try:
        yield env
    finally:
        env.stop_engine()
        http.close()
        env.registry.stop()


def shadow_of(env: Platform) -> Any:
    app = env.registry.server.config.loaded_app
    while not hasattr(app, "state") and hasattr(app, "app"):
        app = app.app
    return getattr(app.state, "shadow", None)


def device(env: Platform, device_type: str = "thermostat", **kw: Any) -> ShadowDevice:
    device_id = f"sh-{secrets.token_hex(4)}"
    return ShadowDevice(env.broker, device_type, device_id, env.provision(device_id, device_type), **kw)


def state(env: Platform, device_id: str) -> dict[str, Any]:
    resp = env.http.get(f"/api/v1/devices/{device_id}/state")
    assert resp.status_code == 200, resp.text
    assert resp.headers["etag"] == f'"{resp.json()["versions"]["desired"]}"'
    body: dict[str, Any] = resp.json()
    return body


def patch(env: Platform, device_id: str, body: Any, if_match: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/merge-patch+json"}
    if if_match is not None:
        headers["If-Match"] = if_match
    return env.http.patch(
        f"/api/v1/devices/{device_id}/state/desired", content=orjson.dumps(body), headers=headers
    )


def test_patch_reaches_the_device_which_reports_and_the_delta_empties(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env).connect()
    try:
        assert state(env, dev.device_id)["versions"] == {"desired": 0, "reported": 0}
        own = env.http.get(f"/api/v1/devices/{dev.device_id}").json()["topics"]
        assert own["state_delta"] == dev.topic(Channel.STATE_DELTA)
        assert own["state_reported"] == dev.topic(Channel.STATE_REPORTED)
        resp = patch(env, dev.device_id, {"mode": "eco", "setpoint_c": 19.5}, if_match='"0"')
        assert resp.status_code == 200, resp.text
        assert resp.headers["etag"] == '"1"'
        assert resp.json()["delta"] == {"mode": "eco", "setpoint_c": 19.5}
        wait(lambda: state(env, dev.device_id)["delta"] == {}, "delta empty after the device reported")
        body = state(env, dev.device_id)
        assert body["reported"] == {"mode": "eco", "setpoint_c": 19.5}
        assert body["versions"] == {"desired": 1, "reported": 1}
        assert body["desired_source"].startswith("operator:")
        first = orjson.loads(dev.deltas[0])
        assert first["version"] == 1 and first["state"] == {"mode": "eco", "setpoint_c": 19.5}
        # The empty delta clears the retained message: the device sees it as an empty payload.
        wait(lambda: dev.deltas[-1] == b"", "retained delta cleared")
        wait(lambda: state(env, dev.device_id)["delivered"], "outbox flag cleared")
        # null removes a field from desired; a field already reported makes no delta.
        resp = patch(env, dev.device_id, {"setpoint_c": None, "mode": "eco"})
        assert resp.status_code == 200 and resp.json()["desired"] == {"mode": "eco"}
        assert resp.json()["delta"] == {} and resp.json()["versions"]["desired"] == 2
        # A no-op patch bumps nothing.
        assert patch(env, dev.device_id, {"mode": "eco"}).json()["versions"]["desired"] == 2
    finally:
        dev.disconnect()


def test_offline_device_converges_on_reconnect(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env, "smart_plug")
    resp = patch(env, dev.device_id, {"relay_on": False})
    assert resp.status_code == 200, resp.text
    wait(lambda: state(env, dev.device_id)["delivered"], "retained delta acknowledged by the broker")
    dev.connect()  # never connected before: the retained delta is its only way to know
    try:
        wait(lambda: state(env, dev.device_id)["delta"] == {}, "offline device converged on connect")
        assert dev.state == {"relay_on": False}
        assert state(env, dev.device_id)["reported"] == {"relay_on": False}
    finally:
        dev.disconnect()
    # Converged: a later subscriber gets no retained delta any more.
    wait(lambda: state(env, dev.device_id)["delivered"], "empty delta acknowledged")
    dev.deltas.clear()
    dev.connect()
    try:
        dev.report({"relay_on": False})  # a round trip: anything retained would have arrived before
        assert dev.deltas == []
    finally:
        dev.disconnect()


def test_if_match_invalid_patches_and_roles(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env, "air_quality")
    assert patch(env, dev.device_id, {"ventilation_pct": 40.0}).status_code == 200
    stale = patch(env, dev.device_id, {"ventilation_pct": 50.0}, if_match='"0"')
    assert stale.status_code == 412, stale.text
    assert stale.headers["content-type"].startswith("application/problem+json")
    assert stale.headers["etag"] == '"1"' and stale.json()["current_version"] == 1
    assert patch(env, dev.device_id, {"ventilation_pct": 50.0}, if_match="bogus").status_code == 400
    assert patch(env, dev.device_id, {"ventilation_pct": 50.0}, if_match='W/"1"').status_code == 200
    for bad in ({"ventilation_pct": 150}, {"ventilation_pct": "50"}, {"speed": 1}, ["x"]):
        resp = patch(env, dev.device_id, bad)
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
    assert state(env, dev.device_id)["desired"] == {"ventilation_pct": 50.0}
    assert patch(env, "no-such-device", {"ventilation_pct": 1.0}).status_code == 404
    viewer = env.http.post("/api/v1/api-keys", json={"name": f"v-{secrets.token_hex(3)}", "role": "viewer"})
    assert viewer.status_code == 201, viewer.text
    key = viewer.json()["key"]
    as_viewer = {"Authorization": f"Bearer {key}"}
    assert env.http.get(f"/api/v1/devices/{dev.device_id}/state", headers=as_viewer).status_code == 200
    resp = env.http.patch(
        f"/api/v1/devices/{dev.device_id}/state/desired", json={"ventilation_pct": 1.0}, headers=as_viewer
    )
    assert resp.status_code == 403


def test_invalid_reports_are_refused_and_told_to_the_device(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env, obey=False).connect()
    try:
        assert dev.report({"mode": "heat"}) == 0
        wait(lambda: state(env, dev.device_id)["reported"] == {"mode": "heat"}, "valid report stored")
        for bad in (
            b'{"mode": "turbo"}',
            b'{"fan": 1}',
            b"[1, 2]",
            b'{"mode": "cool", "mode": "heat"}',
            b"\xff",
        ):
            dev.publish(dev.topic(Channel.STATE_REPORTED), bad)
        wait(lambda: len(dev.errors) >= 5, "five errors on the device's errors topic")
        reasons = [e["reason"] for e in dev.errors]
        assert reasons == ["invalid_value", "unknown_field", "wrong_shape", "duplicate_key", "invalid_utf8"]
        assert all(e["channel"] == "state/reported" for e in dev.errors)
        # Oversized (the ingest's limit, shared): refused as well.
        limit = env.registry_settings.ingest.max_payload_bytes
        dev.publish(dev.topic(Channel.STATE_REPORTED), b'{"mode": "' + b"x" * limit + b'"}')
        wait(lambda: len(dev.errors) >= 6, "oversized report refused")
        assert dev.errors[-1]["reason"] == "payload_too_large"
        assert state(env, dev.device_id)["reported"] == {"mode": "heat"}
    finally:
        dev.disconnect()


def test_a_device_cannot_touch_another_devices_state(shadow_platform: Platform) -> None:
    env = shadow_platform
    a, b = device(env).connect(), device(env)
    try:
        assert a.publish(a.topic(Channel.STATE_REPORTED, b.device_id), b'{"mode": "off"}') == 135
        assert a.subscribe(a.topic(Channel.STATE_DELTA, b.device_id)) == [135]
        assert a.subscribe(f"devices/thermostat/{a.device_id}/state/#") == [135]
        assert a.publish(a.topic(Channel.STATE_REPORTED), b'{"mode": "off"}') == 0
        wait(lambda: state(env, a.device_id)["reported"] == {"mode": "off"}, "own report stored")
        assert state(env, b.device_id)["reported"] == {}
    finally:
        a.disconnect()


def test_registry_restart_keeps_state_and_reports_sent_meanwhile(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env, "gps_tracker", obey=False).connect()
    try:
        assert patch(env, dev.device_id, {"report_interval_s": 30}).status_code == 200
        wait(lambda: state(env, dev.device_id)["delivered"], "delta delivered")
        env.registry.stop()
        assert dev.report({"report_interval_s": 30}) == 0  # queued in the registry's persistent session
        env.registry = RegistryServer(env.registry_settings).start()
        wait(lambda: shadow_of(env) is not None and shadow_of(env).connected.is_set(), "shadow reconnected")
        wait(
            lambda: state(env, dev.device_id)["delta"] == {},
            "report sent while the registry was down applied",
        )
        body = state(env, dev.device_id)
        assert body["desired"] == {"report_interval_s": 30} and body["versions"] == {
            "desired": 1,
            "reported": 1,
        }
    finally:
        dev.disconnect()


def test_a_rule_sets_desired_state_also_across_a_registry_restart(shadow_platform: Platform) -> None:
    env = shadow_platform
    dev = device(env).connect()
    try:
        name = f"eco-when-hot-{secrets.token_hex(3)}"
        bad = {
            "name": name,
            "scope": {"device_type": "thermostat", "device_ids": [dev.device_id]},
            "when": {"field": "temperature_c", "op": ">", "value": 30},
            "then": [{"set_desired": {"mode": "turbo"}}],
        }
        resp = env.http.post("/api/v1/rules", json=bad)
        assert resp.status_code == 422 and "set_desired" in resp.text, resp.text
        rule = env.create_rule({**bad, "then": [{"set_desired": {"mode": "eco", "setpoint_c": 18.0}}]})
        if env.engine is None:
            env.start_engine()
        env.wait_rule_loaded(rule["id"])
        # The registry is down when the rule fires: the request waits in its persistent session.
        env.registry.stop()
        reading = {"temperature_c": 35.0, "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "auto"}
        assert dev.publish(dev.topic(Channel.TELEMETRY), orjson.dumps(reading)) == 0
        assert env.engine is not None
        wait(
            lambda: (
                env.engine is not None and env.engine.metrics.commands.labels("set_desired")._value.get() >= 1
            ),
            "engine asked for the desired state",
        )
        env.registry = RegistryServer(env.registry_settings).start()
        wait(
            lambda: state(env, dev.device_id)["desired"] == {"mode": "eco", "setpoint_c": 18.0},
            "rule applied",
        )
        wait(lambda: state(env, dev.device_id)["delta"] == {}, "device converged to the rule's state")
        body = state(env, dev.device_id)
        assert body["desired_source"] == f"rule:{name}"
        assert body["versions"]["desired"] == 1  # applied once
    finally:
        dev.disconnect()


def test_simulated_devices_converge_on_a_batch_change(shadow_platform: Platform) -> None:
    """set_desired_many (the service function jobs call) on a small simulated fleet: every device
    reports the new state, and its behaviour follows it."""
    env = shadow_platform
    ids = [f"sim-{secrets.token_hex(4)}" for _ in range(12)]
    creds = [
        DeviceCredentials(id=i, type="thermostat", username=i, password=env.provision(i), client_id=i)
        for i in ids
    ]
    holder: dict[str, Fleet] = {}
    stop = threading.Event()

    async def run() -> None:
        fleet = holder["fleet"] = Fleet(
            creds, FleetConfig(port=env.broker.port, interval_s=1.0, publish_on_start=True)
        )

        def tick() -> None:
            if stop.is_set():
                fleet.request_stop()

        await fleet.run(60.0, on_tick=tick, tick_s=0.1)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    try:
        wait(
            lambda: all(state(env, i)["versions"]["reported"] >= 1 for i in ids),
            "every device reported at connect",
        )
        shadow = shadow_of(env)
        future = asyncio.run_coroutine_threadsafe(
            shadow.set_desired_many(
                [*ids, "no-such-device"], {"mode": "eco", "setpoint_c": 17.5}, source="job:t"
            ),
            shadow._loop,
        )
        result = future.result(10)
        assert sorted(result.changed) == sorted(ids) and result.missing == ["no-such-device"]
        wait(
            lambda: all(state(env, i)["delta"] == {} for i in ids),
            "every simulated device converged",
            timeout=15,
        )
        assert all(state(env, i)["reported"] == {"mode": "eco", "setpoint_c": 17.5} for i in ids)
        fleet = holder["fleet"]
        assert all(d.model.state() == {"mode": "eco", "setpoint_c": 17.5} for d in fleet.devices)
        assert fleet.stats.deltas_received >= len(ids) and fleet.stats.deltas_invalid == 0
        # Refused for a type whose model does not fit: nothing changes.
        refused = asyncio.run_coroutine_threadsafe(
            shadow.set_desired_many(ids[:2], {"relay_on": True}, source="job:t"), shadow._loop
        ).result(10)
        assert set(refused.refused) == set(ids[:2]) and not refused.changed
    finally:
        stop.set()
        thread.join(30)
