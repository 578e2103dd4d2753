"""The device-type catalogue: every type's reading and command models.

Adding a device type = one module defining ``DEVICE_TYPE`` plus one line in
``_MODULES`` below (and, for its own ingest process, one console script).
"""

from __future__ import annotations

from types import MappingProxyType

from iotfleet.catalogue import air_quality, gps_tracker, smart_plug, thermostat
from iotfleet.catalogue.base import Command, DeviceType, Reading, Reboot, State, TimestampMs
from iotfleet.errors import UnknownDeviceTypeError

_MODULES = (
    thermostat,
    air_quality,
    smart_plug,
    gps_tracker,
)

DEVICE_TYPES: MappingProxyType[str, DeviceType] = MappingProxyType(
    {module.DEVICE_TYPE.name: module.DEVICE_TYPE for module in _MODULES}
)
"""Every registered device type by name, in registration order."""


def get_device_type(name: str) -> DeviceType:
    """The catalogue entry for ``name``; raise UnknownDeviceTypeError if there is none."""
    try:
        return DEVICE_TYPES[name]
    except KeyError:
        known = ", ".join(DEVICE_TYPES)
        raise UnknownDeviceTypeError(f"unknown device type {name!r} (known: {known})") from None


def export_schemas() -> dict[str, dict[str, object]]:
    """JSON schemas of every type's reading and commands, keyed by type name."""
    return {name: device_type.schema() for name, device_type in DEVICE_TYPES.items()}


__all__ = [
    "DEVICE_TYPES",
    "Command",
    "DeviceType",
    "Reading",
    "Reboot",
    "State",
    "TimestampMs",
    "export_schemas",
    "get_device_type",
]
