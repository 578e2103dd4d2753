"""Partitioned engines, the parts without servers: partitioning, lease planning, the hand-over
buffer's bounds, and a takeover's replay that rebuilds windows without firing again what the
previous owner already acted on (the engine's real evaluator; no database: the takeover is fed
the state a shared store would return)."""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotfleet.errors import ConfigError
from iotfleet.settings import RulesSettings, Settings, load_settings
from rules_engine import wire
from rules_engine.engine import RulesEngine
from rules_engine.evaluator import SavedState
from rules_engine.partitioned import PartitionOwner
from rules_engine.partitioning import HandoverBuffer, fair_share, partition_of, plan_leases, replay_split
from rules_engine.shared_store import Acquired, PartitionState, StoredState, asyncpg_dsn
from rules_engine.sources import FileSource
from rules_engine.store import StateStore

P = 8

HOT = {
    "name": "overheat",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 30},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [{"command": "set_mode", "args": {"mode": "cool"}}],
}
HUMID = {
    "name": "humid-mean",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "humidity_pct", "agg": "mean", "window": "1m", "op": ">", "value": 60},
    "then": [{"command": "set_mode", "args": {"mode": "cool"}}],
}


# --- partitioning and leases -----------------------------------------------------------------


def test_partition_is_crc32_of_the_device_id_and_spreads_devices_evenly() -> None:
    assert partition_of("th-1", P) == zlib.crc32(b"th-1") % P
    counts = Counter(partition_of(f"dev-{i}", P) for i in range(10_000))
    assert set(counts) == set(range(P))
    assert max(counts.values()) < 1.1 * 10_000 / P


def test_fair_share_is_ceil_of_partitions_over_live_engines() -> None:
    assert [fair_share(8, n) for n in (0, 1, 2, 3, 8, 9)] == [8, 8, 4, 3, 1, 1]


def test_plan_takes_free_leases_up_to_the_share_and_gives_back_one_above_it() -> None:
    keys = [("thermostat", p) for p in range(P)]
    # alone: everything free is taken
    assert plan_leases([], keys, {"thermostat": 1}, P).acquire == keys
    # a second engine appeared: the holder of all 8 gives one back per round
    plan = plan_leases(keys, [], {"thermostat": 2}, P)
    assert plan.release == [("thermostat", 7)] and plan.acquire == []
    # the newcomer takes free ones up to its share only
    plan = plan_leases([], keys[:6], {"thermostat": 2}, P)
    assert plan.acquire == keys[:4] and plan.release == []
    # a peer died (its heartbeat expired): the survivor takes its expired leases
    assert plan_leases(keys[:4], keys[4:], {"thermostat": 1}, P).acquire == keys[4:]
    # types are planned apart
    plan = plan_leases([("thermostat", 0)], [("air_quality", 1)], {"thermostat": 1, "air_quality": 1}, 2)
    assert plan.acquire == [("air_quality", 1)]


def test_handover_buffer_is_bounded_by_count_and_age_and_take_removes() -> None:
    now = [100.0]
    buffer = HandoverBuffer(max_age_s=10, max_items=3, clock=lambda: now[0])
    for i in range(5):
        buffer.add(i, ("thermostat", i % 2), f"d{i}", b"{}")
    assert len(buffer) == 3 and buffer.dropped == 2
    assert [b.arrival_ms for b in buffer.items] == [2, 3, 4]  # the oldest were dropped
    taken = buffer.take({("thermostat", 0)})
    assert [b.arrival_ms for b in taken] == [2, 4] and len(buffer) == 1
    assert buffer.take({("thermostat", 0)}) == []  # nothing is replayed twice
    now[0] += 11
    buffer.expire()
    assert len(buffer) == 0 and buffer.dropped == 2  # aged out, not counted as drops
    empty = HandoverBuffer(max_age_s=10, max_items=0)
    empty.add(0, ("thermostat", 0), "d", b"{}")
    assert len(empty) == 0 and empty.dropped == 1


def test_handover_buffer_is_bounded_by_bytes_whatever_devices_send() -> None:
    """A device picks its payloads' size: the byte bound holds the memory, oversize ones are not kept."""
    buffer = HandoverBuffer(max_age_s=10, max_items=1_000, max_bytes=1_000, max_payload_bytes=600)
    buffer.add(0, ("thermostat", 0), "a", b"x" * 700)  # the admission refuses it: not kept
    assert len(buffer) == 0 and buffer.dropped == 1
    for i in range(1, 5):
        buffer.add(i, ("thermostat", 0), "hog", b"x" * 400)
    assert buffer.bytes <= 1_000 and [b.arrival_ms for b in buffer.items] == [3, 4]
    assert buffer.dropped == 3
    buffer.add(5, ("thermostat", 1), "b", b"{}")
    assert buffer.bytes == 802
    buffer.take({("thermostat", 0)})
    assert buffer.bytes == 2 and len(buffer) == 1


def test_replay_split_lets_only_readings_after_the_last_stored_transition_fire() -> None:
    assert replay_split(5, None)
    assert not replay_split(5, 5)
    assert replay_split(6, 5)


def test_partitioned_settings_fail_fast_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLEET_RULES__PARTITIONS", "4")
    with pytest.raises(ConfigError, match="IOTFLEET_RULES__SHARED_STORE_URL"):
        load_settings()
    monkeypatch.setenv("IOTFLEET_RULES__SHARED_STORE_URL", "postgresql://x@127.0.0.1:1/db")
    monkeypatch.setenv("IOTFLEET_RULES__LEASE_TTL_S", "40")
    with pytest.raises(ConfigError, match="IOTFLEET_RULES__HANDOVER_BUFFER_S"):
        load_settings()
    monkeypatch.delenv("IOTFLEET_RULES__LEASE_TTL_S")
    monkeypatch.setenv("IOTFLEET_RULES__DEVICE_TYPES", '["toaster"]')
    with pytest.raises(ConfigError, match="IOTFLEET_RULES__DEVICE_TYPES"):
        load_settings()
    monkeypatch.delenv("IOTFLEET_RULES__DEVICE_TYPES")
    assert load_settings().rules.partitions == 4
    assert RulesSettings().partitions == 0  # the default: one engine, as before


def test_asyncpg_dsn_accepts_the_sqlalchemy_spelling() -> None:
    assert asyncpg_dsn("postgresql+asyncpg://u@h:1/d") == "postgresql://u@h:1/d"
    assert asyncpg_dsn("postgresql://u@h:1/d") == "postgresql://u@h:1/d"


# --- takeover replay ------------------------------------------------------------------------


def reading(ts: int, temperature: float = 21.0, humidity: float = 40.0) -> bytes:
    return orjson.dumps(
        {"ts": ts, "temperature_c": temperature, "humidity_pct": humidity, "setpoint_c": 21.0, "mode": "auto"}
    )


def partitioned_engine(tmp_path: Path, rules: list[dict[str, Any]]) -> tuple[RulesEngine, PartitionOwner]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(orjson.dumps(rules).decode())
    source = FileSource(rules_file)
    settings = Settings(
        state_dir=tmp_path,
        rules=RulesSettings(partitions=P, shared_store_url="postgresql://unused@127.0.0.1:1/x", replica="a"),
    )
    engine = RulesEngine(settings, source, StateStore(tmp_path / "s"))
    engine.apply(source.fetch_rules(), None)
    assert engine.partitions is not None
    return engine, engine.partitions


def queued_firings(owner: PartitionOwner) -> list[tuple[str, str, bool, int]]:
    out = []
    while not owner._writes.empty():
        write = owner._writes.get_nowait()
        out += [(s.state.rule_id, s.state.device_id, s.state.active, s.at_ts) for s in write.states]
    return out


def take(owner: PartitionOwner, device_id: str, states: list[StoredState]) -> tuple[str, int]:
    key = owner.key("thermostat", device_id)
    owner.take(Acquired(key, 2, "dead-engine"), PartitionState(states, {}, []))
    return key


def test_takeover_replays_without_firing_again_what_the_previous_owner_stored(tmp_path: Path) -> None:
    engine, owner = partitioned_engine(tmp_path, [HOT])
    rule_id = next(iter(engine.evaluator.programs))
    base = wire.now_ms() - 60_000
    # Not owned yet: buffered raw. The previous owner acted on r1 (fired) and r2 (cleared).
    for ts, temperature in ((base, 35.0), (base + 10, 20.0), (base + 20, 35.0)):
        engine._handle("devices/thermostat/th-1/telemetry", reading(ts, temperature))
    assert len(owner.buffer) == 3 and not engine.evaluator.devices
    stored = [StoredState(SavedState(rule_id, "th-1", False, base), base + 10)]
    take(owner, "th-1", stored)
    # r1 and r2 warmed only; r3 (after the stored clear) fired, once.
    assert queued_firings(owner) == [(rule_id, "th-1", True, base + 20)]
    assert owner.metrics.replayed.labels("warm")._value.get() == 2
    assert len(owner.buffer) == 0


def test_takeover_fires_what_the_previous_owner_never_stored(tmp_path: Path) -> None:
    engine, owner = partitioned_engine(tmp_path, [HOT])
    rule_id = next(iter(engine.evaluator.programs))
    base = wire.now_ms() - 60_000
    engine._handle("devices/thermostat/th-2/telemetry", reading(base, 35.0))  # died before storing it
    take(owner, "th-2", [])
    assert queued_firings(owner) == [(rule_id, "th-2", True, base)]


def test_takeover_keeps_an_active_rule_active_without_refiring(tmp_path: Path) -> None:
    engine, owner = partitioned_engine(tmp_path, [HOT])
    rule_id = next(iter(engine.evaluator.programs))
    base = wire.now_ms() - 60_000
    for ts in (base, base + 10):
        engine._handle("devices/thermostat/th-3/telemetry", reading(ts, 35.0))
    take(owner, "th-3", [StoredState(SavedState(rule_id, "th-3", True, base), base)])
    assert queued_firings(owner) == []  # base+10 is evaluated but the rule is already active
    engine.on_telemetry("thermostat", "th-3", reading(base + 20, 20.0))
    assert queued_firings(owner) == [(rule_id, "th-3", False, base + 20)]  # and clears later


def test_takeover_rebuilds_a_window_from_the_buffer(tmp_path: Path) -> None:
    engine, owner = partitioned_engine(tmp_path, [HUMID])
    rule_id = next(iter(engine.evaluator.programs))
    base = wire.now_ms() - 60_000
    # The previous owner fired on the mean at base+10 and stored it; the buffer holds the window.
    for ts, humidity in ((base, 90.0), (base + 10, 90.0)):
        engine._handle("devices/thermostat/th-4/telemetry", reading(ts, humidity=humidity))
    take(owner, "th-4", [StoredState(SavedState(rule_id, "th-4", True, base + 10), base + 10)])
    assert queued_firings(owner) == []
    # Without the rebuilt window the mean would be 45 (a clear); with it, 75: still active.
    engine.on_telemetry("thermostat", "th-4", reading(base + 20, humidity=45.0))
    assert queued_firings(owner) == []
    engine.on_telemetry("thermostat", "th-4", reading(base + 30, humidity=0.0))  # mean 56.25
    assert queued_firings(owner) == [(rule_id, "th-4", False, base + 30)]


def test_readings_of_other_partitions_are_buffered_not_evaluated(tmp_path: Path) -> None:
    engine, owner = partitioned_engine(tmp_path, [HOT])
    key = take(owner, "th-5", [])
    other = next(f"x-{i}" for i in range(100) if owner.key("thermostat", f"x-{i}") != key)
    engine._handle(f"devices/thermostat/{other}/telemetry", reading(wire.now_ms(), 35.0))
    engine._handle("devices/thermostat/th-5/telemetry", reading(wire.now_ms(), 35.0))
    # Both kept raw (its own too, for a take-back), only its own evaluated.
    assert [b.device_id for b in owner.buffer.items] == [other, "th-5"]
    assert ("thermostat", "th-5") in engine.evaluator.devices
    assert ("thermostat", other) not in engine.evaluator.devices
    engine.on_status("thermostat", "th-5", False, since_ms=123)
    rule_id = next(iter(engine.evaluator.programs))
    assert queued_firings(owner)[0][:3] == (rule_id, "th-5", True)
    # The partition is lost before that write was stored (e.g. the database was down past the
    # TTL): taken back later, the reading is replayed from the buffer and fires then.
    owner.lose(key, "test", "lost")
    assert ("thermostat", "th-5") not in engine.evaluator.devices
    assert owner.presence[("thermostat", "th-5")] == (False, 123)  # kept for a later takeover
    take(owner, "th-5", [])
    assert [f[:3] for f in queued_firings(owner)] == [(rule_id, "th-5", True)]
    assert [b.device_id for b in owner.buffer.items] == [other]


def command_ids(owner: PartitionOwner) -> list[str]:
    ids = []
    while not owner._writes.empty():
        for topic, payload, _props, _ack in owner._writes.get_nowait().outbox:
            if topic.endswith("/commands"):
                ids.append(orjson.loads(payload)["id"])
    return ids


def test_a_transition_gets_the_same_command_id_in_whichever_engine_evaluates_it(tmp_path: Path) -> None:
    base = wire.now_ms() - 60_000
    found = []
    for name in ("a", "b"):
        engine, owner = partitioned_engine(tmp_path / name, [HOT])
        take(owner, "th-6", [])
        engine.on_telemetry("thermostat", "th-6", reading(base, 35.0))
        found.append(command_ids(owner))
    assert len(found[0]) == 1 and found[0] == found[1]
    # another transition of the same device: another id
    engine, owner = partitioned_engine(tmp_path / "c", [HOT])
    take(owner, "th-6", [])
    engine.on_telemetry("thermostat", "th-6", reading(base + 1, 35.0))
    assert command_ids(owner) != found[0]


def test_takeover_sends_the_outbox_leftovers_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, owner = partitioned_engine(tmp_path, [HOT])
    sent: list[tuple[str, bytes]] = []
    monkeypatch.setattr(
        engine, "publish_held", lambda _hold, topic, payload, _props, _ack: sent.append((topic, payload))
    )
    key = owner.key("thermostat", "th-7")
    leftover = ("devices/thermostat/th-7/commands", b'{"id": "x"}', b"")
    owner.take(Acquired(key, 3, "dead-engine"), PartitionState([], {}, [(41, leftover)]))
    assert sent == [leftover[:2]]
    assert owner.owned[key] == 3


def test_a_rule_looking_back_further_than_the_buffer_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_window = {**HUMID, "name": "humid-hour", "when": {**HUMID["when"], "window": "1h"}}
    held = {**HOT, "name": "hot-held", "when": {"all": [{**HOT["when"], "for": "10m"}]}}
    engine, _owner = partitioned_engine(tmp_path, [HOT, HUMID, long_window, held])
    engine.apply(FileSource(tmp_path / "rules.json").fetch_rules(), None)  # a reload: no repeat
    warnings = [r.getMessage() for r in caplog.records if "HANDOVER_BUFFER_S" in r.getMessage()]
    assert len(warnings) == 3  # humid-mean's 1 min is over the default 30 s too; "overheat" looks back 0
    assert any("humid-mean looks back 60 s" in w for w in warnings)
    assert any("humid-hour looks back 3600 s" in w for w in warnings)
    assert any("hot-held looks back 600 s" in w for w in warnings)
