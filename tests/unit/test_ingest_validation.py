"""Payload validation: every way a payload can be wrong gets a precise field, message and reason."""

from __future__ import annotations

import orjson
import pytest

from iotfleet.catalogue import get_device_type
from telemetry_ingest import validation as v

THERMO = get_device_type("thermostat")
NOW_MS = 1_764_240_000_000
GOOD = {"ts": NOW_MS, "seq": 1, "temperature_c": 21.5, "humidity_pct": 40, "setpoint_c": 20, "mode": "heat"}


def reject(payload: bytes, max_bytes: int = 10_000) -> v.Rejected:
    with pytest.raises(v.Rejected) as info:
        readings = v.parse(THERMO, payload, max_payload_bytes=max_bytes)
        v.check_times(readings, NOW_MS, 300_000, 86_400_000)
    return info.value


def with_(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return orjson.dumps({k: val for k, val in body.items() if val is not ...})


@pytest.mark.parametrize(
    ("payload", "reason", "field", "words"),
    [
        (b"not json", v.NOT_JSON, "payload", "not JSON"),
        (b'{"ts": 1', v.NOT_JSON, "payload", "not JSON"),
        (b"\xff\xfe{}", v.INVALID_UTF8, "payload", "UTF-8"),
        ('{"mode": "h\xe9at"}'.encode("latin-1"), v.INVALID_UTF8, "payload", "UTF-8"),
        (b"42", v.WRONG_SHAPE, "payload", "object"),
        (b'"hello"', v.WRONG_SHAPE, "payload", "object"),
        (b"[1, 2]", v.WRONG_SHAPE, "[0]", "object"),
        (b"[]", v.EMPTY_BATCH, "payload", "empty"),
        (with_(temperature_c="21.5"), v.WRONG_TYPE, "temperature_c", "number"),
        (with_(seq=1.5), v.WRONG_TYPE, "seq", "integer"),
        (with_(temperature_c=200), v.OUT_OF_RANGE, "temperature_c", "85"),
        (with_(humidity_pct=-1), v.OUT_OF_RANGE, "humidity_pct", "0"),
        (with_(mode="hot"), v.INVALID_VALUE, "mode", "'heat'"),
        (with_(setpoint_c=...), v.MISSING_FIELD, "setpoint_c", "required"),
        (with_(colour="red"), v.UNKNOWN_FIELD, "colour", "not permitted"),
        (with_(ts="yesterday"), v.INVALID_VALUE, "ts", "RFC 3339"),
        (with_(ts=NOW_MS // 1000), v.OUT_OF_RANGE, "ts", "greater than"),
        (with_(ts=NOW_MS + 3_600_000), v.TS_IN_FUTURE, "ts", "future"),
        (with_(ts=NOW_MS - 2 * 86_400_000), v.TS_TOO_OLD, "ts", "past"),
    ],
)
def test_rejections_are_precise(payload: bytes, reason: str, field: str, words: str) -> None:
    rejected = reject(payload)
    assert rejected.reason == reason
    assert rejected.errors[0].field == field
    assert words in rejected.errors[0].message


def test_batch_errors_name_the_item_and_every_error() -> None:
    good = dict(GOOD)
    payload = orjson.dumps([good, {**good, "mode": "hot", "humidity_pct": 101}])
    rejected = reject(payload)
    assert {(e.field, e.reason) for e in rejected.errors} == {
        ("[1].mode", v.INVALID_VALUE),
        ("[1].humidity_pct", v.OUT_OF_RANGE),
    }


def test_batch_future_ts_names_the_item() -> None:
    payload = orjson.dumps([GOOD, {**GOOD, "ts": NOW_MS + 3_600_000}])
    assert [(e.field, e.reason) for e in reject(payload).errors] == [("[1].ts", v.TS_IN_FUTURE)]


def test_oversized_payload_is_not_parsed() -> None:
    rejected = reject(b"{" * 2_000, max_bytes=1_000)  # would be NOT_JSON if it were parsed
    assert rejected.reason == v.PAYLOAD_TOO_LARGE
    assert "2000 bytes" in rejected.errors[0].message


def test_valid_single_batch_and_rfc3339() -> None:
    assert len(v.parse(THERMO, orjson.dumps(GOOD), max_payload_bytes=10_000)) == 1
    assert len(v.parse(THERMO, orjson.dumps([GOOD, GOOD]), max_payload_bytes=10_000)) == 2
    (reading,) = v.parse(THERMO, with_(ts="2025-11-27T10:40:00.123Z"), max_payload_bytes=10_000)
    assert reading.ts == 1_764_240_000_123


def test_dead_letter_body_is_the_public_format_and_truncates() -> None:
    payload = b"\xff" + b"x" * 5_000
    body = orjson.loads(
        v.dead_letter(
            device_type="thermostat",
            device_id="t1",
            received_at_ms=NOW_MS,
            rejected=reject(payload),
            payload=payload,
            max_payload_chars=100,
        )
    )
    assert body["device_id"] == "t1"
    assert body["device_type"] == "thermostat"
    assert body["received_at"] == "2025-11-27T10:40:00.000Z"
    assert body["errors"][0]["field"] == "payload"
    assert body["errors"][0]["message"].startswith("payload is not valid UTF-8")
    assert body["reason"] == v.INVALID_UTF8
    assert body["payload"].startswith("\\xffxxx")
    assert len(body["payload"]) == 100
    assert body["payload_truncated"] is True
    assert body["payload_bytes"] == 5_001
