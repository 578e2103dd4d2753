"""The rules engine's state store promise (docs/rules.md), under a kill -9 mid-stream.

Several thermostats alternate hot and cool readings (one firing and one clearing per
episode, device timestamps increasing); the engine process is killed with SIGKILL
while the stream flows and started again on the same state store. Promised: no
firing is lost (every hot episode raised its alert exactly at its reading's time,
every cool one cleared it) and at most one re-fire per (rule, device) for the kill
(a kill between a firing's publish and its state write).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from iotfleet import topics
from iotfleet.stack import probes
from tests.devices import provision
from tests.harness import Broker
from tests.rules_support import Listener, SimThermostat, wait, write_rules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 4
EPISODES = 40  # per device: a hot reading (fires) then a cool one (clears)
RATE = 100.0  # readings/s over all devices: the stream lasts ~3 s

RULE = {
    "name": "overheat-no-cooldown",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [
        {"command": "set_mode", "args": {"mode": "cool"}, "ttl": "30s"},
        {"alert": {"severity": "major", "message": "overheating"}},
    ],
    "on_clear": [{"command": "set_mode", "args": {"mode": "auto"}}],
}


def test_kill_9_mid_stream_loses_no_firing_and_refires_at_most_once(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    ids = [uid(f"th{i}") for i in range(DEVICES)]
    passwords = provision(broker, [("thermostat", d) for d in ids])
    devices = [SimThermostat(broker, d, passwords[d]).connect() for d in ids]
    listener = Listener(broker, topics.ALERT_EVENTS)
    rules = write_rules(
        tmp_path / "rules.json", [{**RULE, "scope": {"device_type": "thermostat", "device_ids": ids}}]
    )
    env = {
        **os.environ,
        "IOTFLEET_STATE_DIR": str(tmp_path / "state"),
        "IOTFLEET_MQTT__HOST": broker.host,
        "IOTFLEET_MQTT__PORT": str(broker.port),
        "IOTFLEET_MQTT__USERNAME": "iotfleet-rules",
        "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-rules"],
        "IOTFLEET_MQTT__SESSION_EXPIRY_S": "300",
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
        wait(lambda: probes.http_ok(f"http://127.0.0.1:{health_port}/healthz"), "engine healthy", timeout=30)
        return proc

    base = int(time.time() * 1000) - 60_000
    hot_ts = {d: [base + 20 * e for e in range(EPISODES)] for d in ids}
    published = 0

    def stream() -> None:
        nonlocal published
        started = time.monotonic()
        for e in range(EPISODES):
            for index, device in enumerate(devices):
                device.publish(35.0, ts=hot_ts[ids[index]][e])
                device.publish(20.0, ts=hot_ts[ids[index]][e] + 10)
                published += 2
            ahead = started + published / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing, not synchronisation

    proc = start()
    streamer = threading.Thread(target=stream, daemon=True)
    try:
        streamer.start()
        wait(lambda: published >= DEVICES * EPISODES * 2 // 3, "a third of the stream", timeout=30)
        proc.send_signal(signal.SIGKILL)  # mid-stream: readings keep queueing in its session
        proc.wait(timeout=10)
        proc = start()
        streamer.join(timeout=60)
        assert not streamer.is_alive()

        def all_seen() -> bool:
            raised = Counter(e["device_id"] for e in listener.events(topics.ALERT_EVENTS, "raised"))
            cleared = Counter(e["device_id"] for e in listener.events(topics.ALERT_EVENTS, "cleared"))
            return all(raised[d] >= EPISODES and cleared[d] >= EPISODES for d in ids)

        wait(all_seen, "every episode raised and cleared", timeout=60)
        for device_id in ids:
            raised = [
                e["at"] for e in listener.events(topics.ALERT_EVENTS, "raised") if e["device_id"] == device_id
            ]
            cleared = [
                e["at"]
                for e in listener.events(topics.ALERT_EVENTS, "cleared")
                if e["device_id"] == device_id
            ]
            # no firing lost: each hot reading raised at its own time, each cool one cleared
            assert sorted(set(raised)) == hot_ts[device_id], device_id
            assert sorted(set(cleared)) == [t + 10 for t in hot_ts[device_id]], device_id
            # no re-fire: one raised event id per episode (the outbox may deliver an event twice,
            # with its id, if the kill fell between its PUBACK and its row's deletion; the
            # registry keeps one alert per id), and one clear per cool reading
            firing_ids = {
                e["id"] for e in listener.events(topics.ALERT_EVENTS, "raised") if e["device_id"] == device_id
            }
            assert len(firing_ids) == EPISODES, (device_id, len(firing_ids), Counter(raised).most_common(2))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for device in devices:
            device.disconnect()
        listener.close()
