"""The shared telemetry admission check: the hostile corpus, bounded rejections, the duplicate test."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from device_registry import legacy_dynsec
from device_registry.broker_admin import MAX_CHUNK
from device_registry.presence import Presence
from iotfleet import admission as a
from iotfleet.catalogue import get_device_type
from iotfleet.settings import IngestSettings, MqttSettings
from iotfleet.stack.configs import broker_packet_limit
from rules_engine.store import StateStore
from tests.hostile_support import ACCEPTED, Case, corpus, good_reading

THERMO = get_device_type("thermostat")
NOW_MS = time.time_ns() // 1_000_000
LIMITS = a.Limits.from_settings(IngestSettings())
ADMISSION = a.Admission(THERMO, LIMITS)
CORPUS = corpus(NOW_MS)


def outcome(payload: bytes) -> a.Rejected | None:
    try:
        ADMISSION.admit(payload, NOW_MS)
    except a.Rejected as rejected:
        return rejected
    return None


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 60
    assert len({c.name for c in CORPUS}) == len(CORPUS)
    assert len({c.reason for c in CORPUS}) >= 15


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_each_hostile_payload_gets_its_reason_quickly_and_small(case: Case) -> None:
    started = time.perf_counter()
    rejected = outcome(case.payload)
    elapsed = time.perf_counter() - started
    assert (rejected.reason if rejected else ACCEPTED) == case.reason, rejected and rejected.errors[0]
    assert elapsed < 0.5, f"{elapsed:.3f} s"  # loose: milliseconds, on a busy 2-core machine
    if rejected is not None:
        assert 1 <= len(rejected.errors) <= LIMITS.max_errors
        letter = a.dead_letter(
            device_type="thermostat",
            device_id="d",
            received_at_ms=NOW_MS,
            rejected=rejected,
            payload=case.payload,
            max_payload_chars=1024,
        )
        assert len(letter) < 12_000


def test_the_issues_262_kb_array_of_empty_objects_gives_a_small_dead_letter_fast() -> None:
    payload = b"[" + b"{}," * 87_379 + b"{}]"
    assert len(payload) == 262_141
    started = time.perf_counter()
    rejected = outcome(payload)
    assert rejected is not None and rejected.reason == a.BATCH_TOO_LARGE
    letter = orjson.loads(
        a.dead_letter(
            device_type="thermostat",
            device_id="d",
            received_at_ms=NOW_MS,
            rejected=rejected,
            payload=payload,
            max_payload_chars=1024,
        )
    )
    assert time.perf_counter() - started < 0.5  # was 349,520 errors and 28.9 MB
    assert letter["payload_truncated"] and letter["payload_bytes"] == 262_141
    assert len(orjson.dumps(letter)) < 3_000


def test_errors_are_capped_and_the_rest_counted() -> None:
    payload = orjson.dumps({**good_reading(NOW_MS), **{f"k{i}": i for i in range(30)}})
    rejected = outcome(payload)
    assert rejected is not None and rejected.reason == a.UNKNOWN_FIELD
    assert len(rejected.errors) == LIMITS.max_errors and rejected.errors_cut == 30 - LIMITS.max_errors
    letter = orjson.loads(
        a.dead_letter(
            device_type="t",
            device_id="d",
            received_at_ms=NOW_MS,
            rejected=rejected,
            payload=payload,
            max_payload_chars=10,
            max_errors=5,
        )
    )
    assert len(letter["errors"]) == 5 and letter["errors_cut"] == 25


def test_an_object_with_thousands_of_members_is_refused_unparsed() -> None:
    payload = orjson.dumps({**good_reading(NOW_MS), **{f"k{i}": i for i in range(10_000)}})
    started = time.perf_counter()
    rejected = outcome(payload)
    assert time.perf_counter() - started < 0.05  # the parser would build 10,000 errors
    assert rejected is not None and rejected.reason == a.UNKNOWN_FIELD and len(rejected.errors) == 1


def test_an_invalid_batch_stops_at_its_first_invalid_reading() -> None:
    good = good_reading(NOW_MS)
    rejected = outcome(orjson.dumps([good, {**good, "mode": "hot", "humidity_pct": 101}, {"x": 1}]))
    assert rejected is not None
    assert {(e.field, e.reason) for e in rejected.errors} == {
        ("[1].mode", a.INVALID_VALUE),
        ("[1].humidity_pct", a.OUT_OF_RANGE),
    }


@pytest.mark.parametrize(
    "payload",
    [
        orjson.dumps(good_reading(NOW_MS)),
        json.dumps(good_reading(NOW_MS)).encode(),  # "key": value, ", " separators
        json.dumps(good_reading(NOW_MS), indent=2).encode(),  # pretty-printed: the exact path
        orjson.dumps([good_reading(NOW_MS, seq) for seq in range(1_000)]),
        orjson.dumps({**good_reading(NOW_MS), "ts": datetime.fromtimestamp(NOW_MS / 1000, UTC).isoformat()}),
        orjson.dumps({k: v for k, v in good_reading(NOW_MS).items() if k not in ("ts", "seq")}),
        orjson.dumps(good_reading(NOW_MS)).replace(b'"heat"', b'"h\\u0065at"'),
    ],
)
def test_valid_payloads_are_admitted(payload: bytes) -> None:
    assert outcome(payload) is None


@pytest.mark.parametrize(
    "fields",
    [
        '"seq":2,"seq":3',
        '"seq":2, "seq" : 3',
        '"seq":2,\n"seq":3',
        '"seq":2,"s\\u0065q":3',
        '"mode":"heat","mode":"cool"',
    ],
)
def test_duplicate_keys_are_found_whatever_the_spelling(fields: str) -> None:
    body = (
        '{"ts":' + str(NOW_MS) + ',"temperature_c":21.5,"humidity_pct":40.0,"setpoint_c":21.0,' + fields + "}"
    )
    if '"mode"' not in fields:
        body = body[:-1] + ',"mode":"heat"}'
    rejected = outcome(body.encode())
    assert rejected is not None and rejected.reason == a.DUPLICATE_KEY


def test_structure_ignores_brackets_in_strings() -> None:
    assert a.structure(b'{"a":"[[[[[[[[[[[[[[","b":"\\"[[[,,"}', 8) == (1, 1, 1, False)
    assert a.structure(b"[{},{},[1,[2]]]", 8) == (3, 2, 3, True)
    assert a.structure(b"[[],[[],[[]]]]", 8).depth == 4  # no run of brackets: the passes count
    assert a.structure(b"[" * 20 + b"]" * 20, 8)[0] == 9  # capped at max_depth + 1


def test_limits_come_from_the_ingest_settings() -> None:
    settings = IngestSettings(
        max_payload_bytes=1_000, max_depth=3, max_readings_per_payload=2, deadletter_max_errors=4
    )
    limits = a.Limits.from_settings(settings)
    assert (limits.max_payload_bytes, limits.max_depth, limits.max_readings, limits.max_errors) == (
        1_000,
        3,
        2,
        4,
    )
    small = a.Admission(THERMO, limits)
    with pytest.raises(a.Rejected) as info:
        small.admit(orjson.dumps([good_reading(NOW_MS)] * 3), NOW_MS)
    assert info.value.reason == a.BATCH_TOO_LARGE


def test_the_state_store_forgets_last_seen_times_past_the_window(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    store.save_last_seen([("thermostat", "poisoned", 4_102_444_800_000), ("thermostat", "fine", NOW_MS)])
    assert store.forget_last_seen_after(NOW_MS + 300_000) == 1
    assert store.load()[1] == {("thermostat", "fine"): NOW_MS}
    store.close()


class _Message:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload, self.retain = topic, payload, False


def test_presence_counts_oversized_telemetry_as_seen_without_parsing_it() -> None:
    registry = CollectorRegistry()
    presence = Presence(MqttSettings(), sessions=None, metrics=registry, max_payload_bytes=100)  # type: ignore[arg-type]
    presence._on_message(_Message("devices/thermostat/d1/telemetry", b"[" * 1_000))  # type: ignore[arg-type]
    presence._on_message(_Message("devices/thermostat/d2/telemetry", b"{}"))  # type: ignore[arg-type]
    assert set(presence._seen) == {"d1", "d2"}
    assert (
        registry.get_sample_value("registry_presence_messages_total", {"channel": "telemetry_oversized"}) == 1
    )
    assert registry.get_sample_value("registry_presence_messages_total", {"channel": "telemetry"}) == 2


def test_the_largest_dynsec_control_message_fits_the_broker_packet_limit() -> None:
    commands: list[dict[str, object]] = []
    for i in range(MAX_CHUNK):
        # Devices live in the agent's file now: the registry's dynsec messages are the upgrade path's.
        commands += legacy_dynsec.delete_commands(f"{'d' * 60}{i:04d}")
    batch = [{**c, "correlationData": f"{'a' * 16}:{i}"} for i, c in enumerate(commands[:MAX_CHUNK])]
    size = len(json.dumps({"commands": batch}))
    limit = broker_packet_limit(IngestSettings().max_payload_bytes)
    assert size < limit - 64 * 1024, (size, limit)
    assert broker_packet_limit(1_000) >= 512 * 1024  # a small telemetry limit never squeezes the platform
    assert broker_packet_limit(1024 * 1024) == 2 * 1024 * 1024 + 64 * 1024


@pytest.mark.parametrize(
    "body",
    [
        '{"ts":"%s","seq":2,"seq":3,"temperature_c":21.5,"humidity_pct":40.0,"setpoint_c":21.0,"mode":"heat"}',
        '{"ts": "%s", "seq": 2, "seq": 3, "temperature_c": 21.5, "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "heat"}',
        '{"ts":"%s","seq" :2,"seq":3,"temperature_c":21.5,"humidity_pct":40.0,"setpoint_c":21.0,"mode":"heat"}',
        '{"ts":"%s","mode":":","mode":"heat","seq":2,"temperature_c":21.5,"humidity_pct":40.0,"setpoint_c":21.0}',
    ],
)
def test_duplicates_are_found_next_to_colons_in_values(body: str) -> None:
    """An RFC 3339 ts puts colons inside a string: the cheap tests must not be fooled by them."""
    iso = datetime.fromtimestamp(NOW_MS / 1000, UTC).isoformat()
    rejected = outcome(body.replace("%s", iso).encode())
    assert rejected is not None and rejected.reason == a.DUPLICATE_KEY
    if '"mode":":"' not in body:  # without the duplicate, the same payload is admitted
        assert (
            outcome(body.replace("%s", iso).replace('"seq":3,', "").replace('"seq": 3, ', "").encode())
            is None
        )
