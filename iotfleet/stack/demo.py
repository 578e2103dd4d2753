"""What `iotfleet demo` adds to a running stack so every dashboard page has something real to show.

- A few example rules (`demo-…`), created through the registry API like an
  operator would, chosen to fire on the demo fleet's signals: Rules and Alerts
  are not empty, and rule commands flow back to devices.
- Operator commands sent through the REST API (`POST /devices/{id}/commands`)
  under an operator API key named ``demo-operator``: each appears in the
  registry with its name, its author and its lifecycle, as a person's would
  (the simulator's own MQTT command load is turned off for the demo).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from iotfleet.errors import StackError

OPERATOR_KEY_NAME = "demo-operator"
OPERATOR_KEY_FILE = "demo-operator-api-key"

# Thresholds sit inside the simulated signals' ranges (simulators/models.py), so each rule
# fires on some of the demo's devices within minutes, and clears again.
DEMO_RULES: tuple[dict[str, Any], ...] = (
    {
        "name": "demo-thermostat-too-warm",
        "description": "Example: a room above 23.5 °C for 30 s is cooled, back to auto once below 22.5 °C",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "temperature_c", "op": ">", "value": 23.5, "for": "30s"},
        "clear_when": {"field": "temperature_c", "op": "<", "value": 22.5},
        "then": [
            {"command": "set_mode", "args": {"mode": "cool"}},
            {"alert": {"severity": "minor", "message": "room too warm"}},
        ],
        "on_clear": [{"command": "set_mode", "args": {"mode": "auto"}}],
        "cooldown": "5m",
    },
    {
        "name": "demo-co2-high",
        "description": "Example: CO2 averaging above 800 ppm over a minute opens the ventilation",
        "scope": {"device_type": "air_quality"},
        "when": {"field": "co2_ppm", "agg": "mean", "window": "1m", "op": ">", "value": 800},
        "clear_when": {"field": "co2_ppm", "agg": "mean", "window": "1m", "op": "<", "value": 700},
        "then": [
            {"command": "set_ventilation", "args": {"level_pct": 80}},
            {"alert": {"severity": "major", "message": "CO2 above 800 ppm"}},
        ],
        "cooldown": "5m",
    },
    {
        "name": "demo-plug-high-power",
        "description": "Example: a plug drawing more than 1 kW",
        "scope": {"device_type": "smart_plug"},
        "when": {"field": "power_w", "op": ">", "value": 1000},
        "then": [{"alert": {"severity": "warning", "message": "drawing more than 1 kW"}}],
        "cooldown": "10m",
    },
    *(
        {
            "name": f"demo-{type_name.replace('_', '-')}-offline",
            "description": "Example: a device offline for 3 s (the demo's disconnect fault)",
            "scope": {"device_type": type_name},
            "when": {"presence": "offline", "for": "3s"},
            "then": [{"alert": {"severity": "warning", "message": "device offline"}}],
        }
        for type_name in ("thermostat", "air_quality", "smart_plug", "gps_tracker")
    ),
)

# Valid arguments for an operator's command, per type (validated again by the API).
_COMMANDS: dict[str, Callable[[random.Random], tuple[str, dict[str, Any]]]] = {
    "thermostat": lambda rng: rng.choice(
        (
            ("set_setpoint", {"setpoint_c": rng.choice((19.0, 20.0, 20.5, 21.0, 22.0))}),
            ("set_mode", {"mode": rng.choice(("heat", "auto"))}),
        )
    ),
    "air_quality": lambda rng: ("set_ventilation", {"level_pct": rng.choice((20, 30, 50))}),
    "smart_plug": lambda rng: ("set_relay", {"on": rng.random() < 0.8}),
    "gps_tracker": lambda rng: ("set_report_interval", {"seconds": rng.choice((5, 10, 30))}),
}


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code >= 400:
        raise StackError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response


def ensure_rules(api_url: str, admin_key: str, *, timeout: float = 10.0) -> list[str]:
    """Create the example rules that are not there yet (by name); return the names created."""
    created = []
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout
    ) as c:
        for rule in DEMO_RULES:
            response = c.post("/api/v1/rules", json=rule)
            if response.status_code == 409:  # kept from an earlier demo (maybe edited): left as it is
                continue
            _check(response, f"creating example rule {rule['name']}")
            created.append(str(rule["name"]))
    return created


def operator_key(api_url: str, admin_key: str, state_dir: Path, *, timeout: float = 10.0) -> str:
    """The demo operator's API key: created once through the API, kept 0600 in the state dir."""
    path = state_dir / OPERATOR_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        check = httpx.get(
            f"{api_url}/api/v1/devices",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
        if check.status_code != 401:  # revoked keys are replaced
            return key
    response = httpx.post(
        f"{api_url}/api/v1/api-keys",
        json={"name": OPERATOR_KEY_NAME, "role": "operator"},
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=timeout,
    )
    key = str(_check(response, "creating the demo operator's API key").json()["key"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


class OperatorCommands:
    """Sends an operator command through the REST API every ``1/rate_per_s`` s (on average) until stopped."""

    DEVICE_REFRESH_S = 30.0

    def __init__(self, api_url: str, key: str, rate_per_s: float, *, seed: int | None = None) -> None:
        self.client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=10.0)
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="demo-operator", daemon=True)

    def start(self) -> OperatorCommands:
        if self.rate_per_s > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        self.client.close()

    def _devices(self) -> list[dict[str, Any]]:
        # One page is plenty to pick from: the demo fleet is small, and a large one needs no more.
        for params in ({"enabled": True, "online": True, "limit": 1000}, {"enabled": True, "limit": 1000}):
            response = self.client.get("/api/v1/devices", params=params)
            if response.status_code == 200:
                items = [d for d in response.json()["items"] if d["type"] in _COMMANDS]
                if items:
                    return items
        return []

    def _run(self) -> None:
        devices: list[dict[str, Any]] = []
        refreshed = float("-inf")
        while not self.stop_event.wait(self.rng.expovariate(self.rate_per_s)):
            try:
                clock = time.monotonic()
                if not devices or clock - refreshed > self.DEVICE_REFRESH_S:
                    devices, refreshed = self._devices(), clock
                if not devices:
                    continue
                device = self.rng.choice(devices)
                name, args = _COMMANDS[device["type"]](self.rng)
                response = self.client.post(
                    f"/api/v1/devices/{device['id']}/commands",
                    json={"name": name, "args": args, "ttl_s": 120},
                )
                if response.status_code in (200, 202):
                    self.sent += 1
                elif len(self.errors) < 20:
                    self.errors.append(f"{device['id']} {name}: HTTP {response.status_code}")
            except httpx.HTTPError as exc:  # the registry restarting: try again at the next tick
                if len(self.errors) < 20:
                    self.errors.append(str(exc))
