"""What the multi-host test and benchmark observe and check: commands and alerts seen at the broker,
the API's availability, and the rule transitions the stored readings call for.

The watcher is a paho client on the broker's admin account (in the test's root
namespace, through the bridge): it timestamps every command a device is sent
and every alert event, on the same clock as the devices' reading timestamps
(one machine), so reading → command latency needs no cooperation from the
services.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import dynsec, topics
from iotfleet.influx import quote_identifier
from tests.multihost_stack import Endpoints

# The rule whose transitions are checked: mains-voltage noise in the simulated smart plugs
# (an AR(1) process around 230 V, σ ≈ 1 V) crosses it a few times a minute per plug.
FIRE_ABOVE_V = 231.0
CLEAR_BELOW_V = 229.5
RULE_NAME = "hosts-overvoltage"
RULE = {
    "name": RULE_NAME,
    "scope": {"device_type": "smart_plug"},
    "when": {"field": "voltage_v", "op": ">", "value": FIRE_ABOVE_V},
    "clear_when": {"field": "voltage_v", "op": "<", "value": CLEAR_BELOW_V},
    "then": [
        {"command": "set_relay", "args": {"on": False}, "ttl": "5m"},
        {"alert": {"severity": "minor", "message": "over-voltage"}},
    ],
    "on_clear": [{"command": "set_relay", "args": {"on": True}, "ttl": "5m"}],
}


@dataclass
class SeenCommand:
    id: str
    device_id: str
    on: bool
    at_ms: int  # when the watcher got it (wall clock, ms)


@dataclass
class BrokerWatcher:
    """Every command sent to a device and every alert event, with arrival times."""

    endpoints: Endpoints
    commands: list[SeenCommand] = field(default_factory=list)
    alert_events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: mqtt.Client | None = None

    def start(self) -> BrokerWatcher:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"hosts-watch-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        client.username_pw_set(dynsec.ADMIN_USER, self.endpoints.admin_password)
        if self.endpoints.ca_file is not None:
            client.tls_set(ca_certs=str(self.endpoints.ca_file))
        subscribed = threading.Event()
        client.on_connect = lambda c, *_: c.subscribe([("devices/+/+/commands", 1), (topics.ALERT_EVENTS, 1)])
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect(self.endpoints.mqtt_host, self.endpoints.mqtt_port, keepalive=30)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("watcher: no SUBACK from the broker")
        self._client = client
        return self

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        now = int(time.time() * 1000)
        body = orjson.loads(message.payload)
        with self._lock:
            if message.topic == topics.ALERT_EVENTS:
                self.alert_events.append({**body, "seen_ms": now})
            else:
                device_id = message.topic.split("/")[2]
                self.commands.append(SeenCommand(body["id"], device_id, bool(body["args"]["on"]), now))

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def snapshot(self) -> tuple[list[SeenCommand], list[dict[str, Any]]]:
        with self._lock:
            return list(self.commands), list(self.alert_events)


@dataclass
class ApiPoller:
    """Polls one registry's API (a DB-backed read) every ``interval_s``; records the gaps."""

    url: str
    endpoints: Endpoints
    interval_s: float = 0.1
    ok_at: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ApiPoller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.endpoints.api_key}"}
        verify = self.endpoints.http_verify()
        with httpx.Client(base_url=self.url, headers=headers, timeout=2.0, verify=verify) as http:
            while not self._stop.is_set():
                try:
                    ok = http.get("/api/v1/devices", params={"limit": 1}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.ok_at.append(time.monotonic())
                else:
                    self.failures += 1
                self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def longest_gap_s(self, since: float, until: float) -> float:
        """The longest time without a successful answer within [since, until] (monotonic clock)."""
        marks = [since, *(t for t in self.ok_at if since <= t <= until), until]
        return max(b - a for a, b in itertools.pairwise(marks))


@dataclass(frozen=True)
class Transition:
    device_id: str
    fired: bool  # True: the rule fired (relay off), False: it cleared (relay on)
    ts_ms: int  # the reading's time


def _influx_query(endpoints: Endpoints, database: str, query: str) -> httpx.Response:
    response = httpx.post(
        f"{endpoints.influx_url}/query",
        data={"db": database, "q": query, "epoch": "ms"},
        timeout=60,
        verify=endpoints.http_verify(),
    )
    response.raise_for_status()
    return response


def stored_voltages(endpoints: Endpoints, database: str) -> dict[str, list[tuple[int, float]]]:
    """Every stored smart-plug reading, per device, in time order: (ts ms, voltage)."""
    query = f"SELECT voltage_v FROM {quote_identifier('smart_plug')} GROUP BY device_id"
    response = _influx_query(endpoints, database, query)
    out: dict[str, list[tuple[int, float]]] = {}
    for result in response.json().get("results", []):
        for series in result.get("series", []) or []:
            device_id = series["tags"]["device_id"]
            out[device_id] = sorted((int(t), float(v)) for t, v in series["values"])
    return out


def stored_seq_counts(endpoints: Endpoints, database: str) -> dict[str, tuple[int, int, int]]:
    """Per device: (points stored, distinct seqs stored, highest seq stored)."""
    query = f"SELECT seq FROM {quote_identifier('smart_plug')} GROUP BY device_id"
    response = _influx_query(endpoints, database, query)
    out: dict[str, tuple[int, int, int]] = {}
    for result in response.json().get("results", []):
        for series in result.get("series", []) or []:
            seqs = [int(v[1]) for v in series["values"]]
            out[series["tags"]["device_id"]] = (len(seqs), len(set(seqs)), max(seqs))
    return out


def expected_transitions(readings: dict[str, list[tuple[int, float]]]) -> dict[str, list[Transition]]:
    """The rule's edge-triggered semantics (docs/rules.md) replayed over the stored readings."""
    out: dict[str, list[Transition]] = defaultdict(list)
    for device_id, series in readings.items():
        active = False
        for ts, voltage in series:
            if not active and voltage > FIRE_ABOVE_V:
                active = True
                out[device_id].append(Transition(device_id, True, ts))
            elif active and voltage < CLEAR_BELOW_V:
                active = False
                out[device_id].append(Transition(device_id, False, ts))
    return out


@dataclass
class TransitionCheck:
    """Commands and alerts seen vs the transitions the stored readings call for."""

    expected: int = 0
    distinct_commands: int = 0
    commands_seen: int = 0  # deliveries, a redelivery of one id counted each time
    devices_wrong: dict[str, str] = field(default_factory=dict)
    # per wrong device: (reading ts of the first transition that differs, commands sent - expected)
    first_wrong: dict[str, tuple[int, int]] = field(default_factory=dict)
    latencies_ms: list[tuple[int, int]] = field(default_factory=list)  # (reading ts, latency)
    alerts_raised_wrong: dict[str, str] = field(default_factory=dict)


def check_transitions(
    expected: dict[str, list[Transition]],
    commands: list[SeenCommand],
    alert_events: list[dict[str, Any]],
    devices: list[str],
) -> TransitionCheck:
    """Per device: one command id per transition, in order (off on fire, on on clear); one alert per fire."""
    result = TransitionCheck()
    by_device: dict[str, dict[str, SeenCommand]] = defaultdict(dict)
    for command in commands:
        result.commands_seen += 1
        by_device[command.device_id].setdefault(command.id, command)  # first delivery of each id
    raised: dict[str, dict[str, int]] = defaultdict(dict)
    for event in alert_events:
        if event.get("event") == "raised" and event.get("rule_name") == RULE_NAME:
            raised[event["device_id"]][event["id"]] = int(event["at"])
    for device_id in devices:
        want = expected.get(device_id, [])
        got = sorted(by_device.get(device_id, {}).values(), key=lambda c: c.at_ms)
        result.expected += len(want)
        result.distinct_commands += len(got)
        want_shape = [not t.fired for t in want]
        got_shape = [c.on for c in got]
        if want_shape != got_shape:
            index = next(
                (i for i, (a, b) in enumerate(zip(want_shape, got_shape, strict=False)) if a != b),
                min(len(want_shape), len(got_shape)),
            )
            at = want[index].ts_ms if index < len(want) else got[index].at_ms
            result.first_wrong[device_id] = (at, len(got) - len(want))
            result.devices_wrong[device_id] = (
                f"expected relay on/off {want_shape} for readings at {[t.ts_ms for t in want]},"
                f" sent {got_shape} at {[c.at_ms for c in got]}"
            )
        else:
            result.latencies_ms.extend((t.ts_ms, c.at_ms - t.ts_ms) for t, c in zip(want, got, strict=True))
        want_fired = sorted(t.ts_ms for t in want if t.fired)
        got_fired = sorted(raised.get(device_id, {}).values())
        if want_fired != got_fired:
            result.alerts_raised_wrong[device_id] = f"expected raises at {want_fired}, got {got_fired}"
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
