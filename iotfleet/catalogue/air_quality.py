"""Air-quality sensor with a ventilation actuator."""

from pydantic import Field

from iotfleet.catalogue.base import Command, DeviceType, Reading, State


class AirQualityReading(Reading):
    co2_ppm: int = Field(ge=0, le=40_000, description="CO2 concentration, ppm (NDIR range)")
    pm2_5_ugm3: float = Field(ge=0, le=1_000, description="PM2.5, µg/m³")
    voc_index: int = Field(ge=0, le=500, description="VOC index (Sensirion scale, 100 = average)")
    ventilation_pct: float = Field(ge=0, le=100, description="Ventilation level, %")


class SetVentilation(Command):
    level_pct: float = Field(ge=0, le=100)


class AirQualityState(State):
    ventilation_pct: float | None = Field(None, ge=0, le=100, description="Ventilation level, %")


DEVICE_TYPE = DeviceType(
    name="air_quality",
    description="Indoor air-quality sensor driving a ventilation flap.",
    reading=AirQualityReading,
    commands={"set_ventilation": SetVentilation},
    units={"co2_ppm": "ppm", "pm2_5_ugm3": "µg/m³", "voc_index": "", "ventilation_pct": "%"},
    state=AirQualityState,
)
