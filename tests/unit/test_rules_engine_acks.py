"""The engine acks a reading to the broker only once the broker acked what the reading caused.

The engine runs on a test loop with its real evaluator and state store; its two
MQTT sessions are the real client on fake connections (tests/mqtt_fakes.py), so
every PUBLISH and PUBACK is the wire's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from iotfleet import topics
from iotfleet.settings import RulesSettings, Settings
from rules_engine.engine import RulesEngine
from rules_engine.sources import FileSource
from rules_engine.store import StateStore
from tests.mqtt_fakes import attach, puback

HOT: dict[str, Any] = {
    "name": "overheat",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30},
    "then": [
        {"command": "set_mode", "args": {"mode": "cool"}},
        {"alert": {"severity": "major", "message": "overheating"}},
    ],
}


def reading(temperature: float) -> bytes:
    return orjson.dumps(
        {"temperature_c": temperature, "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "auto"}
    )


def telemetry(device_id: str) -> str:
    return topics.device_topic("thermostat", device_id, topics.Channel.TELEMETRY)


async def test_a_firing_reading_is_acked_after_its_command_and_events_and_holds_back_later_ones(
    tmp_path: Path,
) -> None:
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(orjson.dumps([HOT]).decode())
    source = FileSource(rules_file)
    engine = RulesEngine(
        Settings(state_dir=tmp_path, rules=RulesSettings()), source, StateStore(tmp_path / "s")
    )
    engine._loop = asyncio.get_running_loop()
    engine.apply(source.fetch_rules(), None)
    acked: list[int] = []
    engine.inbound.ack = acked.extend  # type: ignore[method-assign]
    wire = attach(engine.outbound, 1)
    hot, quiet = (1 << 16) | 1, (1 << 16) | 2

    engine._on_message(telemetry("th-1"), reading(35.0), hot)
    engine._on_message(telemetry("th-2"), reading(21.0), quiet)
    await asyncio.sleep(0)  # the scheduled ack flush
    sent = [(packet_id, topic) for _, packet_id, topic in wire.publishes()]
    assert sent == [
        (1, topics.COMMAND_EVENTS),  # created
        (2, telemetry("th-1").replace("/telemetry", "/commands")),
        (3, topics.ALERT_EVENTS),  # raised
    ]
    assert acked == []  # the broker has not acked the command yet: neither reading is acked

    assert engine.outbound._conn is not None
    engine.outbound._conn.data_received(puback(1) + puback(2))
    assert acked == []  # the alert event is still in flight
    engine.outbound._conn.data_received(puback(3))
    assert acked == [hot, quiet]  # in arrival order, as MQTT requires

    # A reading that fires nothing is acked at once.
    engine._on_message(telemetry("th-2"), reading(21.5), (1 << 16) | 3)
    await asyncio.sleep(0)
    assert acked[-1] == (1 << 16) | 3
    engine._store_writer.shutdown(wait=True)
    engine.store.close()
