"""Building blocks of the device-type catalogue.

A device type is a pydantic model of its reading plus pydantic models of the
commands it accepts. The models are the wire contract between devices,
simulators, ingest, rules and the registry; their JSON schemas are exported to
the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter

# Device timestamps are epoch milliseconds. Years 2000..2100 bound the value so
# that seconds or microseconds sent by mistake are rejected, not stored 1000x off.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000


def _timestamp_to_ms(value: Any) -> Any:
    """Accept epoch milliseconds or an RFC 3339 string; leave anything else to the int check."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"ts must be epoch milliseconds or an RFC 3339 time, got {value!r}") from exc
        if moment.tzinfo is None:
            raise ValueError("an RFC 3339 ts needs a UTC offset (e.g. 'Z' or '+02:00')")
        return int(moment.astimezone(UTC).timestamp() * 1000)
    return value


TimestampMs = Annotated[int, BeforeValidator(_timestamp_to_ms), Field(ge=MIN_TS_MS, le=MAX_TS_MS)]
"""Epoch milliseconds; an RFC 3339 string is converted on validation."""


class Reading(BaseModel):
    """Base of every reading: a device timestamp and a per-device sequence number.

    Strict: no coercion of "21.5" to 21.5 or of 1 to True, and no unknown fields,
    so a device that drifts from the contract is dead-lettered with a precise
    reason instead of silently stored wrong. Whole: every measured field of a type
    is required (declare none with a default), so a partial reading is dead-lettered
    (``Field required``) and storage, rules and the dashboard can rely on every
    reading carrying every field; a device measuring at different rates repeats
    its last value of the others.
    """

    # allow_inf_nan off: NaN/Infinity (not JSON, but accepted by the parser) and 1e400 are refused
    # as not finite instead of failing a range check with a confusing message, or passing one.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    ts: TimestampMs | None = Field(
        default=None,
        description="Device time: epoch milliseconds or RFC 3339. Missing: the broker arrival time.",
    )
    seq: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="Per-device counter; gaps reveal lost readings."
    )

    META_FIELDS: ClassVar[frozenset[str]] = frozenset({"ts", "seq"})

    def measurements(self) -> dict[str, Any]:
        """The reading's measured fields (everything but ts and seq), as stored in InfluxDB."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in self.META_FIELDS}


class Command(BaseModel):
    """Base of every command's arguments."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Reboot(Command):
    """Restart the device. Every type accepts it."""


class State(BaseModel):
    """Base of every type's configurable state (the device shadow's ``desired``/``reported`` documents).

    Every field is optional: a document holds the fields that were set, and a JSON merge patch
    (RFC 7396) changes some of them. Strict like readings (no coercion, no unknown fields, finite
    numbers), and flat: a document is bounded by its model (a few fields of bounded values).
    ``None`` never reaches a stored document: in a patch it removes the field.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class DeviceType:
    """One entry of the catalogue: a reading model and the commands the type accepts."""

    name: str
    reading: type[Reading]
    commands: Mapping[str, type[Command]]
    description: str = ""
    units: Mapping[str, str] = field(default_factory=dict)
    state: type[State] | None = None
    """The configurable state (device shadow), or None if the type has none."""

    def __post_init__(self) -> None:
        # Every type accepts reboot; a module cannot forget it.
        if "reboot" not in self.commands:
            object.__setattr__(self, "commands", {**self.commands, "reboot": Reboot})

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the measured fields, in declaration order."""
        return tuple(n for n in self.reading.model_fields if n not in Reading.META_FIELDS)

    @cached_property
    def payload_adapter(self) -> TypeAdapter[list[Reading] | Reading]:
        """Validates a telemetry payload (one reading or a JSON array of readings) from bytes."""
        return TypeAdapter(list[self.reading] | self.reading)  # type: ignore[name-defined,arg-type]

    def parse_payload(self, payload: bytes | str) -> list[Reading]:
        """Validate a telemetry payload straight from JSON; raise pydantic.ValidationError if invalid."""
        parsed = self.payload_adapter.validate_json(payload)
        return parsed if isinstance(parsed, list) else [parsed]

    def validate_command(self, name: str, args: Mapping[str, Any] | None) -> Command:
        """Validate a command's arguments; raise KeyError for an unknown command name."""
        model = self.commands[name]
        return model.model_validate(dict(args or {}))

    def reading_schema(self) -> dict[str, Any]:
        return self.reading.model_json_schema()

    def command_schemas(self) -> dict[str, dict[str, Any]]:
        return {name: model.model_json_schema() for name, model in self.commands.items()}

    def schema(self) -> dict[str, Any]:
        """Everything a client needs to talk to this type: reading and command JSON schemas."""
        return {
            "name": self.name,
            "description": self.description,
            "fields": list(self.fields),
            "units": dict(self.units),
            "reading_schema": self.reading_schema(),
            "command_schemas": self.command_schemas(),
            "state_schema": self.state.model_json_schema() if self.state is not None else None,
        }
