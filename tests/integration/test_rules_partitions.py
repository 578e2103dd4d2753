"""Two partitioned rules engines (real processes, real mosquitto, real PostgreSQL), one killed -9.

Eight partitions of the thermostat type, leases in PostgreSQL; ~50 devices stream scripted
readings whose transitions are computed in advance by the pure evaluator (a threshold rule
with hysteresis and a windowed mean). The engines split the partitions 4/4; one is killed
with SIGKILL mid-stream. Promised (docs/rules.md, "Running several engines"): the survivor takes
its partitions over within the lease TTL plus a round, every transition raises/clears exactly
at its reading's time, none twice (one event id per raised transition, one command id per
command), and the windowed rule's transitions after the takeover are those of an engine that
never died: its windows were rebuilt from the hand-over buffer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import dynsec, topics
from iotfleet.stack import probes
from iotfleet.topics import Channel
from rules_engine import wire
from rules_engine.evaluator import Evaluator
from rules_engine.sources import FileSource
from tests.harness import Broker
from tests.ingest_support import provision_publisher
from tests.registry_harness import Postgres, postgres  # noqa: F401  (fixture)
from tests.rules_support import Listener, wait, write_rules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 48
READINGS = 40  # per device, 100 ms of device time apart
RATE = 300.0  # readings/s over all devices: the stream lasts ~6.5 s
PARTITIONS = 8
TTL_S = 2.0

RULES: list[dict[str, Any]] = [
    {
        "name": "overheat",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "temperature_c", "op": ">", "value": 30},
        "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
        "then": [
            {"command": "set_mode", "args": {"mode": "cool"}, "ttl": "60s"},
            {"alert": {"severity": "major", "message": "overheating"}},
        ],
        "on_clear": [{"command": "set_mode", "args": {"mode": "auto"}}],
    },
    {
        "name": "humid",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "humidity_pct", "agg": "mean", "window": "1s", "op": ">", "value": 60},
        "then": [{"alert": {"severity": "minor", "message": "humid"}}],
    },
]


def script(index: int, base: int) -> list[tuple[int, float, float]]:
    """(ts, temperature, humidity) per reading: seeded, so transitions are known in advance."""
    rng = random.Random(index)
    out = []
    humid = False
    for k in range(READINGS):
        if rng.random() < 0.15:
            humid = not humid
        out.append((base + 100 * k, rng.choice((20.0, 28.0, 35.0)), rng.uniform(70, 95) if humid else 40.0))
    return out


class Commands:
    """Every command the engines send to the test's devices (id, device, name/args)."""

    def __init__(self, broker: Broker, username: str, password: str) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.device_filter(Channel.COMMANDS, "thermostat"), qos=1)
        self.client.loop_start()
        if not done.wait(10):
            raise TimeoutError("commands: no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        device_id = topics.parse_device_topic(msg.topic).device_id
        with self.lock:
            self.seen.append((body["id"], device_id, body["args"]["mode"]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def health(port: int) -> dict[str, Any]:
    try:
        body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body


def held(port: int) -> int:
    return len(health(port).get("partitions", {}).get("held", []))


def test_kill_9_of_one_of_two_partitioned_engines_loses_and_repeats_no_transition(
    broker: Broker, request: pytest.FixtureRequest, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    pg: Postgres = request.getfixturevalue("postgres")
    ids = [uid(f"p{i:02d}") for i in range(DEVICES)]
    user, password = provision_publisher(broker, "thermostat", ids)
    rules = write_rules(
        tmp_path / "rules.json",
        [{**r, "scope": {"device_type": "thermostat", "device_ids": ids}} for r in RULES],
    )
    # What must happen, from the pure evaluator (the engines' own code, no I/O).
    base = wire.now_ms() - 120_000
    scripts = {d: script(i, base) for i, d in enumerate(ids)}
    stored_rules = FileSource(rules).fetch_rules()
    names = {r.id: r.name for r in stored_rules}
    evaluator = Evaluator(stored_rules)
    expected: set[tuple[str, str, str, int]] = set()
    for device_id, readings in scripts.items():
        for ts, temperature, humidity in readings:
            values = {"temperature_c": temperature, "humidity_pct": humidity}
            for f in evaluator.on_reading("thermostat", device_id, ts, values):
                expected.add((names[f.rule_id], f.device_id, f.kind, f.at_ms))
    assert sum(1 for e in expected if e[0] == "humid") >= 20  # the windowed rule has work to do

    database = pg.create_database()
    engines = Engines(broker, tmp_path, rules, database, uid("rules"), TTL_S)
    procs, ports, logs, start = engines.procs, engines.ports, engines.logs, engines.start
    listener = Listener(broker, topics.ALERT_EVENTS)
    commands = Commands(broker, dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uid("pub"), protocol=mqtt.MQTTv5)
    publisher.username_pw_set(user, password)
    publisher.max_inflight_messages_set(100)
    published = 0

    def stream() -> None:
        nonlocal published
        started = time.monotonic()
        for k in range(READINGS):
            for device_id in ids:
                ts, temperature, humidity = scripts[device_id][k]
                body = {
                    "ts": ts,
                    "seq": k + 1,
                    "temperature_c": temperature,
                    "humidity_pct": humidity,
                    "setpoint_c": 21.0,
                    "mode": "auto",
                }
                topic = topics.device_topic("thermostat", device_id, Channel.TELEMETRY)
                publisher.publish(topic, orjson.dumps(body), qos=1).wait_for_publish(5)
                published += 1
            ahead = started + published / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing, not synchronisation

    try:
        start("engine-a")
        start("engine-b")
        wait(
            lambda: held(ports["engine-a"]) == held(ports["engine-b"]) == PARTITIONS // 2,
            "the engines split the partitions 4/4",
            timeout=30,
        )
        assert health(ports["engine-a"])["status"] == "ok"
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        wait(lambda: published >= DEVICES * READINGS // 3, "a third of the stream", timeout=30)
        procs["engine-b"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs["engine-b"].wait(timeout=10)
        wait(lambda: held(ports["engine-a"]) == PARTITIONS, "the survivor holds every partition", timeout=15)
        takeover_s = time.monotonic() - killed
        print(f"\ntakeover of the dead engine's partitions: {takeover_s:.2f} s (lease TTL {TTL_S} s)")
        assert takeover_s < TTL_S + 2.0
        streamer.join(timeout=60)
        assert not streamer.is_alive()

        def observed() -> set[tuple[str, str, str, int]]:
            raised = listener.events(topics.ALERT_EVENTS, "raised")
            cleared = listener.events(topics.ALERT_EVENTS, "cleared")
            return {(e["rule_name"], e["device_id"], "fire", e["at"]) for e in raised} | {
                (names.get(e["rule_id"], "?"), e["device_id"], "clear", e["at"]) for e in cleared
            }

        wait(lambda: observed() >= expected, "every transition's alert event", timeout=30)
        # no transition fired that should not have, none missed
        assert observed() == expected
        # none fired twice: one event id per raised transition (a re-sent event keeps its id)
        raised_ids: dict[tuple[str, str, int], set[str]] = defaultdict(set)
        for e in listener.events(topics.ALERT_EVENTS, "raised"):
            raised_ids[(e["rule_name"], e["device_id"], e["at"])].add(e["id"])
        assert all(len(v) == 1 for v in raised_ids.values()), [k for k, v in raised_ids.items() if len(v) > 1]
        # commands: one id per overheat transition of each device, each id for one command only
        want = Counter(
            (d, "cool" if kind == "fire" else "auto") for name, d, kind, _ in expected if name == "overheat"
        )

        def command_ids() -> Counter[tuple[str, str]]:
            with commands.lock:
                unique = {(i, d, mode) for i, d, mode in commands.seen}
            return Counter((d, mode) for _i, d, mode in unique)

        wait(lambda: command_ids() == want, "one command per overheat transition", timeout=20)
        with commands.lock:
            by_id = defaultdict(set)
            for command_id, device_id, mode in commands.seen:
                by_id[command_id].add((device_id, mode))
        assert all(len(v) == 1 for v in by_id.values())
        survivor_log = logs["engine-a"].read_text()
        print("\n".join(line for line in survivor_log.splitlines() if "partition" in line))
        assert "taken over from engine-b" in survivor_log, survivor_log[-3000:]
    finally:
        engines.kill_all()
        publisher.loop_stop()
        publisher.disconnect()
        listener.close()
        commands.close()


class Engines:
    """Partitioned engine processes of one test (``python -m rules_engine.main``), by replica name."""

    def __init__(  # noqa: PLR0917
        self, broker: Broker, tmp_path: Path, rules: Path, database: str, client_id: str, ttl_s: float
    ) -> None:
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "IOTFLEET_MQTT__HOST": broker.host,
            "IOTFLEET_MQTT__PORT": str(broker.port),
            "IOTFLEET_MQTT__USERNAME": "iotfleet-rules",
            "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-rules"],
            "IOTFLEET_MQTT__SESSION_EXPIRY_S": "60",
            "IOTFLEET_RULES__CLIENT_ID": client_id,
            "IOTFLEET_RULES__RULES_FILE": str(rules),
            "IOTFLEET_RULES__PARTITIONS": str(PARTITIONS),
            "IOTFLEET_RULES__SHARED_STORE_URL": database,
            "IOTFLEET_RULES__LEASE_TTL_S": str(ttl_s),
            "IOTFLEET_RULES__HANDOVER_BUFFER_S": str(max(30.0, 3 * ttl_s)),
            "IOTFLEET_RULES__DEVICE_TYPES": '["thermostat"]',
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.logs: dict[str, Path] = {}

    def start(self, replica: str) -> None:
        self.ports[replica] = probes.free_port()
        self.logs[replica] = self.tmp_path / f"{replica}.log"
        self.procs[replica] = subprocess.Popen(
            [sys.executable, "-m", "rules_engine.main"],
            env={
                **self.env,
                "IOTFLEET_STATE_DIR": str(self.tmp_path / replica),
                "IOTFLEET_RULES__REPLICA": replica,
                "IOTFLEET_HEALTH__PORT": str(self.ports[replica]),
            },
            stdout=self.logs[replica].open("wb"),
            stderr=subprocess.STDOUT,
        )

    def held(self, replica: str) -> int:
        return held(self.ports[replica])

    def kill_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)


def test_a_stopped_engine_hands_its_partitions_over_at_once(
    broker: Broker, request: pytest.FixtureRequest, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    """SIGTERM: the engine releases its leases as it stops; the peer takes them well within the TTL."""
    pg: Postgres = request.getfixturevalue("postgres")
    ttl_s = 20.0
    rules = write_rules(tmp_path / "rules.json", [RULES[0]])
    engines = Engines(broker, tmp_path, rules, pg.create_database(), uid("rules"), ttl_s)
    try:
        engines.start("engine-a")
        engines.start("engine-b")
        wait(
            lambda: engines.held("engine-a") == engines.held("engine-b") == PARTITIONS // 2,
            "the engines split the partitions 4/4",
            timeout=30,
        )
        stopped = time.monotonic()
        engines.procs["engine-b"].send_signal(signal.SIGTERM)
        assert engines.procs["engine-b"].wait(timeout=20) == 0
        wait(lambda: engines.held("engine-a") == PARTITIONS, "the peer holds every partition", timeout=15)
        handover_s = time.monotonic() - stopped
        print(f"\nhand-over after a clean stop: {handover_s:.2f} s (lease TTL {ttl_s:.0f} s)")
        assert handover_s < 5.0  # a lease round is at most 1 s apart
        log = engines.logs["engine-b"].read_text()
        assert log.count("released at stop") == PARTITIONS // 2, log[-3000:]
    finally:
        engines.kill_all()
