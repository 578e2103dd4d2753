"""The ``iotfleet-rules`` process: fails fast on bad configuration, starts degraded without its peers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from iotfleet import topics
from iotfleet.settings import MqttSettings, RegistrySettings, RulesSettings, Settings
from iotfleet.stack import probes
from rules_engine.engine import RulesEngine
from rules_engine.sources import RegistrySource
from rules_engine.store import StateStore
from tests.devices import provision
from tests.harness import Broker
from tests.integration.test_rules_engine import OVERHEAT
from tests.registry_harness import ADMIN_KEY, RegistryProcess
from tests.rules_support import Listener, SimThermostat, start_engine, wait, write_rules

pytestmark = pytest.mark.integration


def run_main(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rules_engine.main"],
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"IOTFLEET_RULES__TICK_S": "often"}, "IOTFLEET_RULES__TICK_S"),
        ({"IOTFLEET_RULES__COMMAND_TTL_S": "0"}, "IOTFLEET_RULES__COMMAND_TTL_S"),
        ({"IOTFLEET_RULES__RULES_FILE": "/nonexistent/rules.json"}, "IOTFLEET_RULES__RULES_FILE"),
        ({}, "IOTFLEET_RULES__API_KEY"),  # no key given and none in the state dir
    ],
)
def test_bad_configuration_fails_fast_naming_the_setting(
    tmp_path: Path, env: dict[str, str], setting: str
) -> None:
    result = run_main({"IOTFLEET_STATE_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    assert setting in result.stderr and "Traceback" not in result.stderr


def test_starts_degraded_without_broker_and_registry_and_says_why(tmp_path: Path) -> None:
    dead_port = probes.free_port()
    settings = Settings(
        state_dir=tmp_path,
        mqtt=MqttSettings(port=probes.free_port()),
        registry=RegistrySettings(port=dead_port),
        rules=RulesSettings(api_key="ifk_whatever"),
    )
    engine = RulesEngine(settings, RegistrySource.from_settings(settings), StateStore(tmp_path / "s.sqlite"))
    engine.start()
    try:
        wait(lambda: engine.last_reload_error is not None, "the registry failure noticed")
        health = engine.health()
        assert health["status"] == "degraded" and not health["mqtt_connected"]
        assert "registry unreachable" in health["last_reload_error"]
    finally:
        engine.stop()


def test_process_serves_health_and_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    health_port = probes.free_port()
    rules_file = tmp_path / "rules.json"
    rules_file.write_text("[]")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rules_engine.main"],
        env={
            **os.environ,
            "IOTFLEET_STATE_DIR": str(tmp_path),
            "IOTFLEET_MQTT__PORT": str(probes.free_port()),  # no broker: degraded, still serving
            "IOTFLEET_RULES__RULES_FILE": str(rules_file),
            "IOTFLEET_HEALTH__PORT": str(health_port),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{health_port}"
        wait(lambda: probes.http_ok(f"{url}/metrics"), "metrics served", timeout=20)
        health = httpx.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "iotfleet_rules_readings_total" in httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    lines = output.splitlines()
    assert any(" starting " in line for line in lines) and any(" ready " in line for line in lines)
    assert any("stopped" in line for line in lines)


def test_kill_9_mid_scenario_neither_refires_nor_forgets(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """kill -9 the engine process while a rule is active: after the restart it neither re-raises nor
    fails to clear (state written on each transition), and readings sent meanwhile are evaluated."""
    device_id = uid("th")
    passwords = provision(broker, [("thermostat", device_id)])
    device = SimThermostat(broker, device_id, passwords[device_id]).connect()
    listener = Listener(broker, topics.ALERT_EVENTS)
    rules = write_rules(
        tmp_path / "rules.json",
        [{**OVERHEAT, "scope": {"device_type": "thermostat", "device_ids": [device_id]}}],
    )
    env = {
        **os.environ,
        "IOTFLEET_STATE_DIR": str(tmp_path / "state"),
        "IOTFLEET_MQTT__HOST": broker.host,
        "IOTFLEET_MQTT__PORT": str(broker.port),
        "IOTFLEET_MQTT__USERNAME": "iotfleet-rules",
        "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-rules"],
        "IOTFLEET_MQTT__SESSION_EXPIRY_S": "120",
        "IOTFLEET_RULES__CLIENT_ID": uid("rules"),
        "IOTFLEET_RULES__RULES_FILE": str(rules),
    }

    def start() -> subprocess.Popen[bytes]:
        health_port = probes.free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rules_engine.main"],
            env={**env, "IOTFLEET_HEALTH__PORT": str(health_port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(lambda: probes.http_ok(f"http://127.0.0.1:{health_port}/healthz"), "engine healthy", timeout=20)
        return proc

    proc = start()
    try:
        device.publish(35.0)
        wait(lambda: listener.events(topics.ALERT_EVENTS, "raised"), "raised")
        wait(lambda: device.commands, "cooling command")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        device.publish(36.0)  # still hot while the engine is dead: must not raise again
        device.publish(25.0)  # then cool: must clear after the restart
        proc = start()
        wait(lambda: listener.events(topics.ALERT_EVENTS, "cleared"), "cleared after kill -9 and restart")
        # one firing: one event id (it may arrive twice, with that id, if the kill fell between
        # its PUBACK and the deletion of its outbox row)
        assert len({e["id"] for e in listener.events(topics.ALERT_EVENTS, "raised")}) == 1
        wait(lambda: len({c.payload["id"] for c in device.commands}) >= 2, "on_clear command")
        # the same holds for commands: a redelivered one carries the id it was first sent with
        by_id = {c.payload["id"]: c.payload["args"]["mode"] for c in device.commands}
        assert list(by_id.values()) == ["cool", "auto"], [c.payload for c in device.commands]
    finally:
        proc.kill()
        proc.wait(timeout=10)
        device.disconnect()
        listener.close()


def test_registry_kill_9_loses_no_command_or_alert_event(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """kill -9 the registry process while events flow: its tracker acks to the broker only after
    committing, so after the restart every command reaches `succeeded` and the alert is recorded once."""
    registry = RegistryProcess(broker, tmp_path / "registry").start()
    http = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    engine_settings = Settings(
        state_dir=tmp_path / "engine",
        mqtt=broker.settings_for("iotfleet-rules"),
        registry=RegistrySettings(port=registry.port),
        rules=RulesSettings(client_id=uid("rules"), api_key=ADMIN_KEY),
    )
    engine = None
    devices: list[SimThermostat] = []
    try:
        ids = [uid(f"k{i}") for i in range(5)]
        created = http.post(
            "/api/v1/devices/bulk", json={"devices": [{"id": i, "type": "thermostat"} for i in ids]}
        )
        assert created.status_code == 201, created.text
        devices = [
            SimThermostat(broker, d["id"], d["credentials"]["password"]).connect()
            for d in created.json()["devices"]
        ]
        rule = http.post(
            "/api/v1/rules", json={**OVERHEAT, "scope": {"device_type": "thermostat", "device_ids": ids}}
        )
        assert rule.status_code == 201, rule.text
        engine = start_engine(engine_settings, RegistrySource.from_settings(engine_settings))
        for device in devices:
            device.publish(35.0)  # five firings: five commands, acks and alerts in flight...
        registry.kill()  # ...while the registry dies without any shutdown code
        wait(lambda: all(d.commands for d in devices), "commands at the devices (acked while it is down)")
        registry.start()

        def recorded() -> bool:
            commands = http.get("/api/v1/commands", params={"limit": 100}).json()["items"]
            return len(commands) == 5 and all(c["status"] == "succeeded" for c in commands)

        wait(recorded, "every command succeeded after the restart", timeout=20)
        alerts = http.get("/api/v1/alerts", params={"limit": 100}).json()["items"]
        assert sorted(a["device_id"] for a in alerts) == sorted(ids)
        assert all(a["status"] == "active" for a in alerts)
    finally:
        if engine is not None:
            engine.stop()
        for device in devices:
            device.disconnect()
        http.close()
        registry.stop()
