"""Backtest: run one rule over stored readings and say when it would have fired and what it would send.

The same ``Evaluator`` the live engine runs, fed from InfluxDB in time order
instead of from MQTT; nothing is published. Clock-driven conditions are
evaluated at their logical deadlines (as live), and once more at ``end``.
Presence conditions cannot be replayed (status history is not stored): they
count as never holding, and the result says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from iotfleet.catalogue import get_device_type
from iotfleet.influx import InfluxClient, quote_identifier, series_rows
from rules_engine.evaluator import Evaluator, Firing, uses_presence
from rules_engine.models import CommandAction, StoredRule
from rules_engine.sources import DeviceEntry, Directory

MAX_READINGS = 1_000_000


class BacktestTooLarge(Exception):
    """More readings in the range than a backtest evaluates at once."""


@dataclass(frozen=True, slots=True)
class StoredReading:
    ts: int
    device_type: str
    device_id: str
    values: Mapping[str, Any]


@dataclass
class BacktestResult:
    readings: int = 0
    devices: int = 0
    firings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _actions(rule: StoredRule, firing: Firing, directory: Directory) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    commands: list[CommandAction] = rule.commands if firing.kind == "fire" else list(rule.on_clear)
    for action in commands:
        for entry in directory.resolve(action.target, rule.scope.device_type, firing.device_id):
            out.append({"command": action.command, "args": action.args, "device_id": entry.device_id})
    if firing.kind == "fire":
        for change in rule.desired_changes:
            for entry in directory.resolve(change.target, rule.scope.device_type, firing.device_id):
                out.append({"set_desired": change.set_desired, "device_id": entry.device_id})
    alert = rule.alert
    if alert is not None:
        if firing.kind == "fire":
            out.append({"alert": {"event": "raised", "severity": alert.severity, "message": alert.message}})
        else:
            out.append({"alert": {"event": "cleared"}})
    return out


def firing_record(rule: StoredRule, firing: Firing, directory: Directory) -> dict[str, Any]:
    return {
        "at": datetime.fromtimestamp(firing.at_ms / 1000, UTC).isoformat().replace("+00:00", "Z"),
        "at_ms": firing.at_ms,
        "device_id": firing.device_id,
        "kind": firing.kind,
        "values": dict(firing.values),
        "actions": _actions(rule, firing, directory),
    }


def run_backtest(
    rule: StoredRule,
    readings: Iterable[StoredReading],
    devices: Iterable[DeviceEntry],
    start_ms: int,
    end_ms: int,
) -> BacktestResult:
    """Evaluate ``rule`` over ``readings`` (any order; sorted here) between start and end."""
    result = BacktestResult()
    directory = Directory()
    directory.replace(devices)
    if rule.schedule is not None:
        return _schedule_backtest(rule, directory, start_ms, end_ms, result)
    evaluator = Evaluator([rule.model_copy(update={"enabled": True})])
    program = evaluator.programs[rule.id]
    if uses_presence(program.when) or (program.clear is not None and uses_presence(program.clear)):
        result.notes.append("presence conditions are not replayed (status history is not stored)")
    firings: list[Firing] = []
    seen: set[str] = set()
    for reading in sorted(readings, key=lambda r: r.ts):
        result.readings += 1
        seen.add(reading.device_id)
        directory.seen(reading.device_type, reading.device_id)
        firings += evaluator.on_reading(
            reading.device_type,
            reading.device_id,
            reading.ts,
            reading.values,
            directory.tags(reading.device_id),
        )
    firings += evaluator.on_tick(end_ms)
    result.devices = len(seen)
    firings.sort(key=lambda f: (f.at_ms, f.device_id, f.kind != "clear"))
    result.firings = [firing_record(rule, f, directory) for f in firings if start_ms <= f.at_ms <= end_ms]
    return result


def _schedule_backtest(
    rule: StoredRule, directory: Directory, start_ms: int, end_ms: int, result: BacktestResult
) -> BacktestResult:
    from apscheduler.triggers.cron import CronTrigger

    assert rule.schedule is not None
    trigger = CronTrigger.from_crontab(rule.schedule.cron, timezone=ZoneInfo(rule.schedule.tz))
    moment = datetime.fromtimestamp(start_ms / 1000, UTC)
    end = datetime.fromtimestamp(end_ms / 1000, UTC)
    previous = None
    for _ in range(10_000):  # bounded: a minutely cron over a week
        fire = trigger.get_next_fire_time(previous, moment)
        if fire is None or fire > end:
            break
        at_ms = int(fire.timestamp() * 1000)
        actions = []
        for action in rule.commands:
            if action.target is not None:
                targets = directory.resolve(action.target, rule.scope.device_type, None)
            else:
                scope = rule.scope
                targets = directory.of_type(scope.device_type, scope.device_ids, scope.tags)
            actions += [
                {"command": action.command, "args": action.args, "device_id": t.device_id} for t in targets
            ]
        result.firings.append(
            {
                "at": fire.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "at_ms": at_ms,
                "device_id": None,
                "kind": "schedule",
                "values": {},
                "actions": actions,
            }
        )
        previous, moment = fire, fire + timedelta(seconds=1)
    return result


async def load_readings(
    influx: InfluxClient, rule: StoredRule, start_ms: int, end_ms: int, limit: int = MAX_READINGS
) -> list[StoredReading]:
    """The readings in scope of ``rule`` between start and end (inclusive), oldest first."""
    device_type = get_device_type(rule.scope.device_type)
    fields = ", ".join(quote_identifier(f) for f in device_type.fields)
    # Integers we computed are safe inline; user-chosen device ids go through bind parameters.
    where = f"time >= {int(start_ms)}ms AND time <= {int(end_ms)}ms"
    params: dict[str, Any] = {}
    if rule.scope.device_ids:
        ors = []
        for index, device_id in enumerate(rule.scope.device_ids[:500]):
            ors.append(f"device_id = $d{index}")
            params[f"d{index}"] = device_id
        where += " AND (" + " OR ".join(ors) + ")"
    query = (
        f"SELECT {fields} FROM {quote_identifier(device_type.name)} WHERE {where} "
        f"GROUP BY device_id ORDER BY time ASC LIMIT {limit + 1}"
    )
    results = await influx.query(query, params=params or None)
    readings = []
    for row in series_rows(results):
        values = {f: row[f] for f in device_type.fields if row.get(f) is not None}
        readings.append(
            StoredReading(int(row["time"]), device_type.name, str(row.get("device_id", "")), values)
        )
        if len(readings) > limit:
            raise BacktestTooLarge(f"more than {limit} readings in the range; narrow start/end")
    return readings
