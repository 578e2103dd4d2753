"""Backtest (pure part) and command targets: what a rule would have sent, to whom."""

from __future__ import annotations

from datetime import UTC, datetime

from rules_engine.backtest import StoredReading, run_backtest
from rules_engine.models import StoredRule, Target
from rules_engine.sources import DeviceEntry, Directory

T0 = int(datetime(2026, 11, 26, tzinfo=UTC).timestamp() * 1000)

DEVICES = [
    DeviceEntry("air_quality", "aq-101", {"room": "101"}),
    DeviceEntry("air_quality", "vent-101", {"room": "101"}),
    DeviceEntry("air_quality", "aq-102", {"room": "102"}),
    DeviceEntry("thermostat", "th-101", {"room": "101"}),
]


def test_targets_resolve_by_tag_same_tag_and_names() -> None:
    directory = Directory()
    directory.replace(DEVICES)
    ids = lambda entries: sorted(e.device_id for e in entries)  # noqa: E731
    assert ids(directory.resolve(None, "air_quality", "aq-101")) == ["aq-101"]
    assert ids(directory.resolve(Target(tag="room=101"), "air_quality", "aq-102")) == ["aq-101", "vent-101"]
    assert ids(directory.resolve(Target(same_tag="room"), "air_quality", "aq-101")) == ["aq-101", "vent-101"]
    assert ids(
        directory.resolve(Target(same_tag="room", device_type="thermostat"), "air_quality", "aq-101")
    ) == ["th-101"]
    assert ids(directory.resolve(Target(devices=["x-1"]), "air_quality", None)) == ["x-1"]
    assert directory.resolve(Target(same_tag="floor"), "air_quality", "aq-101") == []


def test_backtest_reports_firings_with_what_would_be_sent() -> None:
    rule = StoredRule.model_validate(
        {
            "id": "co2",
            "name": "co2-ventilate-room",
            "scope": {"device_type": "air_quality"},
            "when": {"field": "co2_ppm", "op": ">", "value": 1000},
            "then": [
                {"command": "set_ventilation", "args": {"level_pct": 100}, "target": {"same_tag": "room"}},
                {"alert": {"severity": "minor", "message": "stuffy"}},
            ],
            "on_clear": [{"command": "set_ventilation", "args": {"level_pct": 20}}],
        }
    )
    readings = [
        StoredReading(T0 + 60_000 * i, "air_quality", "aq-101", {"co2_ppm": co2})
        for i, co2 in enumerate([800, 1200, 1300, 900])
    ]
    result = run_backtest(rule, readings, DEVICES, T0, T0 + 3_600_000)
    assert result.readings == 4 and result.devices == 1
    fire, clear = result.firings
    assert (fire["kind"], fire["at_ms"], fire["device_id"]) == ("fire", T0 + 60_000, "aq-101")
    assert fire["at"] == "2026-11-26T00:01:00Z"
    sent = sorted(a["device_id"] for a in fire["actions"] if "command" in a)
    assert sent == ["aq-101", "vent-101"]
    assert {"alert": {"event": "raised", "severity": "minor", "message": "stuffy"}} in fire["actions"]
    assert clear["kind"] == "clear"
    assert {"command": "set_ventilation", "args": {"level_pct": 20}, "device_id": "aq-101"} in clear[
        "actions"
    ]


def test_backtest_of_a_schedule_lists_its_runs_in_local_time() -> None:
    rule = StoredRule.model_validate(
        {
            "id": "morning",
            "name": "morning-heat",
            "scope": {"device_type": "thermostat"},
            "schedule": {"cron": "0 7 * * *", "tz": "Europe/Paris"},
            "then": [{"command": "set_mode", "args": {"mode": "heat"}}],
        }
    )
    result = run_backtest(rule, [], DEVICES, T0, T0 + 2 * 86_400_000)
    # 07:00 in Paris is 06:00 UTC in winter.
    assert [f["at"] for f in result.firings] == ["2026-11-26T06:00:00Z", "2026-11-27T06:00:00Z"]
    assert result.firings[0]["actions"] == [
        {"command": "set_mode", "args": {"mode": "heat"}, "device_id": "th-101"}
    ]


def test_backtest_notes_presence_is_not_replayed() -> None:
    rule = StoredRule.model_validate(
        {
            "id": "p",
            "name": "offline",
            "scope": {"device_type": "thermostat"},
            "when": {"presence": "offline"},
            "then": [{"alert": {"severity": "minor"}}],
        }
    )
    result = run_backtest(rule, [], DEVICES, T0, T0 + 1000)
    assert result.firings == [] and "presence" in result.notes[0]
