"""Rules, commands and alerts through the registry API, with the engine and devices on the real broker.

The registry is served over real HTTP (uvicorn in a thread, SQLite), the rules
engine runs in-process fetching its rules from that API, devices are MQTT 5
sessions with credentials the registry provisioned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import topics
from iotfleet.settings import MqttSettings, RegistrySettings, RulesSettings, Settings
from iotfleet.stack import probes
from iotfleet.topics import Channel
from rules_engine.engine import RulesEngine
from rules_engine.sources import RegistrySource
from tests.harness import Broker
from tests.registry_harness import ADMIN_KEY
from tests.rules_support import Listener, RegistryServer, SimThermostat, start_engine, wait

pytestmark = pytest.mark.integration

SESSION_EXPIRY_S = 120  # long enough for the restarts below, short enough not to pile up on the shared broker


@dataclass
class Platform:
    broker: Broker
    registry: RegistryServer
    registry_settings: Settings
    engine_settings: Settings
    http: httpx.Client
    engine: RulesEngine | None = None

    def start_engine(self, require_source: bool = True) -> RulesEngine:
        source = RegistrySource.from_settings(self.engine_settings)
        self.engine = start_engine(self.engine_settings, source, require_source=require_source)
        return self.engine

    def stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None

    def restart_registry(self) -> None:
        self.registry.stop()
        self.registry = RegistryServer(self.registry_settings).start()
        wait(self.tracker_connected, "tracker connected after restart")

    def tracker_connected(self) -> bool:
        tracker = self.registry.tracker()
        return tracker is not None and tracker.connected.is_set()

    def provision(self, device_id: str, device_type: str = "thermostat", **tags: str) -> str:
        resp = self.http.post("/api/v1/devices", json={"id": device_id, "type": device_type, "tags": tags})
        assert resp.status_code == 201, resp.text
        password: str = resp.json()["credentials"]["password"]
        return password

    def thermostat(self, device_id: str, **kw: Any) -> SimThermostat:
        return SimThermostat(self.broker, device_id, self.provision(device_id), **kw)

    def create_rule(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post("/api/v1/rules", json=body)
        assert resp.status_code == 201, resp.text
        rule: dict[str, Any] = resp.json()
        return rule

    def wait_rule_loaded(self, rule_id: str, version: int = 1) -> None:
        def loaded() -> bool:
            assert self.engine is not None
            program = self.engine.evaluator.programs.get(rule_id)
            return (program is not None and program.rule.version == version) or any(
                r.id == rule_id and r.version == version for r in self.engine.schedules.values()
            )

        wait(loaded, f"rule {rule_id} v{version} loaded by the engine", timeout=5)

    def commands(self, device_id: str) -> list[dict[str, Any]]:
        resp = self.http.get(f"/api/v1/devices/{device_id}/commands")
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["items"]
        return items

    def alerts(self, **params: str) -> list[dict[str, Any]]:
        resp = self.http.get("/api/v1/alerts", params=params)
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["items"]
        return items


def platform_settings(
    broker: Broker, tmp_path: Path, influx: Any = None, uid: Callable[[str], str] | None = None
) -> tuple[Settings, Settings]:
    suffix = uid("x") if uid else "x"
    port = probes.free_port()
    registry_mqtt = MqttSettings(
        **{**broker.settings_for("iotfleet-registry").model_dump(), "session_expiry_s": SESSION_EXPIRY_S}
    )
    rules_mqtt = MqttSettings(
        **{**broker.settings_for("iotfleet-rules").model_dump(), "session_expiry_s": SESSION_EXPIRY_S}
    )
    common: dict[str, Any] = {"state_dir": tmp_path / "state"}
    if influx is not None:
        common["influx"] = influx
    registry = Settings(
        **common,
        mqtt=registry_mqtt,
        registry=RegistrySettings(port=port, bootstrap_admin_key=ADMIN_KEY),
        broker_agent=broker.agent_settings(),
        rules=RulesSettings(client_id=f"reg-{suffix}", tracker_sweep_s=0.2),
    )
    engine = Settings(
        **common,
        mqtt=rules_mqtt,
        registry=RegistrySettings(port=port),
        rules=RulesSettings(client_id=f"rules-{suffix}", api_key=ADMIN_KEY, tick_s=0.2),
    )
    return registry, engine


@pytest.fixture
def platform(broker: Broker, tmp_path: Path, uid: Callable[[str], str]) -> Iterator[Platform]:
    registry_settings, engine_settings = platform_settings(broker, tmp_path, uid=uid)
    registry = RegistryServer(registry_settings).start()
    http = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    env = Platform(broker, registry, registry_settings, engine_settings, http)
    wait(env.tracker_connected, "tracker connected")
    try:
        yield env
    finally:
        env.stop_engine()
        http.close()
        env.registry.stop()


def overheat_rule(
    device_id: str, name: str = "thermostat-overheat", for_: str | None = "2s"
) -> dict[str, Any]:
    when: dict[str, Any] = {"field": "temperature_c", "op": ">", "value": 30}
    if for_ is not None:
        when["for"] = for_
    return {
        "name": name,
        "scope": {"device_type": "thermostat", "device_ids": [device_id]},
        "when": when,
        "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
        "then": [
            {"command": "set_mode", "args": {"mode": "cool"}},
            {"alert": {"severity": "major", "message": "overheating"}},
        ],
        "cooldown": "60s",
    }


# --- API -------------------------------------------------------------------------------------------


def test_rules_crud_validation_and_problems(platform: Platform) -> None:
    http = platform.http
    example = {
        "name": "thermostat-overheat",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "temperature_c", "op": ">", "value": 30, "for": "10s"},
        "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
        "then": [
            {"command": "set_mode", "args": {"mode": "cool"}},
            {"alert": {"severity": "major", "message": "overheating"}},
        ],
        "cooldown": "60s",
    }
    created = platform.create_rule(example)
    for key, value in example.items():
        assert created[key] == value  # the public shape comes back as it went in
    assert created["version"] == 1 and created["enabled"] is True
    rule_id = created["id"]

    assert http.get(f"/api/v1/rules/{rule_id}").json()["name"] == "thermostat-overheat"
    assert [r["id"] for r in http.get("/api/v1/rules").json()["items"]] == [rule_id]

    dup = http.post("/api/v1/rules", json=example)
    assert dup.status_code == 409 and dup.headers["content-type"].startswith("application/problem+json")

    bad = http.post("/api/v1/rules", json={**example, "when": {"field": "temp", "op": ">", "value": 1}})
    assert bad.status_code == 422
    problem = bad.json()
    assert problem["status"] == 422 and "has no field 'temp'" in problem["detail"]
    bad_args = http.post(
        "/api/v1/rules", json={**example, "then": [{"command": "set_mode", "args": {"mode": "x"}}]}
    )
    assert bad_args.status_code == 422 and "set_mode" in bad_args.json()["detail"]
    assert (
        http.post(
            "/api/v1/rules", content=b"not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )

    # A served rule can be PUT back as is (server fields are ignored); the version increases.
    served = http.get(f"/api/v1/rules/{rule_id}").json()
    served["when"]["value"] = 31
    replaced = http.put(f"/api/v1/rules/{rule_id}", json=served)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2 and replaced.json()["when"]["value"] == 31

    disabled = http.post(f"/api/v1/rules/{rule_id}/disable").json()
    assert disabled["enabled"] is False and disabled["version"] == 3
    assert http.get("/api/v1/rules", params={"enabled": "true"}).json()["items"] == []
    assert http.post(f"/api/v1/rules/{rule_id}/enable").json()["enabled"] is True

    assert http.get("/api/v1/rules/nope").status_code == 404
    assert http.get("/api/v1/rules", params={"cursor": "%%%"}).status_code == 422
    assert http.delete(f"/api/v1/rules/{rule_id}").status_code == 204
    assert http.get(f"/api/v1/rules/{rule_id}").status_code == 404
    assert httpx.get(f"{platform.registry.url}/api/v1/rules").status_code == 401


def test_hot_reload_within_one_second(platform: Platform, uid: Callable[[str], str]) -> None:
    engine = platform.start_engine()
    device_id = uid("th")
    started = time.monotonic()
    rule = platform.create_rule(overheat_rule(device_id))
    platform.wait_rule_loaded(rule["id"])
    loaded_after = time.monotonic() - started
    assert loaded_after < 1.0, f"rule loaded after {loaded_after:.2f} s"

    started = time.monotonic()
    assert platform.http.post(f"/api/v1/rules/{rule['id']}/disable").status_code == 200
    wait(lambda: rule["id"] not in engine.evaluator.programs, "disabled rule unloaded", timeout=5)
    assert time.monotonic() - started < 1.0


def test_operator_commands_validation_and_idempotency(platform: Platform, uid: Callable[[str], str]) -> None:
    http = platform.http
    device = platform.thermostat(uid("th")).connect()
    try:
        path = f"/api/v1/devices/{device.device_id}/commands"
        first = http.post(
            path, json={"name": "set_setpoint", "args": {"setpoint_c": 22}}, headers={"Idempotency-Key": "k1"}
        )
        assert first.status_code == 202, first.text
        again = http.post(
            path, json={"name": "set_setpoint", "args": {"setpoint_c": 22}}, headers={"Idempotency-Key": "k1"}
        )
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = http.post(
            path, json={"name": "set_setpoint", "args": {"setpoint_c": 23}}, headers={"Idempotency-Key": "k1"}
        )
        assert other.status_code == 409

        wait(lambda: len(device.commands) == 1, "one command delivered despite the retry")
        command_id = first.json()["id"]
        wait(lambda: http.get(f"/api/v1/commands/{command_id}").json()["status"] == "succeeded", "succeeded")
        final = http.get(f"/api/v1/commands/{command_id}").json()
        assert final["sent_at"] and final["delivered_at"] and final["completed_at"]
        assert final["source"].startswith("operator:")

        bad = http.post(path, json={"name": "set_setpoint", "args": {"setpoint_c": 99}})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "body.args.setpoint_c"
        unknown = http.post(path, json={"name": "launch", "args": {}})
        assert unknown.status_code == 422 and "set_mode" in unknown.json()["detail"]
        assert http.post(path, json={"name": "reboot", "ttl_s": 0}).status_code == 422
        assert http.post("/api/v1/devices/nope/commands", json={"name": "reboot"}).status_code == 404
        assert http.get("/api/v1/commands/nope").status_code == 404
        assert [c["id"] for c in platform.commands(device.device_id)] == [command_id]
    finally:
        device.disconnect()


# --- acceptance -------------------------------------------------------------------------------------


def test_closed_loop_overheat_cool_ack_succeeded_then_hysteresis_clears(
    platform: Platform, uid: Callable[[str], str]
) -> None:
    """Overheat → fires after `for` → cooling command at the device → ack → succeeded → cools → clears."""
    platform.start_engine()
    device = platform.thermostat(uid("th"), temperature=28.0).connect()
    try:
        rule = platform.create_rule(overheat_rule(device.device_id, for_="2s"))
        platform.wait_rule_loaded(rule["id"])
        first_hot: float | None = None
        deadline = time.monotonic() + 30
        # Readings every 250 ms; the toy room heats 1 °C per reading until told to cool.
        while not device.commands and time.monotonic() < deadline:
            device.step()
            if device.temperature > 30 and first_hot is None:
                first_hot = time.monotonic()
            time.sleep(0.25)  # the device's reporting interval, not a wait for a result
        assert device.commands, "no command reached the device"
        assert first_hot is not None and time.monotonic() - first_hot >= 2.0, "fired before its `for`"
        command = device.commands[0].payload
        assert command["name"] == "set_mode" and command["args"] == {"mode": "cool"}

        wait(
            lambda: (
                platform.commands(device.device_id)
                and platform.commands(device.device_id)[0]["status"] == "succeeded"
            ),
            "command succeeded in the registry",
        )
        [recorded] = platform.commands(device.device_id)
        assert recorded["id"] == command["id"] and recorded["rule_id"] == rule["id"]
        wait(lambda: platform.alerts(device_id=device.device_id, status="active"), "alert active")

        # Cooling: down 1.5 °C per reading; the alert stays until below 26 (hysteresis), then clears.
        while device.temperature >= 26 and time.monotonic() < deadline:
            device.step()
            assert (
                platform.alerts(device_id=device.device_id, status="cleared") == [] or device.temperature < 26
            )
            time.sleep(0.05)
        device.step()
        wait(lambda: platform.alerts(device_id=device.device_id, status="cleared"), "alert cleared")
        [alert] = platform.alerts(device_id=device.device_id)
        assert alert["rule_name"] == "thermostat-overheat" and alert["severity"] == "major"
        assert alert["cleared_at"] is not None
        assert len(device.commands) == 1
    finally:
        device.disconnect()


def test_offline_device_gets_command_on_reconnect_and_expired_one_never(
    platform: Platform, uid: Callable[[str], str]
) -> None:
    http = platform.http
    device = platform.thermostat(uid("th")).connect()  # persistent session, subscribed
    device.disconnect()
    path = f"/api/v1/devices/{device.device_id}/commands"
    short = http.post(path, json={"name": "set_mode", "args": {"mode": "off"}, "ttl_s": 1}).json()
    long = http.post(path, json={"name": "set_mode", "args": {"mode": "heat"}, "ttl_s": 120}).json()
    wait(
        lambda: http.get(f"/api/v1/commands/{short['id']}").json()["status"] == "expired",
        "short TTL expired",
        timeout=10,
    )
    assert http.get(f"/api/v1/commands/{long['id']}").json()["status"] == "sent"

    device.connect()
    try:
        wait(
            lambda: http.get(f"/api/v1/commands/{long['id']}").json()["status"] == "succeeded",
            "delivered on reconnect",
        )
        # Queued in order short, long: the long one arrived, so the short one would have arrived before it.
        assert [c.payload["id"] for c in device.commands] == [long["id"]]
        assert http.get(f"/api/v1/commands/{short['id']}").json()["status"] == "expired"
        assert {c["status"] for c in platform.commands(device.device_id)} == {"expired", "succeeded"}
        expired = http.get(path, params={"status": "expired"}).json()["items"]
        assert [c["id"] for c in expired] == [short["id"]]
    finally:
        device.disconnect()


def test_restarting_engine_and_registry_mid_scenario_loses_nothing(
    platform: Platform, uid: Callable[[str], str]
) -> None:
    platform.start_engine()
    device = platform.thermostat(uid("th"), auto_ack=False).connect()
    try:
        rule = platform.create_rule(overheat_rule(device.device_id, for_=None))
        platform.wait_rule_loaded(rule["id"])
        device.publish(35.0)
        wait(lambda: device.commands, "command at the device")
        wait(lambda: platform.alerts(device_id=device.device_id, status="active"), "alert active")
        command_id = device.commands[0].payload["id"]
        wait(lambda: platform.commands(device.device_id)[0]["status"] == "sent", "sent")

        # Registry down: the device answers meanwhile; the engine restarts; still hot.
        platform.registry.stop()
        device.client.publish(
            device.commands[0].response_topic or "", f'{{"id": "{command_id}", "status": "succeeded"}}', qos=1
        ).wait_for_publish(5)
        platform.stop_engine()
        device.publish(36.0)  # queued for the engine's persistent session: must not re-fire
        platform.start_engine(require_source=False)  # registry still down: rules from its state store
        platform.restart_registry()

        wait(
            lambda: platform.commands(device.device_id)[0]["status"] == "succeeded",
            "ack recorded after restart",
        )
        device.publish(37.0)
        # Cool down: the restored engine state clears the alert (hysteresis).
        device.publish(25.0)
        wait(lambda: platform.alerts(device_id=device.device_id, status="cleared"), "cleared after restarts")
        assert len(platform.alerts(device_id=device.device_id)) == 1
        assert len(platform.commands(device.device_id)) == 1
        assert len(device.commands) == 1
    finally:
        device.disconnect()


def test_alert_acknowledge_and_filters(platform: Platform, uid: Callable[[str], str]) -> None:
    platform.start_engine()
    device = platform.thermostat(uid("th")).connect()
    try:
        rule = platform.create_rule(overheat_rule(device.device_id, for_=None))
        platform.wait_rule_loaded(rule["id"])
        device.publish(35.0)
        wait(lambda: platform.alerts(device_id=device.device_id), "alert")
        [alert] = platform.alerts(device_id=device.device_id, open="true", severity="major")
        acked = platform.http.post(f"/api/v1/alerts/{alert['id']}/acknowledge")
        assert acked.status_code == 200 and acked.json()["status"] == "acknowledged"
        assert acked.json()["acknowledged_by"] and acked.json()["acknowledged_at"]
        assert platform.http.post(f"/api/v1/alerts/{alert['id']}/acknowledge").status_code == 200
        device.publish(20.0)
        wait(lambda: platform.alerts(device_id=device.device_id, status="cleared"), "acknowledged → cleared")
        assert platform.http.post(f"/api/v1/alerts/{alert['id']}/acknowledge").status_code == 409
        assert platform.http.post("/api/v1/alerts/nope/acknowledge").status_code == 404
        assert platform.http.get("/api/v1/alerts", params={"severity": "apocalyptic"}).status_code == 422
    finally:
        device.disconnect()


def test_concurrent_raises_leave_one_open_alert(platform: Platform, uid: Callable[[str], str]) -> None:
    """Twenty raise events for one (rule, device), back to back: the registry keeps exactly one open."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from iotfleet import topics
    from rules_engine import wire

    device_id = uid("th")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uid("raiser"), protocol=mqtt.MQTTv5)
    settings = platform.engine_settings.mqtt
    client.username_pw_set(
        settings.username, settings.password.get_secret_value() if settings.password else None
    )
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        infos = [
            client.publish(
                topics.ALERT_EVENTS,
                wire.alert_raised_event(
                    rule_id="r-concurrent",
                    rule_name="concurrent",
                    device_type="thermostat",
                    device_id=device_id,
                    severity="critical",
                    message=f"raise {i}",
                    at=wire.now_ms(),
                    values={},
                ),
                qos=1,
            )
            for i in range(20)
        ]
        for info in infos:
            info.wait_for_publish(5)
        # The tracker records in arrival order: once a later marker alert is in, all twenty were handled.
        marker = wire.alert_raised_event(
            rule_id="r-marker",
            rule_name="marker",
            device_type="thermostat",
            device_id=f"{device_id}-m",
            severity="info",
            message="marker",
            at=wire.now_ms(),
            values={},
        )
        client.publish(topics.ALERT_EVENTS, marker, qos=1).wait_for_publish(5)
        wait(lambda: platform.alerts(device_id=f"{device_id}-m"), "the marker recorded")
        assert len(platform.alerts(device_id=device_id, open="true")) == 1
        assert len(platform.alerts(device_id=device_id)) == 1
    finally:
        client.disconnect()
        client.loop_stop()


def test_co2_sensor_ventilates_its_room_via_tag_target(platform: Platform, uid: Callable[[str], str]) -> None:
    """A CO2 reading in room 101 sends set_ventilation to every air-quality device tagged room=101."""
    platform.start_engine()
    room = uid("room")
    devices = {}
    for name, tag in (("sensor", room), ("vent", room), ("elsewhere", f"{room}-b")):
        device_id = uid(name)
        password = platform.provision(device_id, "air_quality", room=tag)
        devices[name] = SimThermostat(
            platform.broker, device_id, password, device_type="air_quality"
        ).connect()
    try:
        rule = platform.create_rule(
            {
                "name": "co2-ventilate-room",
                "scope": {"device_type": "air_quality", "device_ids": [devices["sensor"].device_id]},
                "when": {"field": "co2_ppm", "op": ">", "value": 1000},
                "then": [
                    {"command": "set_ventilation", "args": {"level_pct": 100}, "target": {"same_tag": "room"}}
                ],
            }
        )
        platform.wait_rule_loaded(rule["id"])
        devices["sensor"].publish_raw(
            {"co2_ppm": 1500, "pm2_5_ugm3": 5.0, "voc_index": 100, "ventilation_pct": 10.0}
        )
        wait(
            lambda: devices["vent"].commands and devices["sensor"].commands,
            "both devices in the room commanded",
        )
        assert devices["vent"].commands[0].payload["args"] == {"level_pct": 100}
        # The device in the other room got nothing: its own command topic is silent after the others'.
        wait(
            lambda: all(platform.commands(d.device_id) for d in (devices["vent"], devices["sensor"])),
            "commands recorded",
        )
        assert devices["elsewhere"].commands == [] and platform.commands(devices["elsewhere"].device_id) == []
    finally:
        for device in devices.values():
            device.disconnect()


def test_presence_rule_uses_the_registry_presence(platform: Platform, uid: Callable[[str], str]) -> None:
    """A device says "online" (retained), then disconnects cleanly without a will: its status stays
    "online" forever, but the registry's presence (the broker's log) says offline, and the engine's
    presence rule fires on that; reconnecting clears it."""
    device_id = uid("pres")
    password = platform.provision(device_id)
    platform.start_engine()
    rule = platform.create_rule(
        {
            "name": f"offline-{device_id}",
            "scope": {"device_type": "thermostat", "device_ids": [device_id]},
            "when": {"presence": "offline"},
            "then": [{"alert": {"severity": "minor", "message": "device offline"}}],
        }
    )
    platform.wait_rule_loaded(rule["id"])
    status = topics.device_topic("thermostat", device_id, Channel.STATUS)
    presence = topics.presence_topic("thermostat", device_id)
    published = Listener(platform.broker, presence)

    def session() -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(device_id, password)
        client.connect(platform.broker.host, platform.broker.port, keepalive=30)
        client.loop_start()
        wait(client.is_connected, "device connected")
        return client

    device = session()
    device.publish(status, topics.STATUS_ONLINE, qos=1, retain=True).wait_for_publish(5)
    wait(lambda: platform.http.get(f"/api/v1/devices/{device_id}").json()["online"], "registry: online")
    device.disconnect()  # clean, no will: the retained status still says "online"
    device.loop_stop()
    wait(
        lambda: platform.alerts(device_id=device_id, status="active"),
        "offline alert from the registry's presence",
    )
    assert platform.http.get(f"/api/v1/devices/{device_id}").json()["online"] is False
    device = session()
    try:
        wait(lambda: platform.alerts(device_id=device_id, status="cleared"), "reconnect clears it")
        # What the registry published: each transition, in order, with its cause.
        said = [(m["online"], m["cause"]) for m in published.events(presence)]
        assert said == [(True, "connected"), (False, "disconnected"), (True, "connected")], said
        assert platform.http.post(f"/api/v1/devices/{device_id}/disable").status_code == 200
        wait(lambda: len(published.events(presence)) == 4, "the operator's kick published")
        assert published.events(presence)[-1]["online"] is False
        assert published.events(presence)[-1]["cause"] == "kicked"
        wait(lambda: platform.alerts(device_id=device_id, status="active"), "disabled: offline alert again")
        # Deleting the device clears its retained presence: a new subscriber gets nothing.
        assert platform.http.delete(f"/api/v1/devices/{device_id}").status_code == 204
        wait(lambda: published.events(presence)[-1] == {"raw": ""}, "the retained presence cleared")
        late = Listener(platform.broker, presence)
        try:
            # Barrier: the broker sends a subscription's retained messages before it answers the
            # next SUBSCRIBE on the same connection.
            second = threading.Event()
            late.client.on_subscribe = lambda *_a: second.set()
            late.client.subscribe(f"{topics.PRESENCE_ROOT}/barrier/{device_id}", qos=1)
            assert second.wait(10)
            assert late.events(presence) == []
        finally:
            late.close()
    finally:
        published.close()
        device.disconnect()
        device.loop_stop()
