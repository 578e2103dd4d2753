"""GPS tracker: position, speed and battery of a vehicle or asset."""

from pydantic import Field

from iotfleet.catalogue.base import Command, DeviceType, Reading, State


class GpsTrackerReading(Reading):
    lat: float = Field(ge=-90, le=90, description="Latitude, degrees (WGS 84)")
    lon: float = Field(ge=-180, le=180, description="Longitude, degrees (WGS 84)")
    speed_kmh: float = Field(ge=0, le=400, description="Ground speed, km/h")
    heading_deg: float = Field(ge=0, lt=360, description="Course over ground, degrees from north")
    battery_pct: float = Field(ge=0, le=100, description="Battery charge, %")


class SetReportInterval(Command):
    seconds: int = Field(ge=1, le=86_400)


class GpsTrackerState(State):
    report_interval_s: int | None = Field(None, ge=1, le=86_400, description="Seconds between readings")


DEVICE_TYPE = DeviceType(
    name="gps_tracker",
    description="GPS tracker reporting position, speed and battery.",
    reading=GpsTrackerReading,
    commands={"set_report_interval": SetReportInterval},
    units={"lat": "°", "lon": "°", "speed_kmh": "km/h", "heading_deg": "°", "battery_pct": "%"},
    state=GpsTrackerState,
)
