"""The rules engine against the real broker: bursts, absence, command properties, restarts.

The engine runs in the test process with rules from a file (the registry is
exercised in test_rules_registry.py); devices are real MQTT 5 sessions with
their own broker accounts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import topics
from iotfleet.presence_event import PresenceEvent
from iotfleet.topics import Channel
from rules_engine.wire import now_ms
from tests.devices import provision
from tests.harness import Broker
from tests.rules_support import Listener, SimThermostat, engine_settings, start_engine, wait, write_rules

pytestmark = pytest.mark.integration

OVERHEAT: dict[str, Any] = {
    "name": "overheat",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [
        {"command": "set_mode", "args": {"mode": "cool"}, "ttl": "30s"},
        {"alert": {"severity": "major", "message": "overheating"}},
    ],
    "on_clear": [{"command": "set_mode", "args": {"mode": "auto"}}],
    "cooldown": "60s",
}


@pytest.fixture
def thermostat(broker: Broker, uid: Callable[[str], str]) -> Any:
    device_id = uid("th")
    passwords = provision(broker, [("thermostat", device_id)])
    device = SimThermostat(broker, device_id, passwords[device_id]).connect()
    yield device
    device.disconnect()


@pytest.fixture
def listener(broker: Broker) -> Any:
    events = Listener(broker, topics.ALERT_EVENTS, topics.COMMAND_EVENTS)
    yield events
    events.close()


def test_burst_of_100_readings_in_10ms_raises_one_alert_and_one_command(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    settings = engine_settings(broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [OVERHEAT]))
    engine = start_engine(settings)
    try:
        base = now_ms()
        topic = thermostat.topic(Channel.TELEMETRY)
        # 100 readings over the threshold, device timestamps spread over 10 ms, published back to back.
        infos = [
            thermostat.client.publish(topic, thermostat.reading(31.0 + i % 5, ts=base + i // 10), qos=1)
            for i in range(100)
        ]
        for info in infos:
            info.wait_for_publish(5)
        wait(lambda: len(thermostat.commands) >= 1, "the cooling command at the device")
        # Clear it: on_clear sends a second command and a cleared event. Per-session ordering
        # means anything the burst caused reached the device/listener before these markers.
        thermostat.publish(20.0, ts=base + 1000)
        wait(lambda: len(thermostat.commands) >= 2, "the on_clear command")
        wait(lambda: listener.events(topics.ALERT_EVENTS, "cleared"), "the cleared event")
        assert [c.payload["args"]["mode"] for c in thermostat.commands] == ["cool", "auto"]
        assert len(listener.events(topics.ALERT_EVENTS, "raised")) == 1
        assert len(listener.events(topics.COMMAND_EVENTS, "created")) == 2
        assert engine.metrics.readings._value.get() == 101
    finally:
        engine.stop()


def test_command_carries_correlation_response_topic_and_expiry(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    settings = engine_settings(broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [OVERHEAT]))
    engine = start_engine(settings)
    try:
        thermostat.publish(35.0)
        wait(lambda: thermostat.commands, "command")
        command = thermostat.commands[0]
        assert set(command.payload) == {"id", "name", "args", "ts"}
        assert command.payload["name"] == "set_mode" and command.payload["args"] == {"mode": "cool"}
        assert command.correlation == command.payload["id"].encode()
        assert command.response_topic == thermostat.topic(Channel.ACKS)
        assert command.expiry is not None and 0 < command.expiry <= 30
        wait(lambda: listener.events(topics.COMMAND_EVENTS, "sent"), "sent event")
        created = listener.events(topics.COMMAND_EVENTS, "created")[0]
        assert created["id"] == command.payload["id"]
        assert created["source"] == "rule:overheat" and created["ttl_s"] == 30
        assert listener.events(topics.COMMAND_EVENTS, "sent")[0]["id"] == command.payload["id"]
    finally:
        engine.stop()


def test_absence_fires_once_and_clears_on_the_next_reading(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    quiet = {
        "name": "quiet",
        "scope": {"device_type": "thermostat"},
        "when": {"absent_for": "1s"},
        "then": [{"alert": {"severity": "warning", "message": "no data"}}],
    }
    settings = engine_settings(
        broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [quiet]), tick_s=0.1
    )
    engine = start_engine(settings)
    try:
        thermostat.publish(21.0)
        wait(lambda: listener.events(topics.ALERT_EVENTS, "raised"), "absence alert", timeout=5)
        raised = listener.events(topics.ALERT_EVENTS, "raised")[0]
        assert raised["device_id"] == thermostat.device_id and raised["severity"] == "warning"
        # Later ticks (an hour of silence, without waiting an hour) do not fire again.
        for minutes in (1, 10, 60):
            engine.call(engine.tick, now_ms() + minutes * 60_000)
        thermostat.publish(21.0)
        wait(lambda: listener.events(topics.ALERT_EVENTS, "cleared"), "cleared on the next reading")
        assert len(listener.events(topics.ALERT_EVENTS, "raised")) == 1
    finally:
        engine.stop()


def test_engine_restart_keeps_firing_state_and_catches_up_on_queued_readings(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    settings = engine_settings(broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [OVERHEAT]))
    engine = start_engine(settings)
    thermostat.publish(35.0)
    wait(lambda: listener.events(topics.ALERT_EVENTS, "raised"), "raised")
    wait(lambda: thermostat.commands, "command")
    engine.stop()
    # While the engine is down: still hot (must not re-fire after the restart), then cooled
    # below the clear threshold (the persistent session keeps these for the engine).
    thermostat.publish(36.0)
    thermostat.publish(25.0)
    engine = start_engine(settings)
    try:
        wait(lambda: listener.events(topics.ALERT_EVENTS, "cleared"), "cleared after the restart")
        wait(lambda: len(thermostat.commands) >= 2, "on_clear command")
        assert len(listener.events(topics.ALERT_EVENTS, "raised")) == 1
        assert [c.payload["args"]["mode"] for c in thermostat.commands] == ["cool", "auto"]
    finally:
        engine.stop()


def test_presence_rule_follows_the_registry_presence_not_the_device_status(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    """Presence conditions read the registry's retained ``iotfleet/presence/{type}/{id}``; the
    device's own retained ``status`` changes nothing."""
    offline = {
        "name": "offline",
        "scope": {"device_type": "thermostat", "device_ids": [thermostat.device_id]},
        "when": {"presence": "offline"},
        "then": [{"alert": {"severity": "minor", "message": "device offline"}}],
    }
    registry = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"reg-{thermostat.device_id}", protocol=mqtt.MQTTv5
    )
    registry.username_pw_set("iotfleet-registry", broker.passwords["iotfleet-registry"])
    registry.connect(broker.host, broker.port)
    registry.loop_start()
    topic = topics.presence_topic("thermostat", thermostat.device_id)

    def registry_says(online: bool, cause: str) -> None:
        event = PresenceEvent(online=online, cause=cause, at_ms=now_ms())
        registry.publish(topic, event.payload(), qos=1, retain=True).wait_for_publish(5)

    # Retained by the registry before the engine subscribed: replayed on subscribe, and it fires.
    registry_says(False, "disconnected")
    settings = engine_settings(broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [offline]))
    engine = start_engine(settings)
    try:
        wait(lambda: listener.events(topics.ALERT_EVENTS, "raised"), "offline alert")
        registry_says(True, "connected")
        wait(lambda: listener.events(topics.ALERT_EVENTS, "cleared"), "online clears it")
        # The device's own retained status is only its hint: a stale "offline" fires nothing.
        thermostat.client.publish(
            thermostat.topic(Channel.STATUS), topics.STATUS_OFFLINE, qos=1, retain=True
        ).wait_for_publish(5)
        # Barrier: a presence event published after it; once the engine applied that, it has
        # seen everything published before.
        barrier = f"{thermostat.device_id}-barrier"
        event = PresenceEvent(online=True, cause="connected", at_ms=now_ms())
        registry.publish(
            topics.presence_topic("thermostat", barrier), event.payload(), qos=1
        ).wait_for_publish(5)
        wait(lambda: ("thermostat", barrier) in engine.evaluator.devices, "barrier applied")
        assert len(listener.events(topics.ALERT_EVENTS, "raised")) == 1
        registry_says(False, "timeout")
        wait(lambda: len(listener.events(topics.ALERT_EVENTS, "raised")) == 2, "offline again (registry)")
    finally:
        engine.stop()
        registry.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        registry.disconnect()
        registry.loop_stop()


def test_schedule_rule_is_scheduled_in_its_time_zone_and_sends_to_named_devices(
    broker: Broker, tmp_path: Path, thermostat: SimThermostat, listener: Listener
) -> None:
    morning = {
        "name": "morning-heat",
        "scope": {"device_type": "thermostat"},
        "schedule": {"cron": "0 7 * * *", "tz": "Europe/Paris"},
        "then": [
            {"command": "set_mode", "args": {"mode": "heat"}, "target": {"devices": [thermostat.device_id]}}
        ],
    }
    settings = engine_settings(broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [morning]))
    engine = start_engine(settings)
    try:
        job = engine.scheduler.get_job("schedule:morning-heat")
        assert job is not None
        local = job.next_run_time.astimezone(ZoneInfo("Europe/Paris"))
        assert (local.hour, local.minute) == (7, 0)
        engine.call(engine.run_schedule, "morning-heat")  # what APScheduler calls at 07:00 Paris time
        wait(lambda: thermostat.commands, "scheduled command")
        assert thermostat.commands[0].payload["args"] == {"mode": "heat"}
        wait(lambda: listener.events(topics.COMMAND_EVENTS, "created"), "created event")
        assert listener.events(topics.COMMAND_EVENTS, "created")[0]["source"] == "rule:morning-heat"
    finally:
        engine.stop()


def test_engine_sessions_come_back_after_a_broker_restart(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    device_id = uid("th")
    passwords = provision(fresh_broker, [("thermostat", device_id)])
    device = SimThermostat(fresh_broker, device_id, passwords[device_id]).connect()
    settings = engine_settings(
        fresh_broker, tmp_path, rules_file=write_rules(tmp_path / "rules.json", [OVERHEAT])
    )
    engine = start_engine(settings)
    try:
        device.publish(35.0)
        wait(lambda: device.commands, "the cooling command before the restart")
        fresh_broker.restart()  # both engine sessions drop; the broker keeps their sessions on disk
        wait(lambda: engine.health()["status"] == "ok", "the engine reconnected", timeout=20)
        wait(device.client.is_connected, "the device reconnected", timeout=20)
        device.publish(20.0)  # below the clear threshold: the on_clear command goes out
        wait(
            lambda: any(c.payload["args"]["mode"] == "auto" for c in device.commands),
            "the on_clear command after the restart",
            timeout=20,
        )
        # QoS 1 is at least once: a command in flight when the broker stopped may come twice
        # (the same id: devices dedupe by it), never a new command for the same firing.
        by_id = {c.payload["id"]: c.payload["args"]["mode"] for c in device.commands}
        assert sorted(by_id.values()) == ["auto", "cool"]
    finally:
        engine.stop()
        device.disconnect()
