"""`iotfleet up|status|down` for real: every part healthy, fail-fast refusals, nothing left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotfleet.stack import probes

pytestmark = pytest.mark.integration

IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    mqtt_port, influx_port, api_port, rpc_port, base = probes.free_ports(4, block=8)
    env = dict(os.environ)
    env.update(
        {
            "IOTFLEET_STATE_DIR": str(tmp_path / "state"),
            "IOTFLEET_MQTT__PORT": str(mqtt_port),
            "IOTFLEET_INFLUX__URL": f"http://127.0.0.1:{influx_port}",
            "IOTFLEET_REGISTRY__PORT": str(api_port),
            "IOTFLEET_STACK__INFLUX_RPC_PORT": str(rpc_port),
            "IOTFLEET_STACK__SERVICE_PORT_BASE": str(base),
            # the broker's device-facing TLS listeners (8883/8884 by default): free ports too
            **dict(
                zip(
                    ("IOTFLEET_TLS__PORT", "IOTFLEET_TLS__CERT_PORT"),
                    map(str, probes.free_ports(2)),
                    strict=True,
                )
            ),
        }
    )
    yield env
    # Whatever happened, leave nothing running.
    subprocess.run([*IOTFLEET, "down"], env=env, capture_output=True, timeout=90, check=False)
    logs = tmp_path / "state" / "logs"
    if logs.exists():
        for log in sorted(logs.glob("*.log")):
            print(f"----- {log.name} -----\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def _run(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOTFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_up_status_down(stack_env: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    up = _run(stack_env, "up", "--detach")
    took = time.monotonic() - started
    assert up.returncode == 0, up.stderr + up.stdout
    print(f"iotfleet up --detach: every part healthy after {took:.1f} s")

    status = _run(stack_env, "status", "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    parts = {p["name"]: p for p in info["parts"]}
    assert set(parts) == {
        "mosquitto",
        "broker-agent",
        "influxd",
        "registry",
        "rules-engine",
        "ingest-thermostat",
        "ingest-air-quality",
        "ingest-smart-plug",
        "ingest-gps-tracker",
    }
    assert all(p["healthy"] and p["state"] == "RUNNING" and p["pid"] for p in parts.values()), parts
    assert parts["mosquitto"]["port"] == int(stack_env["IOTFLEET_MQTT__PORT"])
    assert parts["registry"]["port"] == int(stack_env["IOTFLEET_REGISTRY__PORT"])
    key_file = Path(info["admin_api_key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text().strip()
    # The platform CA devices need, and the TLS listeners for them (loopback by default).
    ca = Path(info["ca_cert"])
    assert ca == tmp_path.resolve() / "state" / "tls" / "ca.crt" and ca.read_text().startswith(
        "-----BEGIN CERT"
    )
    assert (ca.parent / "server.key").stat().st_mode & 0o777 == 0o600
    assert info["tls"]["mqtts_password"] == f"mqtts://127.0.0.1:{stack_env['IOTFLEET_TLS__PORT']}"
    assert info["tls"]["mqtts_certificate"] == f"mqtts://127.0.0.1:{stack_env['IOTFLEET_TLS__CERT_PORT']}"

    # A second `up` refuses at once and starts nothing.
    again = _run(stack_env, "up", "--detach", timeout=20)
    assert again.returncode == 2
    assert "already running" in again.stderr and "iotfleet down" in again.stderr

    # A crashed service is restarted by the supervisor.
    victim = parts["ingest-thermostat"]["pid"]
    os.kill(victim, 9)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = {p["name"]: p for p in json.loads(_run(stack_env, "status", "--json").stdout)["parts"]}
        if now["ingest-thermostat"]["pid"] not in (None, victim) and now["ingest-thermostat"]["healthy"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("ingest-thermostat was not restarted after kill -9")
    pids = [p["pid"] for p in now.values()]

    down = _run(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _alive(pid)], "a process of the stack survived `down`"
    assert _run(stack_env, "status", "--json").returncode == 3


def test_port_in_use_fails_fast_and_starts_nothing(stack_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(stack_env["IOTFLEET_REGISTRY__PORT"])))
        blocker.listen()
        started = time.monotonic()
        up = _run(stack_env, "up", "--detach", timeout=20)
    assert up.returncode == 2
    assert time.monotonic() - started < 10
    assert "already in use" in up.stderr and "IOTFLEET_REGISTRY__PORT" in up.stderr
    assert not (tmp_path / "state" / "supervisord.pid").exists()
    assert _run(stack_env, "status", "--json").returncode == 3


def test_ports_configured_twice_are_refused(stack_env: dict[str, str]) -> None:
    env = {**stack_env, "IOTFLEET_REGISTRY__PORT": stack_env["IOTFLEET_MQTT__PORT"]}
    up = _run(env, "up", "--detach", timeout=20)
    assert up.returncode == 2
    assert "configured for both mosquitto and registry" in up.stderr


def test_bad_setting_names_the_variable(stack_env: dict[str, str]) -> None:
    env = {**stack_env, "IOTFLEET_MQTT__PORT": "not-a-port"}
    up = _run(env, "up", "--detach", timeout=20)
    assert up.returncode == 2
    assert "IOTFLEET_MQTT__PORT" in up.stderr
