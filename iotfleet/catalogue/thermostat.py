"""Thermostat: a room temperature controller."""

from typing import Literal

from pydantic import Field

from iotfleet.catalogue.base import Command, DeviceType, Reading, State

# "eco": heat/cool like auto, around a setpoint relaxed by ECO_OFFSET_C (added with the device shadow).
Mode = Literal["heat", "cool", "off", "auto", "eco"]


class ThermostatReading(Reading):
    temperature_c: float = Field(ge=-40, le=85, description="Room temperature, °C (sensor range)")
    humidity_pct: float = Field(ge=0, le=100, description="Relative humidity, %")
    setpoint_c: float = Field(ge=5, le=35, description="Target temperature, °C")
    mode: Mode = Field(description="Operating mode")


class SetSetpoint(Command):
    setpoint_c: float = Field(ge=5, le=35)


class SetMode(Command):
    mode: Mode


class ThermostatState(State):
    setpoint_c: float | None = Field(None, ge=5, le=35, description="Target temperature, °C")
    mode: Mode | None = Field(None, description="Operating mode")


DEVICE_TYPE = DeviceType(
    name="thermostat",
    description="Room thermostat: heats or cools toward a setpoint.",
    reading=ThermostatReading,
    commands={"set_setpoint": SetSetpoint, "set_mode": SetMode},
    units={"temperature_c": "°C", "humidity_pct": "%", "setpoint_c": "°C"},
    state=ThermostatState,
)
