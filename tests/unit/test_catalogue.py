"""The device-type catalogue: the public wire contract."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from iotfleet.catalogue import DEVICE_TYPES, export_schemas, get_device_type
from iotfleet.errors import UnknownDeviceTypeError

VALID = {
    "thermostat": {"temperature_c": 21.5, "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "heat"},
    "air_quality": {"co2_ppm": 650, "pm2_5_ugm3": 8.5, "voc_index": 100, "ventilation_pct": 30.0},
    "smart_plug": {
        "power_w": 60.0,
        "voltage_v": 230.1,
        "current_a": 0.26,
        "energy_kwh": 12.5,
        "relay_on": True,
    },
    "gps_tracker": {"lat": 48.85, "lon": 2.35, "speed_kmh": 30.0, "heading_deg": 90.0, "battery_pct": 80.0},
}

OUT_OF_RANGE = {
    "thermostat": [("temperature_c", 120.0), ("humidity_pct", -1.0), ("setpoint_c", 50.0), ("mode", "turbo")],
    "air_quality": [("co2_ppm", -5), ("pm2_5_ugm3", 5000.0), ("voc_index", 501), ("ventilation_pct", 101.0)],
    "smart_plug": [("power_w", -1.0), ("voltage_v", 400.0), ("current_a", 25.0), ("energy_kwh", -0.1)],
    "gps_tracker": [
        ("lat", 91.0),
        ("lon", -181.0),
        ("speed_kmh", -3.0),
        ("heading_deg", 360.0),
        ("battery_pct", 101.0),
    ],
}

WRONG_TYPE = {
    "thermostat": [("temperature_c", "21.5"), ("mode", 1)],
    "air_quality": [("co2_ppm", 650.5), ("voc_index", "100")],
    "smart_plug": [("relay_on", 1), ("power_w", "60")],
    "gps_tracker": [("lat", None), ("battery_pct", [80])],
}


def test_the_four_public_types_are_registered() -> None:
    assert list(DEVICE_TYPES) == ["thermostat", "air_quality", "smart_plug", "gps_tracker"]
    assert set(get_device_type("thermostat").commands) == {"set_setpoint", "set_mode", "reboot"}
    assert set(get_device_type("air_quality").commands) == {"set_ventilation", "reboot"}
    assert set(get_device_type("smart_plug").commands) == {"set_relay", "reboot"}
    assert set(get_device_type("gps_tracker").commands) == {"set_report_interval", "reboot"}


def test_unknown_type_names_the_known_ones() -> None:
    with pytest.raises(UnknownDeviceTypeError, match="known: thermostat"):
        get_device_type("toaster")


@pytest.mark.parametrize("type_name", list(VALID))
def test_valid_reading_single_and_batch(type_name: str) -> None:
    device_type = get_device_type(type_name)
    one = {"ts": 1764240000123, "seq": 42, **VALID[type_name]}
    [reading] = device_type.parse_payload(json.dumps(one))
    assert reading.ts == 1764240000123 and reading.seq == 42
    assert reading.measurements() == VALID[type_name]
    batch = device_type.parse_payload(json.dumps([one, {**one, "seq": 43}]))
    assert [r.seq for r in batch] == [42, 43]


def test_rfc3339_timestamp_is_converted_to_epoch_ms() -> None:
    device_type = get_device_type("thermostat")
    [r] = device_type.parse_payload(
        json.dumps({"ts": "2025-11-27T10:40:00.123+01:00", **VALID["thermostat"]})
    )
    assert r.ts == 1764236400123
    with pytest.raises(ValidationError, match="UTC offset"):
        device_type.parse_payload(json.dumps({"ts": "2025-11-27T10:40:00", **VALID["thermostat"]}))
    with pytest.raises(ValidationError):  # seconds instead of milliseconds
        device_type.parse_payload(json.dumps({"ts": 1764240000, **VALID["thermostat"]}))


@pytest.mark.parametrize(
    ("type_name", "field", "value"),
    [(t, f, v) for t, cases in OUT_OF_RANGE.items() for f, v in cases],
)
def test_out_of_range_values_are_rejected(type_name: str, field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        get_device_type(type_name).parse_payload(json.dumps({**VALID[type_name], field: value}))
    assert any(field in err["loc"] for err in info.value.errors())


@pytest.mark.parametrize(
    ("type_name", "field", "value"),
    [(t, f, v) for t, cases in WRONG_TYPE.items() for f, v in cases],
)
def test_wrong_types_are_rejected_without_coercion(type_name: str, field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        get_device_type(type_name).parse_payload(json.dumps({**VALID[type_name], field: value}))
    assert any(field in err["loc"] for err in info.value.errors())


@pytest.mark.parametrize("type_name", list(VALID))
def test_missing_and_unknown_fields_are_rejected(type_name: str) -> None:
    device_type = get_device_type(type_name)
    first_field = device_type.fields[0]
    partial = {k: v for k, v in VALID[type_name].items() if k != first_field}
    with pytest.raises(ValidationError, match="Field required"):
        device_type.parse_payload(json.dumps(partial))
    with pytest.raises(ValidationError, match="Extra inputs"):
        device_type.parse_payload(json.dumps({**VALID[type_name], "surprise": 1}))


def test_commands_validate_arguments() -> None:
    thermostat = get_device_type("thermostat")
    assert thermostat.validate_command("set_mode", {"mode": "cool"}).model_dump() == {"mode": "cool"}
    with pytest.raises(ValidationError):
        thermostat.validate_command("set_setpoint", {"setpoint_c": 99})
    with pytest.raises(ValidationError):
        get_device_type("gps_tracker").validate_command("set_report_interval", {"seconds": 0})
    with pytest.raises(ValidationError):
        get_device_type("smart_plug").validate_command("set_relay", {"on": "yes"})
    with pytest.raises(KeyError):
        thermostat.validate_command("self_destruct", {})
    assert thermostat.validate_command("reboot", None).model_dump() == {}


def test_json_schemas_are_exported() -> None:
    schemas = export_schemas()
    assert set(schemas) == set(VALID)
    thermostat = schemas["thermostat"]
    reading = thermostat["reading_schema"]
    assert reading["properties"]["temperature_c"]["maximum"] == 85
    assert set(reading["required"]) >= {"temperature_c", "humidity_pct", "setpoint_c", "mode"}
    assert thermostat["command_schemas"]["set_mode"]["properties"]["mode"]["enum"] == [
        "heat",
        "cool",
        "off",
        "auto",
        "eco",
    ]
    # Every type has a configurable state (the device shadow), all fields optional.
    for name, schema in schemas.items():
        assert schema["state_schema"] is not None, name
        assert not schema["state_schema"].get("required"), name
    assert set(thermostat["state_schema"]["properties"]) == {"setpoint_c", "mode"}
    json.dumps(schemas)  # serialisable as is
