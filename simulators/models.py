"""Behaviour models: believable signals per device type that respond to commands in closed loop.

Each model advances a small physical state with the wall clock (``step``),
produces a reading of the catalogue's fields (``reading``) and applies
validated commands (``apply``). Signals combine a daily cycle (local hour of
the simulated site), sensor noise, slow calibration drift and the sensor's
limits and resolution. Time constants are compressed (minutes rather than
hours) so that a demo shows a thermostat reaching its setpoint while people
watch.

The models share one ``random.Random`` of the fleet (seeded by ``--seed``):
a Random per device would cost ~2.5 KB each, an eighth of the memory budget.
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

from iotfleet.catalogue import Command, get_device_type

DAY_S = 86_400.0


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _daily(now_s: float, peak_hour: float, offset_h: float) -> float:
    """A cosine over the day: 1 at ``peak_hour`` local time, -1 twelve hours later."""
    hour = ((now_s / 3600.0) + offset_h) % 24.0
    return math.cos(2 * math.pi * (hour - peak_hour) / 24.0)


def _local_hour(now_s: float, offset_h: float) -> float:
    return ((now_s / 3600.0) + offset_h) % 24.0


class DeviceModel:
    """Base of the per-type models. ``rng`` is shared by the fleet."""

    __slots__ = ("drift", "last_s", "rng", "tz_offset_h")
    type_name: ClassVar[str] = ""

    def __init__(self, rng: random.Random, now_s: float) -> None:
        self.rng = rng
        self.last_s = now_s
        # Each device sits in its own "site": spreads daily peaks a little across the fleet.
        self.tz_offset_h = rng.uniform(-2.0, 2.0)
        self.drift = 0.0  # slow calibration drift, bounded random walk

    def step(self, now_s: float) -> None:
        dt = now_s - self.last_s
        if dt <= 0:
            return
        self.last_s = now_s
        self.drift = _clamp(self.drift + self.rng.gauss(0.0, 0.002) * math.sqrt(dt), -0.5, 0.5)
        self._advance(now_s, min(dt, 600.0))  # a long gap (offline) does not explode the integrator

    def _advance(self, now_s: float, dt: float) -> None:
        raise NotImplementedError

    def reading(self, now_s: float) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, name: str, command: Command) -> str:
        """Apply a validated command; return a human detail for the ack; raise ValueError to fail it."""
        if name == "reboot":
            return "rebooting"
        raise ValueError(f"command {name!r} not supported by this simulator")

    def report_interval(self) -> float | None:
        """A device-chosen publish interval (s), or None to use the fleet's."""
        return None

    def state(self) -> dict[str, Any]:
        """The configurable state (device shadow) as the catalogue's state model names it."""
        return {}

    def apply_state(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Apply validated desired fields; return the state of those fields now (what is reported)."""
        current = self.state()
        return {k: current[k] for k in fields if k in current}


class Thermostat(DeviceModel):
    """A room with heat loss to the outside and a heater/cooler driven toward the setpoint.

    dT/dt = (T_out - T) / tau + P, with P = +heat_rate while heating, -cool_rate
    while cooling, switched with 0.3 °C hysteresis (what real thermostats do to
    avoid short-cycling). Humidity follows the day and drops while cooling.
    """

    __slots__ = ("active", "humidity", "mode", "setpoint", "temperature")
    type_name = "thermostat"
    TAU_S = 1_800.0
    HEAT_RATE = 0.02  # °C/s at full power: ~1.2 °C per minute
    COOL_RATE = 0.015
    HYSTERESIS = 0.3
    ECO_BAND_C = 2.0

    def __init__(self, rng: random.Random, now_s: float) -> None:
        super().__init__(rng, now_s)
        self.setpoint = float(rng.choice((19.0, 20.0, 20.5, 21.0, 22.0)))
        self.mode = rng.choices(("auto", "heat", "cool", "off"), (6, 2, 1, 1))[0]
        self.temperature = self.setpoint + rng.uniform(-3.0, 3.0)
        self.humidity = rng.uniform(35.0, 55.0)
        self.active = 0  # +1 heating, -1 cooling, 0 idle

    def outdoor(self, now_s: float) -> float:
        return 10.0 + 8.0 * _daily(now_s, 15.0, self.tz_offset_h)

    def _advance(self, now_s: float, dt: float) -> None:
        t = self.temperature
        # eco: heats and cools like auto, but only outside a band ECO_BAND_C around the setpoint
        # (lower energy use, the room drifts more: visible in the readings).
        band = self.ECO_BAND_C if self.mode == "eco" else self.HYSTERESIS
        low, high = self.setpoint - band, self.setpoint + band
        can_heat = self.mode in ("heat", "auto", "eco")
        can_cool = self.mode in ("cool", "auto", "eco")
        heating_done = self.active > 0 and (not can_heat or t >= high)
        cooling_done = self.active < 0 and (not can_cool or t <= low)
        if heating_done or cooling_done:
            self.active = 0
        if self.active == 0:
            if can_heat and t < low:
                self.active = 1
            elif can_cool and t > high:
                self.active = -1
        power = self.HEAT_RATE if self.active > 0 else -self.COOL_RATE if self.active < 0 else 0.0
        # Exact step of the first-order loss plus a constant drive: stable for any dt.
        decay = math.exp(-dt / self.TAU_S)
        target = self.outdoor(now_s) + power * self.TAU_S
        self.temperature = target + (t - target) * decay
        humid_target = 45.0 + 10.0 * _daily(now_s, 6.0, self.tz_offset_h) - (12.0 if self.active < 0 else 0.0)
        self.humidity += (humid_target - self.humidity) * (1 - math.exp(-dt / 900.0))

    def reading(self, now_s: float) -> dict[str, Any]:
        rng = self.rng
        temp = self.temperature + self.drift + rng.gauss(0.0, 0.05)
        hum = self.humidity + rng.gauss(0.0, 0.4)
        return {
            # Sensor resolution 0.1 °C / 0.5 %RH, range of the catalogue's sensor.
            "temperature_c": round(_clamp(temp, -40.0, 85.0), 1),
            "humidity_pct": round(_clamp(hum, 0.0, 100.0) * 2) / 2,
            "setpoint_c": self.setpoint,
            "mode": self.mode,
        }

    def state(self) -> dict[str, Any]:
        return {"setpoint_c": self.setpoint, "mode": self.mode}

    def apply_state(self, fields: dict[str, Any]) -> dict[str, Any]:
        if "setpoint_c" in fields:
            self.setpoint = float(fields["setpoint_c"])
        if "mode" in fields:
            self.mode = fields["mode"]
            if self.mode == "off":
                self.active = 0
        return super().apply_state(fields)

    def apply(self, name: str, command: Command) -> str:
        if name == "set_setpoint":
            self.setpoint = float(command.setpoint_c)  # type: ignore[attr-defined]
            return f"setpoint {self.setpoint:.1f} °C"
        if name == "set_mode":
            self.mode = command.mode  # type: ignore[attr-defined]
            if self.mode == "off":
                self.active = 0
            return f"mode {self.mode}"
        return super().apply(name, command)


class AirQuality(DeviceModel):
    """A ventilated room: CO2 from occupants, removed by air exchange.

    dC/dt = G·occupants - (ach_base + ach_vent·level) · (C - outdoor). Occupancy
    follows office hours; PM2.5 follows outdoor air (rush hours) and is
    filtered by ventilation; the VOC index rises with occupancy.
    """

    __slots__ = ("co2", "occupants_max", "pm25", "ventilation", "voc")
    type_name = "air_quality"
    OUTDOOR_CO2 = 420.0
    GEN_PPM_PER_S = 0.35  # per occupant, in a small room
    ACH_BASE = 1 / 3600.0
    ACH_VENT = 12 / 3600.0  # at 100 %: 12 air changes per hour

    def __init__(self, rng: random.Random, now_s: float) -> None:
        super().__init__(rng, now_s)
        self.occupants_max = rng.randint(2, 12)
        self.ventilation = float(rng.choice((10.0, 20.0, 30.0)))
        self.co2 = rng.uniform(450.0, 900.0)
        self.pm25 = rng.uniform(4.0, 15.0)
        self.voc = rng.uniform(80.0, 120.0)

    def occupants(self, now_s: float) -> float:
        hour = _local_hour(now_s, self.tz_offset_h)
        if 8.0 <= hour < 18.0:
            lunch = 0.5 if 12.0 <= hour < 13.0 else 1.0
            return self.occupants_max * lunch
        return 0.0

    def _advance(self, now_s: float, dt: float) -> None:
        occ = self.occupants(now_s)
        ach = self.ACH_BASE + self.ACH_VENT * self.ventilation / 100.0
        equilibrium = self.OUTDOOR_CO2 + self.GEN_PPM_PER_S * occ / ach
        self.co2 = equilibrium + (self.co2 - equilibrium) * math.exp(-dt * ach)
        rush = max(0.0, _daily(now_s, 8.0, self.tz_offset_h)) + max(
            0.0, _daily(now_s, 18.0, self.tz_offset_h)
        )
        outdoor_pm = 6.0 + 14.0 * rush
        pm_target = outdoor_pm * (1.0 - 0.5 * self.ventilation / 100.0)
        self.pm25 += (pm_target - self.pm25) * (1 - math.exp(-dt / 600.0))
        voc_target = 90.0 + 15.0 * occ - 30.0 * self.ventilation / 100.0
        self.voc += (voc_target - self.voc) * (1 - math.exp(-dt / 600.0))

    def reading(self, now_s: float) -> dict[str, Any]:
        rng = self.rng
        return {
            # NDIR sensors read 400-40,000 ppm with ~±30 ppm noise.
            "co2_ppm": int(_clamp(self.co2 * (1 + self.drift / 50) + rng.gauss(0.0, 15.0), 400.0, 40_000.0)),
            "pm2_5_ugm3": round(_clamp(self.pm25 + rng.gauss(0.0, 0.8), 0.0, 1_000.0), 1),
            "voc_index": int(_clamp(self.voc + rng.gauss(0.0, 3.0), 1.0, 500.0)),
            "ventilation_pct": self.ventilation,
        }

    def state(self) -> dict[str, Any]:
        return {"ventilation_pct": self.ventilation}

    def apply_state(self, fields: dict[str, Any]) -> dict[str, Any]:
        if "ventilation_pct" in fields:
            self.ventilation = float(fields["ventilation_pct"])
        return super().apply_state(fields)

    def apply(self, name: str, command: Command) -> str:
        if name == "set_ventilation":
            self.ventilation = float(command.level_pct)  # type: ignore[attr-defined]
            return f"ventilation {self.ventilation:.0f} %"
        return super().apply(name, command)


class SmartPlug(DeviceModel):
    """A metered relay feeding an appliance with a characteristic load profile.

    Appliances: a fridge (compressor duty cycle), a TV (evening use), a heater
    (thermostatic, on cold hours) or a desk (office hours). Opening the relay
    drops power and current to zero at once; energy integrates power.
    """

    __slots__ = ("appliance", "energy_kwh", "phase", "power", "relay_on", "voltage")
    type_name = "smart_plug"
    APPLIANCES = ("fridge", "tv", "heater", "desk")

    def __init__(self, rng: random.Random, now_s: float) -> None:
        super().__init__(rng, now_s)
        self.appliance = rng.choice(self.APPLIANCES)
        self.relay_on = True
        self.energy_kwh = round(rng.uniform(0.0, 500.0), 3)
        self.phase = rng.uniform(0.0, 1.0)
        self.power = 0.0
        self.voltage = 230.0

    def demand(self, now_s: float) -> float:
        hour = _local_hour(now_s, self.tz_offset_h)
        if self.appliance == "fridge":
            cycle = ((now_s / 1_200.0) + self.phase) % 1.0  # 20-minute compressor cycle
            return 120.0 if cycle < 0.4 else 3.0
        if self.appliance == "tv":
            return 95.0 if 18.0 <= hour < 23.0 else 1.5
        if self.appliance == "heater":
            cold = max(0.0, -_daily(now_s, 15.0, self.tz_offset_h))
            return 1_800.0 if ((now_s / 600.0) + self.phase) % 1.0 < cold else 0.0
        return 140.0 if 8.0 <= hour < 18.0 else 6.0

    def _advance(self, now_s: float, dt: float) -> None:
        self.power = self.demand(now_s) if self.relay_on else 0.0
        self.energy_kwh += self.power * dt / 3_600_000.0
        self.voltage += (230.0 - self.voltage) * 0.2 + self.rng.gauss(0.0, 0.6)

    def reading(self, now_s: float) -> dict[str, Any]:
        power = 0.0 if not self.relay_on else max(0.0, self.power * (1 + self.rng.gauss(0.0, 0.02)))
        voltage = _clamp(self.voltage, 0.0, 300.0)
        return {
            "power_w": round(_clamp(power, 0.0, 4_000.0), 1),
            "voltage_v": round(voltage, 1),
            "current_a": round(_clamp(power / voltage if voltage else 0.0, 0.0, 20.0), 3),
            "energy_kwh": round(self.energy_kwh, 4),
            "relay_on": self.relay_on,
        }

    def state(self) -> dict[str, Any]:
        return {"relay_on": self.relay_on}

    def apply_state(self, fields: dict[str, Any]) -> dict[str, Any]:
        if "relay_on" in fields:
            self.relay_on = bool(fields["relay_on"])
            if not self.relay_on:
                self.power = 0.0
        return super().apply_state(fields)

    def apply(self, name: str, command: Command) -> str:
        if name == "set_relay":
            self.relay_on = bool(command.on)  # type: ignore[attr-defined]
            if not self.relay_on:
                self.power = 0.0
            return "relay closed" if self.relay_on else "relay open"
        return super().apply(name, command)


class GpsTracker(DeviceModel):
    """A vehicle driving a closed route of waypoints around its home, with stops.

    Speed accelerates toward a cruise speed and slows to stop at each waypoint
    for a while; the battery drains with reporting and recharges while parked
    overnight. ``set_report_interval`` changes how often the device publishes.
    """

    __slots__ = (
        "battery",
        "cruise",
        "heading",
        "interval",
        "lat",
        "leg",
        "lon",
        "route",
        "speed",
        "stop_until",
    )
    type_name = "gps_tracker"
    CENTRES = ((52.52, 13.40), (48.86, 2.35), (40.42, -3.70), (45.46, 9.19), (59.33, 18.07), (51.51, -0.13))

    def __init__(self, rng: random.Random, now_s: float) -> None:
        super().__init__(rng, now_s)
        clat, clon = rng.choice(self.CENTRES)
        clat += rng.uniform(-0.05, 0.05)
        clon += rng.uniform(-0.05, 0.05)
        radius = rng.uniform(0.01, 0.04)
        n = rng.randint(4, 7)
        start = rng.uniform(0.0, 2 * math.pi)
        self.route = tuple(
            (
                clat + radius * math.sin(start + 2 * math.pi * i / n) * rng.uniform(0.7, 1.0),
                clon + 1.5 * radius * math.cos(start + 2 * math.pi * i / n) * rng.uniform(0.7, 1.0),
            )
            for i in range(n)
        )
        self.leg = 0
        self.lat, self.lon = self.route[0]
        self.speed = 0.0
        self.cruise = rng.uniform(30.0, 70.0)
        self.heading = 0.0
        self.battery = rng.uniform(60.0, 100.0)
        self.stop_until = 0.0
        self.interval: float | None = None

    def _advance(self, now_s: float, dt: float) -> None:
        if now_s < self.stop_until:
            self.speed = 0.0
            parked_charge = _local_hour(now_s, self.tz_offset_h) < 6.0
            self.battery = _clamp(self.battery + (0.01 if parked_charge else -0.0005) * dt, 0.0, 100.0)
            return
        target_lat, target_lon = self.route[(self.leg + 1) % len(self.route)]
        dlat = target_lat - self.lat
        dlon = (target_lon - self.lon) * math.cos(math.radians(self.lat))
        dist_km = math.hypot(dlat, dlon) * 111.2
        self.speed += (self.cruise - self.speed) * (1 - math.exp(-dt / 20.0))
        step_km = self.speed * dt / 3600.0
        self.heading = (math.degrees(math.atan2(dlon, dlat)) + 360.0) % 360.0
        if step_km >= dist_km:
            self.lat, self.lon = target_lat, target_lon
            self.leg = (self.leg + 1) % len(self.route)
            self.stop_until = now_s + self.rng.uniform(20.0, 120.0)
        else:
            frac = step_km / dist_km
            self.lat += (target_lat - self.lat) * frac
            self.lon += (target_lon - self.lon) * frac
        self.battery = _clamp(self.battery - 0.002 * dt, 0.0, 100.0)

    def reading(self, now_s: float) -> dict[str, Any]:
        rng = self.rng
        moving = self.speed > 0.5
        jitter = 0.00003 if moving else 0.00001  # GNSS noise, ~3 m
        return {
            "lat": round(_clamp(self.lat + rng.gauss(0.0, jitter), -90.0, 90.0), 6),
            "lon": round(_clamp(self.lon + rng.gauss(0.0, jitter), -180.0, 180.0), 6),
            "speed_kmh": round(max(0.0, self.speed + (rng.gauss(0.0, 0.5) if moving else 0.0)), 1),
            "heading_deg": round(self.heading, 1) % 360.0,
            "battery_pct": round(self.battery, 1),
        }

    def state(self) -> dict[str, Any]:
        # Unset (the fleet's interval) is not part of the reported state.
        return {} if self.interval is None else {"report_interval_s": int(self.interval)}

    def apply_state(self, fields: dict[str, Any]) -> dict[str, Any]:
        if "report_interval_s" in fields:
            self.interval = float(fields["report_interval_s"])
        return super().apply_state(fields)

    def apply(self, name: str, command: Command) -> str:
        if name == "set_report_interval":
            self.interval = float(command.seconds)  # type: ignore[attr-defined]
            return f"report interval {command.seconds} s"  # type: ignore[attr-defined]
        return super().apply(name, command)

    def report_interval(self) -> float | None:
        return self.interval


MODELS: dict[str, type[DeviceModel]] = {
    model.type_name: model for model in (Thermostat, AirQuality, SmartPlug, GpsTracker)
}


def make_model(device_type: str, rng: random.Random, now_s: float) -> DeviceModel:
    """The behaviour model of ``device_type``; every catalogue type must have one."""
    get_device_type(device_type)  # a clear error for an unknown type
    try:
        model_cls = MODELS[device_type]
    except KeyError:
        raise ValueError(f"no simulator behaviour model for device type {device_type!r}") from None
    return model_cls(rng, now_s)


# Out-of-range values per field for the out_of_range fault: just outside the catalogue's limits.
OUT_OF_RANGE: dict[str, dict[str, Any]] = {
    "thermostat": {"temperature_c": 150.0, "humidity_pct": 130.0, "setpoint_c": 60.0},
    "air_quality": {"co2_ppm": 65_000, "pm2_5_ugm3": -5.0, "voc_index": 900},
    "smart_plug": {"power_w": 9_999.0, "voltage_v": 480.0, "current_a": 45.0},
    "gps_tracker": {"lat": 123.4, "lon": 200.0, "speed_kmh": 999.0, "battery_pct": 140.0},
}

# How far a spike pushes a field (still within the catalogue's range: a plausible glitch).
SPIKES: dict[str, tuple[str, float, float, float]] = {
    # type: (field, magnitude, low, high)
    "thermostat": ("temperature_c", 25.0, -40.0, 85.0),
    "air_quality": ("co2_ppm", 8_000.0, 400.0, 40_000.0),
    "smart_plug": ("power_w", 3_000.0, 0.0, 4_000.0),
    "gps_tracker": ("speed_kmh", 250.0, 0.0, 400.0),
}
