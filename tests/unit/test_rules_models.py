"""Rule models: the public shape parses as is; invalid rules fail with a message naming the problem."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rules_engine.models import Rule, duration_ms, rule_definition

EXAMPLE = {
    "name": "thermostat-overheat",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30, "for": "10s"},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [
        {"command": "set_mode", "args": {"mode": "cool"}},
        {"alert": {"severity": "major", "message": "overheating"}},
    ],
    "cooldown": "60s",
}


def test_public_example_round_trips() -> None:
    parsed = Rule.model_validate(EXAMPLE)
    definition = rule_definition(parsed)
    for key, value in EXAMPLE.items():
        assert definition[key] == value
    assert Rule.model_validate(definition) == parsed


@pytest.mark.parametrize(
    "when",
    [
        {"all": [{"field": "co2_ppm", "op": ">", "value": 1000}, {"absent_for": "5m"}]},
        {
            "any": [
                {"presence": "offline", "for": "1m"},
                {"field": "voc_index", "op": "outside", "value": [0, 300]},
            ]
        },
        {"field": "co2_ppm", "agg": "mean", "window": "5m", "op": ">", "value": 1000},
        {"field": "co2_ppm", "rate_per": "1m", "op": ">", "value": 200},
        {"absent_for": "5m"},
    ],
)
def test_condition_kinds_parse(when: dict[str, Any]) -> None:
    Rule.model_validate(
        {
            "name": "aq",
            "scope": {"device_type": "air_quality"},
            "when": when,
            "then": [
                {"command": "set_ventilation", "args": {"level_pct": 100}, "target": {"same_tag": "room"}}
            ],
        }
    )


def test_schedule_rule_and_targets() -> None:
    rule = Rule.model_validate(
        {
            "name": "morning",
            "scope": {"device_type": "thermostat"},
            "schedule": {"cron": "0 7 * * *", "tz": "Europe/Paris"},
            "then": [
                {"command": "set_mode", "args": {"mode": "heat"}, "target": {"tag": "room=101"}},
                {
                    "command": "set_setpoint",
                    "args": {"setpoint_c": 21},
                    "target": {"devices": ["t-1", "t-2"]},
                },
            ],
        }
    )
    assert rule.commands[0].target is not None and rule.commands[0].target.tag_pair() == ("room", "101")


BAD = [
    ({**EXAMPLE, "when": {"field": "temp", "op": ">", "value": 1}}, "has no field 'temp'"),
    ({**EXAMPLE, "when": {"field": "mode", "op": ">", "value": 1}}, "not numeric"),
    ({**EXAMPLE, "when": {"field": "temperature_c", "op": ">", "value": 30, "fro": "1s"}}, "Extra inputs"),
    ({**EXAMPLE, "when": {"field": "temperature_c", "op": "between", "value": 3}}, "[low, high]"),
    ({**EXAMPLE, "when": {"field": "temperature_c", "op": "between", "value": [5, 3]}}, "above high"),
    ({**EXAMPLE, "when": {"field": "temperature_c", "op": ">", "value": "hot"}}, "needs a number"),
    (
        {**EXAMPLE, "when": {"field": "temperature_c", "op": ">", "value": 1, "for": "ten"}},
        "invalid duration",
    ),
    ({**EXAMPLE, "when": {"field": "temperature_c", "op": ">", "value": 1, "agg": "mean"}}, "agg and window"),
    ({**EXAMPLE, "when": {"nope": 1}}, "needs one of the keys"),
    ({**EXAMPLE, "then": [{"command": "set_mode", "args": {"mode": "warm"}}]}, "invalid args for 'set_mode'"),
    ({**EXAMPLE, "then": [{"command": "fly", "args": {}}]}, "no command 'fly'"),
    ({**EXAMPLE, "then": []}, "at least 1"),
    ({**EXAMPLE, "scope": {"device_type": "toaster"}}, "unknown device type"),
    ({**EXAMPLE, "schedule": {"cron": "0 7 * * *"}}, "exactly one of when"),
    (
        {**{k: v for k, v in EXAMPLE.items() if k not in ("when", "clear_when")}, "schedule": {"cron": "x"}},
        "cron",
    ),
    (
        {
            **{k: v for k, v in EXAMPLE.items() if k not in ("when", "clear_when")},
            "schedule": {"cron": "0 7 * * *"},
        },
        "alerts need a condition",
    ),
    (
        {**EXAMPLE, "then": [{"command": "set_mode", "args": {"mode": "cool"}, "target": {}}]},
        "exactly one of",
    ),
    ({**EXAMPLE, "cooldown": "0s"}, "positive"),
    ({**EXAMPLE, "name": "bad name!"}, "pattern"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_invalid_rules_are_rejected_with_a_reason(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Rule.model_validate(body)
    assert message in str(info.value)


def test_durations() -> None:
    assert duration_ms("500ms") == 500
    assert duration_ms("10s") == 10_000
    assert duration_ms("1.5m") == 90_000
    assert duration_ms("2h") == 7_200_000
    with pytest.raises(ValueError, match="30 days"):
        duration_ms("31d")
