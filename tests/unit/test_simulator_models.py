"""Behaviour models: readings always valid per the catalogue, and commands close the loop."""

from __future__ import annotations

import math
import random

import pytest

from iotfleet.catalogue import DEVICE_TYPES, get_device_type
from simulators.models import (
    MODELS,
    OUT_OF_RANGE,
    SPIKES,
    AirQuality,
    GpsTracker,
    SmartPlug,
    Thermostat,
    make_model,
)

T0 = 1_764_201_600.0  # 2025-11-27 00:00 UTC


def _cmd(device_type: str, name: str, **args: object) -> object:
    return get_device_type(device_type).validate_command(name, args)


def test_every_catalogue_type_has_a_model() -> None:
    assert set(MODELS) == set(DEVICE_TYPES)
    assert set(OUT_OF_RANGE) == set(DEVICE_TYPES) == set(SPIKES)


@pytest.mark.parametrize("device_type", list(DEVICE_TYPES))
def test_a_simulated_day_of_readings_is_valid(device_type: str) -> None:
    rng = random.Random(1)
    catalogue = get_device_type(device_type)
    for _ in range(20):
        model = make_model(device_type, rng, T0)
        for step in range(0, 86_400, 600):
            now = T0 + step
            model.step(now)
            reading = {"ts": int(now * 1000), "seq": step, **model.reading(now)}
            catalogue.reading.model_validate(reading)  # strict: types and ranges


def test_out_of_range_values_are_really_out_of_range() -> None:
    for device_type, fields in OUT_OF_RANGE.items():
        model = make_model(device_type, random.Random(0), T0)
        for name, value in fields.items():
            reading = {"ts": int(T0 * 1000), "seq": 0, **model.reading(T0), name: value}
            with pytest.raises(ValueError, match=name):
                get_device_type(device_type).reading.model_validate(reading)


def test_thermostat_heats_to_its_setpoint_and_holds_it() -> None:
    model = Thermostat(random.Random(2), T0)
    model.apply("set_mode", _cmd("thermostat", "set_mode", mode="heat"))  # type: ignore[arg-type]
    model.apply("set_setpoint", _cmd("thermostat", "set_setpoint", setpoint_c=26.0))  # type: ignore[arg-type]
    model.temperature = 15.0
    for step in range(1, 121):  # 10 minutes at 5 s, a cold night outside
        model.step(T0 + step * 5)
    assert model.temperature > 20.0
    for step in range(121, 361):  # then it holds the setpoint within the hysteresis
        model.step(T0 + step * 5)
        if step > 240:
            assert abs(model.temperature - 26.0) < 0.5
    model.apply("set_mode", _cmd("thermostat", "set_mode", mode="off"))  # type: ignore[arg-type]
    for step in range(361, 361 + 720):  # an hour without heating: falls toward outdoors
        model.step(T0 + step * 5)
    assert model.temperature < 20.0


def test_thermostat_cools_in_cool_mode() -> None:
    model = Thermostat(random.Random(3), T0)
    model.apply("set_mode", _cmd("thermostat", "set_mode", mode="cool"))  # type: ignore[arg-type]
    model.apply("set_setpoint", _cmd("thermostat", "set_setpoint", setpoint_c=18.0))  # type: ignore[arg-type]
    model.temperature = 27.0
    for step in range(1, 61):  # 5 minutes
        model.step(T0 + 14 * 3600 + step * 5)
    assert model.temperature < 19.0
    for step in range(61, 241):  # never cooled below the setpoint band (outdoors may be cooler still)
        model.step(T0 + 14 * 3600 + step * 5)
        assert model.temperature < 18.0 + 0.3 + 0.1


def test_ventilation_lowers_co2() -> None:
    office_hours = T0 + 10 * 3600
    closed, open_ = AirQuality(random.Random(4), office_hours), AirQuality(random.Random(4), office_hours)
    for model in (closed, open_):
        model.tz_offset_h = 0.0
        model.co2 = 800.0
    closed.apply("set_ventilation", _cmd("air_quality", "set_ventilation", level_pct=0.0))  # type: ignore[arg-type]
    open_.apply("set_ventilation", _cmd("air_quality", "set_ventilation", level_pct=100.0))  # type: ignore[arg-type]
    for step in range(1, 361):  # 30 minutes
        closed.step(office_hours + step * 5)
        open_.step(office_hours + step * 5)
    assert closed.co2 > 1_500
    assert open_.co2 < 800


def test_plug_power_drops_when_the_relay_opens() -> None:
    model = SmartPlug(random.Random(5), T0)
    model.appliance = "desk"
    model.tz_offset_h = 0.0
    noon = T0 + 12 * 3600
    model.step(noon)
    assert model.reading(noon)["power_w"] > 100
    model.apply("set_relay", _cmd("smart_plug", "set_relay", on=False))  # type: ignore[arg-type]
    model.step(noon + 5)
    reading = model.reading(noon + 5)
    assert reading["power_w"] == 0 and reading["current_a"] == 0 and reading["relay_on"] is False
    energy = model.energy_kwh
    model.step(noon + 3600)
    assert model.energy_kwh == energy  # no load, no energy


def test_tracker_follows_its_route_and_obeys_the_report_interval() -> None:
    model = GpsTracker(random.Random(6), T0)
    start = (model.lat, model.lon)
    moved = 0.0
    for step in range(1, 361):
        before = (model.lat, model.lon)
        model.step(T0 + step * 5)
        moved += math.dist(before, (model.lat, model.lon))
    assert moved > 0.01  # > ~1 km of path in 30 minutes
    assert math.dist(start, (model.lat, model.lon)) < 0.2  # stays around home
    assert model.report_interval() is None
    model.apply("set_report_interval", _cmd("gps_tracker", "set_report_interval", seconds=30))  # type: ignore[arg-type]
    assert model.report_interval() == 30.0


def test_unsupported_command_fails() -> None:
    model = make_model("smart_plug", random.Random(0), T0)
    with pytest.raises(ValueError, match="not supported"):
        model.apply("set_mode", _cmd("thermostat", "set_mode", mode="heat"))  # type: ignore[arg-type]
    assert model.apply("reboot", _cmd("smart_plug", "reboot")) == "rebooting"  # type: ignore[arg-type]
