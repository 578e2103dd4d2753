"""Turning a raw telemetry payload into readings, or into precise, countable rejection reasons.

A payload (one reading or a JSON array of readings) is accepted or rejected as
a whole: a device that resends a corrected batch then gets each reading stored
exactly once, never half of a batch twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from iotfleet.catalogue import DeviceType, Reading

# Rejection reasons: the `reason` label of the rejected-readings counter, stable names.
PAYLOAD_TOO_LARGE = "payload_too_large"
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
WRONG_SHAPE = "wrong_shape"
EMPTY_BATCH = "empty_batch"
MISSING_FIELD = "missing_field"
UNKNOWN_FIELD = "unknown_field"
WRONG_TYPE = "wrong_type"
OUT_OF_RANGE = "out_of_range"
INVALID_VALUE = "invalid_value"
TS_IN_FUTURE = "ts_in_future"
TS_TOO_OLD = "ts_too_old"
UNKNOWN_DEVICE_TYPE = "unknown_device_type"
BAD_TOPIC = "bad_topic"
STORAGE_REFUSED = "storage_refused"

REASONS = (
    PAYLOAD_TOO_LARGE,
    INVALID_UTF8,
    NOT_JSON,
    WRONG_SHAPE,
    EMPTY_BATCH,
    MISSING_FIELD,
    UNKNOWN_FIELD,
    WRONG_TYPE,
    OUT_OF_RANGE,
    INVALID_VALUE,
    TS_IN_FUTURE,
    TS_TOO_OLD,
    UNKNOWN_DEVICE_TYPE,
    BAD_TOPIC,
    STORAGE_REFUSED,
)

_RANGE_ERRORS = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of", "finite_number"}
)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "reason": self.reason}


class Rejected(Exception):
    """A payload that cannot be stored, with every error found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__(errors[0].message if errors else "rejected")
        self.errors = list(errors)

    @property
    def reason(self) -> str:
        """The reason the payload is counted under: its first error's."""
        return self.errors[0].reason

    @classmethod
    def one(cls, reason: str, message: str, field: str = "payload") -> Rejected:
        return cls([FieldError(field, message, reason)])


def _reason_of(error_type: str, at_root: bool) -> str:
    if error_type == "missing":
        return MISSING_FIELD
    if error_type == "extra_forbidden":
        return UNKNOWN_FIELD
    if error_type in _RANGE_ERRORS:
        return OUT_OF_RANGE
    if at_root and error_type in ("model_type", "list_type", "model_attributes_type", "dict_type"):
        return WRONG_SHAPE
    if error_type.endswith("_type") or error_type.endswith("_parsing"):
        return WRONG_TYPE
    return INVALID_VALUE  # literal_error, value_error (a bad RFC 3339 ts), ...


def _field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "payload"


def explain(exc: ValidationError, payload: bytes) -> Rejected:
    """Precise errors from a failed validation of ``list[Model] | Model``.

    The union reports both branches; only the branch the payload's shape chose
    (array or object) says something useful, so the other one is dropped.
    """
    raw = exc.errors(include_url=False, include_context=False, include_input=False)
    if raw and raw[0]["type"] == "json_invalid":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Rejected.one(INVALID_UTF8, f"payload is not valid UTF-8: {bad.reason} at byte {bad.start}")
        return Rejected.one(NOT_JSON, f"payload is not JSON: {raw[0]['msg']}")
    is_array = payload.lstrip()[:1] == b"["
    is_object = payload.lstrip()[:1] == b"{"
    if not (is_array or is_object):
        return Rejected.one(
            WRONG_SHAPE, "payload must be a JSON object (one reading) or an array of readings"
        )
    errors: list[FieldError] = []
    for err in raw:
        loc = err["loc"]
        branch = str(loc[0]) if loc else ""
        if branch.startswith("list[") != is_array:
            continue
        rest = loc[1:]
        at_root = not rest or (is_array and len(rest) == 1 and isinstance(rest[0], int))
        errors.append(FieldError(_field_path(rest), str(err["msg"]), _reason_of(str(err["type"]), at_root)))
    if not errors:  # never expected; still give the caller a reason
        errors.append(FieldError("payload", str(exc).splitlines()[0], INVALID_VALUE))
    return Rejected(errors)


def parse(
    device_type: DeviceType,
    payload: bytes,
    *,
    max_payload_bytes: int,
) -> list[Reading]:
    """Validate a payload into readings; raise Rejected (oversized payloads are never parsed)."""
    if len(payload) > max_payload_bytes:
        raise Rejected.one(
            PAYLOAD_TOO_LARGE,
            f"payload of {len(payload)} bytes exceeds the limit of {max_payload_bytes} bytes",
        )
    try:
        readings = device_type.parse_payload(payload)
    except ValidationError as exc:
        raise explain(exc, payload) from None
    if not readings:
        raise Rejected.one(EMPTY_BATCH, "empty array: a batch needs at least one reading")
    return readings


def check_times(readings: Sequence[Reading], now_ms: int, max_future_ms: int, max_past_ms: int) -> None:
    """Raise Rejected naming each reading whose device time is too far in the future or past."""
    errors: list[FieldError] = []
    batch = len(readings) > 1
    for index, reading in enumerate(readings):
        ts = reading.ts
        if ts is None:
            continue
        field = f"[{index}].ts" if batch else "ts"
        if ts > now_ms + max_future_ms:
            errors.append(
                FieldError(
                    field,
                    f"ts {_iso(ts)} is {(ts - now_ms) / 1000:.0f} s in the future "
                    f"(limit {max_future_ms // 1000} s)",
                    TS_IN_FUTURE,
                )
            )
        elif ts < now_ms - max_past_ms:
            errors.append(
                FieldError(
                    field,
                    f"ts {_iso(ts)} is {(now_ms - ts) / 1000:.0f} s in the past (limit {max_past_ms // 1000} s)",
                    TS_TOO_OLD,
                )
            )
    if errors:
        raise Rejected(errors)


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter(
    *,
    device_type: str,
    device_id: str,
    received_at_ms: int,
    rejected: Rejected,
    payload: bytes,
    max_payload_chars: int,
) -> bytes:
    """The public dead-letter body: who, when, every error and the original payload, truncated."""
    head = payload[: max_payload_chars * 4]  # a char is at most 4 UTF-8 bytes
    # backslashreplace keeps invalid bytes visible (\xff) instead of turning them into U+FFFD.
    decoded = head.decode("utf-8", errors="backslashreplace")
    text = decoded[:max_payload_chars]
    body: dict[str, Any] = {
        "device_id": device_id,
        "device_type": device_type,
        "received_at": _iso(received_at_ms),
        "reason": rejected.reason,
        "errors": [error.as_json() for error in rejected.errors],
        "payload": text,
        "payload_bytes": len(payload),
        "payload_truncated": len(head) < len(payload) or len(text) < len(decoded),
    }
    return orjson.dumps(body)
