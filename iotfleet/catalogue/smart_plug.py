"""Smart plug: a metered relay."""

from pydantic import Field

from iotfleet.catalogue.base import Command, DeviceType, Reading, State


class SmartPlugReading(Reading):
    power_w: float = Field(ge=0, le=4_000, description="Active power, W")
    voltage_v: float = Field(ge=0, le=300, description="RMS voltage, V")
    current_a: float = Field(ge=0, le=20, description="RMS current, A")
    energy_kwh: float = Field(ge=0, le=10_000_000, description="Energy counter since install, kWh")
    relay_on: bool = Field(description="Relay closed (load powered)")


class SetRelay(Command):
    on: bool


class SmartPlugState(State):
    relay_on: bool | None = Field(None, description="Relay closed (load powered)")


DEVICE_TYPE = DeviceType(
    name="smart_plug",
    description="Metered smart plug with a relay.",
    reading=SmartPlugReading,
    commands={"set_relay": SetRelay},
    units={"power_w": "W", "voltage_v": "V", "current_a": "A", "energy_kwh": "kWh"},
    state=SmartPlugState,
)
