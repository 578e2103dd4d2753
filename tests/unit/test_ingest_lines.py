"""The compiled line encoder writes exactly what the general encoder writes."""

from __future__ import annotations

import pytest

from iotfleet.catalogue import DEVICE_TYPES, get_device_type
from iotfleet.influx import encode_point
from telemetry_ingest.lines import LineEncoder

SAMPLES = {
    "thermostat": b'{"ts": 1764240000123, "seq": 7, "temperature_c": 21, "humidity_pct": 40.5,'
    b' "setpoint_c": 20.5, "mode": "heat"}',
    "air_quality": b'{"ts": 1764240000123, "seq": 7, "co2_ppm": 600, "pm2_5_ugm3": 3.5, "voc_index": 100,'
    b' "ventilation_pct": 0}',
    "smart_plug": b'{"ts": 1764240000123, "seq": 7, "power_w": 100.5, "voltage_v": 230, "current_a": 0.43,'
    b' "energy_kwh": 12.5, "relay_on": true}',
    "gps_tracker": b'{"ts": 1764240000123, "seq": 7, "lat": 48.85, "lon": 2.35, "speed_kmh": 0,'
    b' "heading_deg": 359.5, "battery_pct": 99}',
}


@pytest.mark.parametrize("name", list(DEVICE_TYPES))
def test_matches_general_encoder(name: str) -> None:
    device_type = get_device_type(name)
    encoder = LineEncoder(device_type, {"site": "paris 1", "zone": "a,b"})
    (reading,) = device_type.parse_payload(SAMPLES[name])
    line = encoder.encode(encoder.prefix("dev=1 x"), reading, 1764240000123)
    expected = encode_point(
        name,
        {"device_id": "dev=1 x", "site": "paris 1", "zone": "a,b"},
        encoder.fields_of(reading),
        1764240000123,
    )
    assert line == expected


def test_field_kinds_follow_the_model() -> None:
    encoder = LineEncoder(get_device_type("air_quality"))
    (reading,) = get_device_type("air_quality").parse_payload(SAMPLES["air_quality"])
    line = encoder.encode(encoder.prefix("aq1"), reading, 1)
    # ints get `i`, a float field given a JSON int is still written as a float (no type conflict)
    assert (
        line
        == "air_quality,device_id=aq1 co2_ppm=600i,pm2_5_ugm3=3.5,voc_index=100i,ventilation_pct=0.0,seq=7i 1"
    )
    plug = get_device_type("smart_plug")
    (reading,) = plug.parse_payload(SAMPLES["smart_plug"])
    assert "relay_on=true" in LineEncoder(plug).encode("smart_plug,device_id=p", reading, 1)
    (reading,) = get_device_type("thermostat").parse_payload(SAMPLES["thermostat"])
    assert 'mode="heat"' in LineEncoder(get_device_type("thermostat")).encode("t", reading, 1)


def test_reading_without_seq_has_no_seq_field() -> None:
    device_type = get_device_type("thermostat")
    (reading,) = device_type.parse_payload(
        b'{"temperature_c": 21.5, "humidity_pct": 40, "setpoint_c": 20, "mode": "off"}'
    )
    assert LineEncoder(device_type).encode("thermostat,device_id=t", reading, 5).endswith('mode="off" 5')


def test_extra_tag_cannot_shadow_device_id() -> None:
    with pytest.raises(ValueError, match="device_id"):
        LineEncoder(get_device_type("thermostat"), {"device_id": "x"})
