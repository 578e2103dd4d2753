"""Telemetry admission: the one check every consumer of device telemetry runs before acting on it.

The ingest stores what this admits and dead-letters the rest; the rules engine
evaluates only what this admits (and skips the rest with the same reason); the
registry's presence follower uses its size check. So what the ingest refuses, no
other service acts on — with the same code and the same settings
(``IOTFLEET_INGEST__*``, see :class:`Limits`).

A payload (one reading or a JSON array of readings) is admitted or rejected as a
whole. The checks, in order, each bounded in time and memory before the next:

1. size (``max_payload_bytes``), before anything is parsed;
2. structure, only when the payload holds more ``{``/``[`` than a batch may have
   readings: nesting depth (``max_depth``) and batch length (``max_readings``),
   both at C speed (no Python loop per byte), so a 256 KiB ``[{},{},…]`` is
   refused in about a millisecond instead of producing 300,000 validation errors;
3. schema: the catalogue model (strict, no unknown fields, physical ranges,
   finite numbers), straight from the JSON bytes;
4. duplicate keys (JSON parsers keep the last one silently): a cheap exact test
   on the admitted readings, with a full re-parse only when it is inconclusive
   (docs/benchmarks.md, "Telemetry admission cost");
5. time window: device time no further than ``max_future_ms`` ahead or
   ``max_past_ms`` behind the consumer's clock.

A rejection carries every error found, capped at ``max_errors`` (the rest is
counted, not listed): a dead letter stays small whatever the payload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from iotfleet.catalogue import DeviceType, Reading, State
from iotfleet.settings import IngestSettings

# Rejection reasons: the `reason` label of the rejected/skipped counters and the dead letter's
# `reason`; stable names (a public contract: operators alert on them).
PAYLOAD_TOO_LARGE = "payload_too_large"
TOO_DEEP = "too_deep"
BATCH_TOO_LARGE = "batch_too_large"
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
WRONG_SHAPE = "wrong_shape"
EMPTY_BATCH = "empty_batch"
DUPLICATE_KEY = "duplicate_key"
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
    TOO_DEEP,
    BATCH_TOO_LARGE,
    INVALID_UTF8,
    NOT_JSON,
    WRONG_SHAPE,
    EMPTY_BATCH,
    DUPLICATE_KEY,
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
class Limits:
    """The admission settings; every consumer builds them from the same ``IngestSettings``."""

    max_payload_bytes: int = 256 * 1024
    max_depth: int = 8
    max_readings: int = 1_000
    max_future_ms: int = 300_000
    max_past_ms: int = 30 * 86_400_000
    max_errors: int = 20

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> Limits:
        return cls(
            max_payload_bytes=settings.max_payload_bytes,
            max_depth=settings.max_depth,
            max_readings=settings.max_readings_per_payload,
            max_future_ms=settings.max_future_s * 1000,
            max_past_ms=settings.max_past_s * 1000,
            max_errors=settings.deadletter_max_errors,
        )


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str
    reason: str

    def as_json(self) -> dict[str, str]:
        # A field is named after the payload's own key, which may be 200 KB long: both are cut.
        return {"field": _cut(self.field, 256), "message": _cut(self.message, 1024), "reason": self.reason}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class Rejected(Exception):
    """A payload that cannot be admitted, with the errors found (at most a bounded number)."""

    def __init__(self, errors: Sequence[FieldError], *, total: int | None = None) -> None:
        super().__init__(errors[0].message if errors else "rejected")
        self.errors = list(errors)
        self.total = max(total if total is not None else len(self.errors), len(self.errors))
        """How many errors there were, including those not listed."""

    @property
    def reason(self) -> str:
        """The reason the payload is counted under: its first error's."""
        return self.errors[0].reason

    @property
    def errors_cut(self) -> int:
        return self.total - len(self.errors)

    def capped(self, max_errors: int) -> Rejected:
        """The same rejection listing at most ``max_errors`` errors (at least one)."""
        keep = max(1, max_errors)
        if len(self.errors) <= keep:
            return self
        return Rejected(self.errors[:keep], total=self.total)

    @classmethod
    def one(cls, reason: str, message: str, field: str = "payload") -> Rejected:
        return cls([FieldError(field, message, reason)])


# --- structure (C-speed passes over the bytes) ------------------------------------------------

_KEEP_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # delete every byte but brackets
_BRACES_TO_BRACKETS = bytes.maketrans(b"{}", b"[]")


def _outside_strings(payload: bytes) -> bytes:
    """The payload with its JSON strings cut out, by bytes operations only (no per-byte Python).

    Escaped backslashes, then escaped quotes, are removed first (left to right, as JSON reads
    them); every remaining quote then opens or closes a string, so the even pieces between
    quotes are what lies outside strings. Malformed input gives some other skeleton: the parser
    names the real error afterwards.
    """
    if b"\\\\" in payload:
        payload = payload.replace(b"\\\\", b"")
    if b'\\"' in payload:
        payload = payload.replace(b'\\"', b"")
    if b'"' not in payload:
        return payload
    return b"".join(payload.split(b'"')[::2])


class Shape(NamedTuple):
    depth: int
    """Nesting depth, capped at ``max_depth + 1``."""
    objects: int
    """JSON objects outside strings."""
    commas: int
    """Commas outside strings: members and items, minus one per group."""
    is_array: bool


def structure(payload: bytes, max_depth: int) -> Shape:
    """The payload's shape, from bytes operations only (no per-byte Python).

    Brackets outside strings are kept and ``{}`` mapped to ``[]``. A run of ``max_depth + 1``
    opening brackets is too deep at once; otherwise each pass of ``bytes.replace(b"[]", b"")``
    removes exactly the innermost groups (replace does not rescan what it produced): one pass
    per nesting level, at most ``max_depth + 1`` passes. A 256 KiB ``[{},{},…]`` or
    ``[[[…]]]`` takes a millisecond or two.
    """
    outside = _outside_strings(payload)
    brackets = outside.translate(None, _KEEP_BRACKETS)
    groups = brackets.translate(_BRACES_TO_BRACKETS)
    depth = 0
    if b"[" * (max_depth + 1) in groups:
        depth = max_depth + 1
    while groups and depth <= max_depth:
        reduced = groups.replace(b"[]", b"")
        if len(reduced) == len(groups):
            break  # unbalanced: not JSON, the parser says so
        depth += 1
        groups = reduced
    return Shape(min(depth, max_depth + 1), brackets.count(b"{"), outside.count(b","), brackets[:1] == b"[")


def check_structure(payload: bytes, limits: Limits, max_members: int) -> None:
    """Refuse what is too deep, too long, or holds objects too large to be readings, unparsed."""
    shape = structure(payload, limits.max_depth)
    if shape.depth > limits.max_depth:
        raise Rejected.one(TOO_DEEP, f"JSON nested deeper than {limits.max_depth} levels")
    if shape.is_array and shape.objects > limits.max_readings:
        # Readings are flat objects: more objects than readings allowed means a batch that is too
        # long (or readings with nested objects, invalid too); refused before any of them is parsed.
        raise Rejected.one(
            BATCH_TOO_LARGE,
            f"array holding {shape.objects} JSON objects exceeds the limit of {limits.max_readings}"
            " readings per message",
        )
    members = shape.commas + 1
    if shape.objects and shape.depth <= 2 and members > shape.objects * max_members:
        # Flat objects with (on average) far more members than a reading has fields: unknown keys
        # (or duplicates); refused before the parser builds an error for each of them.
        raise Rejected.one(
            UNKNOWN_FIELD,
            f"{members} members in {shape.objects} object(s): a reading has at most"
            f" {max_members} members here",
        )


# --- schema errors -----------------------------------------------------------------------------


def _reason_of(error_type: str, at_root: bool) -> str:
    if error_type == "missing":
        return MISSING_FIELD
    if error_type == "extra_forbidden":
        return UNKNOWN_FIELD
    if error_type in _RANGE_ERRORS:
        return OUT_OF_RANGE
    if error_type == "too_long" and at_root:
        return BATCH_TOO_LARGE
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


def explain(exc: ValidationError, payload: bytes, max_errors: int = 1_000_000) -> Rejected:
    """Precise errors, at most ``max_errors``, from a failed validation of the payload against the
    model its shape chose: ``list[Model]`` for an array, ``Model`` for anything else."""
    raw = exc.errors(include_url=False, include_context=False, include_input=False)
    if raw and raw[0]["type"] == "json_invalid":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Rejected.one(INVALID_UTF8, f"payload is not valid UTF-8: {bad.reason} at byte {bad.start}")
        message = str(raw[0]["msg"])
        if "recursion limit" in message:  # the parser's own limit, deeper than max_depth
            return Rejected.one(TOO_DEEP, f"JSON nested too deep: {message}")
        if "number out of range" in message:  # an integer of thousands of digits
            return Rejected.one(OUT_OF_RANGE, f"number out of range: {message}")
        return Rejected.one(NOT_JSON, f"payload is not JSON: {message}")
    is_array = payload.lstrip()[:1] == b"["
    if not is_array and payload.lstrip()[:1] != b"{":
        return Rejected.one(
            WRONG_SHAPE, "payload must be a JSON object (one reading) or an array of readings"
        )
    errors: list[FieldError] = []
    for err in raw[:max_errors]:
        loc = err["loc"]
        at_root = not loc or (is_array and len(loc) == 1 and isinstance(loc[0], int))
        errors.append(FieldError(_field_path(loc), str(err["msg"]), _reason_of(str(err["type"]), at_root)))
    if not errors:  # never expected; still give the caller a reason
        errors.append(FieldError("payload", str(exc).splitlines()[0], INVALID_VALUE))
    return Rejected(errors, total=len(raw))


# --- duplicate keys ----------------------------------------------------------------------------


_WHITESPACE = b" \t\n\r"
_QUOTE_WHITESPACE = (b'" ', b'"\t', b'"\n', b'"\r')


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return result


def find_duplicate_key(payload: bytes) -> str | None:
    """The first key that appears twice in one JSON object of the payload, or None (exact, slow)."""
    try:
        json.loads(payload, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as dup:
        return dup.key
    except (ValueError, RecursionError):
        return None  # not JSON: the schema check has already said so
    return None


# --- the check ---------------------------------------------------------------------------------


class Admission:
    """Admission of one device type's telemetry under one set of limits."""

    def __init__(self, device_type: DeviceType, limits: Limits) -> None:
        if limits.max_depth < 2:
            raise ValueError("max_depth must be at least 2 (an array of reading objects)")
        self.device_type = device_type
        self.limits = limits
        # The catalogue's model, chosen by the payload's first byte (a union would first build the
        # whole document as Python objects: 100 ms for 87,000 empty arrays, 3 ms this way), with
        # the batch length bounded and fail-fast inside the parser: an invalid batch stops at its
        # first invalid reading (a 7 KB array of 900 bad readings: 0.2 ms instead of 19 ms and
        # 4,500 errors).
        self._one: TypeAdapter[Reading] = TypeAdapter(device_type.reading)
        # Members an object may have before it is refused unparsed: far more than a reading's fields
        # (so that a duplicate or two is still named as such by the exact checks).
        self._max_members = 4 * len(device_type.reading.model_fields) + 16
        batch: Any = Annotated[
            list[device_type.reading],  # type: ignore[name-defined]
            Field(max_length=limits.max_readings, fail_fast=True),
        ]
        self._batch: TypeAdapter[list[Reading]] = TypeAdapter(batch)

    def admit(self, payload: bytes, now_ms: int) -> list[Reading]:
        """The payload's readings (at least one), every check passed; else raise Rejected (capped)."""
        try:
            return self._admit(payload, now_ms)
        except Rejected as rejected:
            raise rejected.capped(self.limits.max_errors) from None

    def _admit(self, payload: bytes, now_ms: int) -> list[Reading]:
        limits = self.limits
        if len(payload) > limits.max_payload_bytes:
            raise Rejected.one(
                PAYLOAD_TOO_LARGE,
                f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes} bytes",
            )
        # Payloads that could be too long, too deep, or objects with thousands of members get the
        # structure pass (bytes operations); a payload of 1 KiB cannot be any of those expensively,
        # and the parser bounds its own nesting: then nothing is even counted.
        checked = len(payload) > 1024 and (
            payload.count(b"{") + payload.count(b"[") > limits.max_readings + 1
            or payload.count(b",") > max(1, payload.count(b"{")) * self._max_members
        )
        if checked:
            check_structure(payload, limits, self._max_members)
        try:
            if payload.lstrip()[:1] == b"[":
                readings = self._batch.validate_json(payload)
            else:
                readings = [self._one.validate_json(payload)]
        except ValidationError as exc:
            if not checked:  # too deep is the better reason than "not JSON: recursion limit"
                check_structure(payload, limits, self._max_members)
            raise explain(exc, payload, limits.max_errors) from None
        if not readings:
            raise Rejected.one(EMPTY_BATCH, "empty array: a batch needs at least one reading")
        self._check_duplicates(payload, readings)
        self._check_times(readings, now_ms)
        return readings

    def _check_duplicates(self, payload: bytes, readings: Sequence[Reading]) -> None:
        # Exact without a parse in the common case. With no backslash in the payload a string
        # cannot hold a quote, so every `"` delimits a string, and a string directly followed by
        # `:` is a key. If no key is followed by whitespace before its colon, the count of `":`
        # is at least the number of keys written (an opening quote followed by `:`, as in the
        # value ":x", only adds to it). The schema admitted only known keys and each reading's
        # distinct keys are its fields_set, so a duplicate makes the count exceed their sum.
        # "No whitespace before a colon" is shown the cheapest way that applies: every colon
        # preceded by a quote (no colon in a value: epoch-ms ts), or no whitespace at all
        # (compact JSON), or no quote followed by whitespace. Anything else (escapes, `"key" :`)
        # goes to the exact re-parse. Measured in docs/benchmarks.md ("Telemetry admission cost").
        if b"\\" not in payload:
            written = payload.count(b'":')
            if len(readings) == 1:
                fields = len(readings[0].__pydantic_fields_set__)
            else:
                fields = sum(len(r.__pydantic_fields_set__) for r in readings)
            if written == fields and (
                written == payload.count(b":")
                or len(payload.translate(None, _WHITESPACE)) == len(payload)
                or not any(pair in payload for pair in _QUOTE_WHITESPACE)
            ):
                return
        key = find_duplicate_key(payload)
        if key is not None:
            raise Rejected.one(DUPLICATE_KEY, f"key {key!r} appears twice in one object", key)

    def _check_times(self, readings: Sequence[Reading], now_ms: int) -> None:
        lo = now_ms - self.limits.max_past_ms
        hi = now_ms + self.limits.max_future_ms
        for reading in readings:
            ts = reading.ts
            if ts is not None and not lo <= ts <= hi:
                limits = self.limits
                check_times(readings, now_ms, limits.max_future_ms, limits.max_past_ms, limits.max_errors)


class StateAdmission:
    """Admission of a device's reported state (``state/reported``) under the telemetry's limits.

    The same walls as a reading, in the same order: size before parsing, structure (nesting depth,
    members) at C speed, the catalogue's state model (strict, no unknown fields, ranges, finite
    numbers) straight from the bytes, then duplicate keys. A report is one flat JSON object: a
    partial document of the state model where ``null`` removes a field (JSON merge patch).
    """

    def __init__(self, device_type: DeviceType, limits: Limits) -> None:
        if device_type.state is None:
            raise ValueError(f"device type {device_type.name!r} has no state model")
        self.device_type = device_type
        self.limits = limits
        self._adapter: TypeAdapter[State] = TypeAdapter(device_type.state)
        self._max_members = 4 * len(device_type.state.model_fields) + 16

    def admit(self, payload: bytes) -> dict[str, Any]:
        """The report as a merge patch (fields it sets, ``None`` for those it removes); else raise
        Rejected (capped)."""
        try:
            return self._admit(payload)
        except Rejected as rejected:
            raise rejected.capped(self.limits.max_errors) from None

    def _admit(self, payload: bytes) -> dict[str, Any]:
        limits = self.limits
        if len(payload) > limits.max_payload_bytes:
            raise Rejected.one(
                PAYLOAD_TOO_LARGE,
                f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes} bytes",
            )
        if len(payload) > 1024:
            check_structure(payload, limits, self._max_members)
        if payload.lstrip()[:1] != b"{":
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise Rejected.one(
                    INVALID_UTF8, f"payload is not valid UTF-8: {bad.reason} at byte {bad.start}"
                ) from None
            raise Rejected.one(WRONG_SHAPE, "a reported state is one JSON object (fields of the state model)")
        try:
            state = self._adapter.validate_json(payload)
        except ValidationError as exc:
            raise explain(exc, payload, limits.max_errors) from None
        # Reports are small (a few fields): the exact duplicate check costs microseconds.
        key = find_duplicate_key(payload)
        if key is not None:
            raise Rejected.one(DUPLICATE_KEY, f"key {key!r} appears twice in one object", key)
        return state.model_dump(mode="json", exclude_unset=True)


def check_times(
    readings: Sequence[Reading],
    now_ms: int,
    max_future_ms: int,
    max_past_ms: int,
    max_errors: int = 1_000_000,
) -> None:
    """Raise Rejected naming each reading whose device time is too far in the future or past
    (the first ``max_errors`` of them; the others are counted)."""
    errors: list[FieldError] = []
    total = 0
    batch = len(readings) > 1
    lo, hi = now_ms - max_past_ms, now_ms + max_future_ms
    for index, reading in enumerate(readings):
        ts = reading.ts
        if ts is None or lo <= ts <= hi:
            continue
        total += 1
        if len(errors) >= max_errors:
            continue
        field = f"[{index}].ts" if batch else "ts"
        if ts > hi:
            errors.append(
                FieldError(
                    field,
                    f"ts {_iso(ts)} is {(ts - now_ms) / 1000:.0f} s in the future "
                    f"(limit {max_future_ms // 1000} s)",
                    TS_IN_FUTURE,
                )
            )
        else:
            errors.append(
                FieldError(
                    field,
                    f"ts {_iso(ts)} is {(now_ms - ts) / 1000:.0f} s in the past (limit {max_past_ms // 1000} s)",
                    TS_TOO_OLD,
                )
            )
    if errors:
        raise Rejected(errors, total=total)


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
    max_errors: int = 20,
) -> bytes:
    """The public dead-letter body: who, when, the errors (capped) and the original payload, truncated."""
    head = payload[: max_payload_chars * 4]  # a char is at most 4 UTF-8 bytes
    # backslashreplace keeps invalid bytes visible (\xff) instead of turning them into U+FFFD.
    decoded = head.decode("utf-8", errors="backslashreplace")
    text = decoded[:max_payload_chars]
    shown = rejected.capped(max_errors)
    body: dict[str, Any] = {
        "device_id": device_id,
        "device_type": device_type,
        "received_at": _iso(received_at_ms),
        "reason": rejected.reason,
        "errors": [error.as_json() for error in shown.errors],
        "errors_cut": shown.errors_cut,
        "payload": text,
        "payload_bytes": len(payload),
        "payload_truncated": len(head) < len(payload) or len(text) < len(decoded),
    }
    return orjson.dumps(body)


_SEQ = re.compile(rb'"seq"\s*:\s*(\d{1,19})')


def device_error(
    *,
    received_at_ms: int,
    rejected: Rejected,
    payload: bytes,
    max_errors: int = 20,
    channel: str | None = None,
) -> bytes:
    """What the device learns on its own ``errors`` topic: the reading's seq, the reason and the errors.

    The seq is looked up in the first 4 KiB of the payload without parsing it (a rejected payload
    may not be JSON): the first reading's, for a batch; the errors' field paths say which reading.
    ``channel`` names the refused message's channel when it is not telemetry (``state/reported``).
    """
    found = _SEQ.search(payload[:4096])
    shown = rejected.capped(max_errors)
    body: dict[str, Any] = {} if channel is None else {"channel": channel}
    body |= {
        "seq": int(found.group(1)) if found else None,
        "reason": rejected.reason,
        "errors": [error.as_json() for error in shown.errors],
        "errors_cut": shown.errors_cut,
        "received_at": _iso(received_at_ms),
    }
    return orjson.dumps(body)


def parse(device_type: DeviceType, payload: bytes, *, max_payload_bytes: int) -> list[Reading]:
    """Size, structure, schema and duplicate checks without the time window (kept for callers of
    the ingest's former ``validation.parse``); raise Rejected."""
    limits = Limits(max_payload_bytes=max_payload_bytes, max_future_ms=2**62, max_past_ms=2**62)
    return Admission(device_type, limits).admit(payload, 0)
