"""Line protocol for one device type, compiled once so the hot path is a single call per reading.

``iotfleet.influx.encode_point`` is the general encoder (sorted tags, type
dispatch per value). Here the measurement, the tag set of each device and the
field kinds are known in advance, so each reading becomes one f-string: the
tag prefix is cached per device and the field formatters are resolved from the
catalogue model once. The output is byte-for-byte what ``encode_point`` writes for the same tags and
fields (a unit test holds the two together). ``seq`` is stored as an integer field.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from iotfleet.catalogue import DeviceType, Reading
from iotfleet.influx import encode_field_value, escape_measurement, escape_tag

FieldFormatter = Callable[[Any], str]


def _format_float(value: float) -> str:
    # Strict pydantic floats accept JSON ints and convert them to float, so a field is
    # always written as a float: a 21 followed by a 21.5 must not conflict in InfluxDB.
    if not math.isfinite(value):
        raise ValueError(f"InfluxDB cannot store {value!r}")
    return repr(float(value))


def _format_int(value: int) -> str:
    return f"{value}i"


def _format_bool(value: bool) -> str:
    return "true" if value else "false"


def _format_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _formatter_for(annotation: Any) -> FieldFormatter:
    """The formatter of a field from its annotation (Optional unwrapped; Literal of strings = string)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _formatter_for(args[0])
        return encode_field_value  # a real union: dispatch on the value's type
    if origin is Literal:
        kinds = {type(a) for a in typing.get_args(annotation)}
        if kinds == {str}:
            return _format_str
        return encode_field_value
    if annotation is bool:
        return _format_bool
    if annotation is int:
        return _format_int
    if annotation is float:
        return _format_float
    if annotation is str:
        return _format_str
    return encode_field_value


class LineEncoder:
    """Encodes a device type's readings; one instance per ingest process."""

    def __init__(self, device_type: DeviceType, extra_tags: Mapping[str, str] | None = None) -> None:
        self.device_type = device_type
        self._measurement = escape_measurement(device_type.name)
        self._extra_tags = {k: v for k, v in (extra_tags or {}).items() if v != ""}
        if "device_id" in self._extra_tags:
            raise ValueError("extra tag 'device_id' would shadow the device's own tag")
        model = device_type.reading
        self._fields: list[tuple[str, str, FieldFormatter]] = [
            (name, escape_tag(name), _formatter_for(model.model_fields[name].annotation))
            for name in device_type.fields
        ]
        self._prefixes: dict[str, str] = {}

    def prefix(self, device_id: str) -> str:
        """``measurement,tag=v,...`` of one device (tags sorted, as InfluxDB prefers), cached."""
        cached = self._prefixes.get(device_id)
        if cached is None:
            tags = {**self._extra_tags, "device_id": device_id}
            cached = self._measurement + "".join(
                f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items())
            )
            if len(self._prefixes) < 1_000_000:  # bounded: device ids come from the network
                self._prefixes[device_id] = cached
        return cached

    def encode(self, prefix: str, reading: Reading, ts_ms: int) -> str:
        """One line, without the newline."""
        values = reading.__dict__
        body = ",".join(
            f"{key}={fmt(value)}" for name, key, fmt in self._fields if (value := values[name]) is not None
        )
        seq = values["seq"]
        if seq is not None:
            # Stored as a field (not a tag: one series per device, not per reading) so that
            # gaps and duplicates can be counted per device with InfluxQL.
            return f"{prefix} {body},seq={seq}i {ts_ms}"
        return f"{prefix} {body} {ts_ms}"

    def fields_of(self, reading: Reading) -> dict[str, Any]:
        """The fields stored for a reading (the model's measurements plus ``seq``), for tests and docs."""
        stored = {k: v for k, v in reading.measurements().items() if v is not None}
        if reading.seq is not None:
            stored["seq"] = reading.seq
        return stored
