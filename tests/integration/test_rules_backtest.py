"""Acceptance: a backtest over a stored day returns the same firings as the live engine did.

One day of thermostat readings (every 2 min, three devices, one with an hour's
gap) goes over MQTT once: the real ingest stores it in InfluxDB and the live
rules engine evaluates it. Then the registry backtests each rule over that day
from InfluxDB, and the firings — device, fire/clear, logical time — must be
exactly the live engine's alert events.

The day is replayed in a second or two, so the engine's wall-clock tick
(absence deadlines) is set out of the way (``tick_s=60``): live, absence is
checked against the wall clock, which is only meaningful for real-time data.
Gaps inside the day are still evaluated by the next reading (as in the
backtest), and the end of the day by one explicit tick.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotfleet import topics
from iotfleet.settings import RulesSettings
from iotfleet.topics import Channel
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess, stored_count
from tests.integration.test_rules_registry import Platform, platform_settings
from tests.registry_harness import ADMIN_KEY
from tests.rules_support import Listener, RegistryServer, wait

pytestmark = pytest.mark.integration

STEP_MS = 120_000
GAP = (10 * 3600_000, 11 * 3600_000)  # device 0 is silent from 10:00 to 11:00

RULES: list[dict[str, Any]] = [
    {
        "name": "hot-for-10m",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "temperature_c", "op": ">", "value": 26, "for": "10m"},
        "clear_when": {"field": "temperature_c", "op": "<", "value": 23},
        "then": [
            {"command": "set_mode", "args": {"mode": "cool"}},
            {"alert": {"severity": "major", "message": "hot"}},
        ],
        "cooldown": "30m",
    },
    {
        "name": "humid-mean-30m",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "humidity_pct", "agg": "mean", "window": "30m", "op": ">", "value": 55},
        "then": [{"alert": {"severity": "minor", "message": "humid"}}],
    },
    {
        "name": "quiet-20m",
        "scope": {"device_type": "thermostat"},
        "when": {"absent_for": "20m"},
        "then": [{"alert": {"severity": "warning", "message": "quiet"}}],
    },
    {
        "name": "fast-rise",
        "scope": {"device_type": "thermostat"},
        "when": {"field": "temperature_c", "rate_per": "10m", "op": ">", "value": 2.5},
        "then": [{"alert": {"severity": "info", "message": "rising fast"}}],
    },
]


def day_of_readings(device_index: int, day_start_ms: int) -> list[dict[str, Any]]:
    """A seeded random walk: warm afternoons, humid mornings, and the gap on device 0."""
    rng = random.Random(1000 + device_index)
    temperature, humidity = 21.0, 45.0
    readings = []
    for step in range(24 * 3600_000 // STEP_MS):
        offset = step * STEP_MS
        if device_index == 0 and GAP[0] <= offset < GAP[1]:
            continue
        hour = offset / 3600_000
        temperature += rng.uniform(-0.6, 0.6) + (0.25 if 12 <= hour < 16 else -0.08)
        temperature = min(max(temperature, 15.0), 35.0)
        humidity += rng.uniform(-2, 2) + (0.6 if 6 <= hour < 9 else -0.2)
        humidity = min(max(humidity, 20.0), 90.0)
        readings.append(
            {
                "ts": day_start_ms + offset,
                "seq": step,
                "temperature_c": round(temperature, 2),
                "humidity_pct": round(humidity, 2),
                "setpoint_c": 21.0,
                "mode": "auto",
            }
        )
    return readings


@pytest.fixture
def stack(
    fresh_broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> Iterator[tuple[Platform, IngestProcess]]:
    registry_settings, engine_settings = platform_settings(
        fresh_broker, tmp_path, influx=influxd.settings_for(database), uid=uid
    )
    engine_settings = engine_settings.model_copy(
        update={"rules": RulesSettings(**{**engine_settings.rules.model_dump(), "tick_s": 60})}
    )
    ingest = IngestProcess(fresh_broker, influxd, database, tmp_path / "ingest").start()
    registry = RegistryServer(registry_settings).start()
    http = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    platform = Platform(fresh_broker, registry, registry_settings, engine_settings, http)
    try:
        wait(platform.tracker_connected, "tracker connected")
        ingest.wait_healthy()
        yield platform, ingest
    finally:
        platform.stop_engine()
        http.close()
        platform.registry.stop()
        ingest.terminate()


def test_backtest_of_a_stored_day_matches_the_live_engine(
    stack: tuple[Platform, IngestProcess], influxd: Influxd, database: str, uid: Callable[[str], str]
) -> None:
    platform, _ingest = stack
    engine = platform.start_engine()
    rules = [platform.create_rule(body) for body in RULES]
    for rule in rules:
        platform.wait_rule_loaded(rule["id"])
    listener = Listener(platform.broker, topics.ALERT_EVENTS, topics.COMMAND_EVENTS)
    devices = [platform.thermostat(uid(f"bt{i}")).connect() for i in range(3)]
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    start_ms = int(day.timestamp() * 1000)
    end_ms = start_ms + 24 * 3600_000 - 1
    try:
        streams = {d.device_id: day_of_readings(i, start_ms) for i, d in enumerate(devices)}
        total = sum(len(s) for s in streams.values())
        # Interleaved in time order, as a live fleet would report.
        merged = sorted(
            ((r["ts"], i, r) for i, s in enumerate(streams.values()) for r in s), key=lambda x: x[:2]
        )
        infos = []
        for _ts, index, reading in merged:
            device = devices[index]
            infos.append(device.client.publish(device.topic(Channel.TELEMETRY), _json(reading), qos=1))
        for info in infos:
            info.wait_for_publish(10)
        wait(
            lambda: engine.metrics.readings._value.get() >= total, "live engine evaluated the day", timeout=60
        )
        engine.call(engine.tick, end_ms)  # the end of the day, as the backtest evaluates it
        wait(
            lambda: stored_count(influxd, database, "thermostat") >= total,
            "ingest stored the day",
            timeout=60,
        )
        assert stored_count(influxd, database, "thermostat") == total

        # Live firings: the alert events (raised/cleared at their logical times) within the day.
        def live(rule_id: str) -> set[tuple[str, str, int]]:
            out = set()
            for event in listener.events(topics.ALERT_EVENTS):
                if event["rule_id"] == rule_id and start_ms <= event["at"] <= end_ms:
                    kind = "fire" if event["event"] == "raised" else "clear"
                    out.add((event["device_id"], kind, event["at"]))
            return out

        # Let the alert events of the last readings arrive: the listener sees them in publish order,
        # so once the live engine's last event is in, all are.
        expected_events = (
            engine.metrics.alerts.labels("raised")._value.get()
            + engine.metrics.alerts.labels("cleared")._value.get()
        )
        wait(
            lambda: len(listener.events(topics.ALERT_EVENTS)) >= expected_events, "all alert events received"
        )

        summary = {}
        for rule in rules:
            resp = platform.http.post(
                f"/api/v1/rules/{rule['id']}/backtest",
                params={
                    "start": day.isoformat(),
                    "end": datetime.fromtimestamp((end_ms) / 1000, UTC).isoformat(),
                },
            )
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["readings"] == total and body["devices"] == 3
            backtest = {(f["device_id"], f["kind"], f["at_ms"]) for f in body["firings"]}
            assert backtest == live(rule["id"]), rule["name"]
            summary[rule["name"]] = len(backtest)
            if rule["name"] == "hot-for-10m":
                fires = [f for f in body["firings"] if f["kind"] == "fire"]
                assert all(
                    {"command": "set_mode", "args": {"mode": "cool"}, "device_id": f["device_id"]}
                    in f["actions"]
                    for f in fires
                )
                created = [
                    e for e in listener.events(topics.COMMAND_EVENTS, "created") if e["rule_id"] == rule["id"]
                ]
                assert len(created) == len(fires)
        # The day must exercise every rule, or the comparison proves little.
        assert all(count > 0 for count in summary.values()), summary
        print(f"backtest == live: {summary} over {total} readings")
    finally:
        for device in devices:
            device.disconnect()
        listener.close()


def _json(reading: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(reading)
