"""The ``iotfleet-rules`` process: fails fast on bad configuration, starts degraded without its peers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from iotfleet.settings import MqttSettings, RegistrySettings, RulesSettings, Settings
from iotfleet.stack import probes
from rules_engine.engine import RulesEngine
from rules_engine.sources import RegistrySource
from rules_engine.store import StateStore
from tests.rules_support import wait

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
