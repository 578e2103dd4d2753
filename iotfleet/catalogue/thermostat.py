"""Thermostat: a room temperature controller."""

from typing import Literal

from pydantic import Field

from iotfleet.catalogue.base import Command, DeviceType, Reading

Mode = Literal["heat", "cool", "off", "auto"]


class ThermostatReading(Reading):
    temperature_c: float = Field(ge=-40, le=85, description="Room temperature, °C (sensor range)")
    humidity_pct: float = Field(ge=0, le=100, description="Relative humidity, %")
    setpoint_c: float = Field(ge=5, le=35, description="Target temperature, °C")
    mode: Mode = Field(description="Operating mode")


class SetSetpoint(Command):
    setpoint_c: float = Field(ge=5, le=35)


class SetMode(Command):
    mode: Mode


DEVICE_TYPE = DeviceType(
    name="thermostat",
    description="Room thermostat: heats or cools toward a setpoint.",
    reading=ThermostatReading,
    commands={"set_setpoint": SetSetpoint, "set_mode": SetMode},
    units={"temperature_c": "°C", "humidity_pct": "%", "setpoint_c": "°C"},
)
