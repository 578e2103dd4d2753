from __future__ import annotations

import pytest

from iotfleet.errors import ConfigError
from iotfleet.influx import encode_point, quote_identifier, quote_string
from iotfleet.settings import load_settings


def test_settings_from_env_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLEET_MQTT__PORT", "1999")
    monkeypatch.setenv("IOTFLEET_INFLUX__URL", "http://127.0.0.1:9999/")
    settings = load_settings()
    assert settings.mqtt.port == 1999
    assert settings.influx.url == "http://127.0.0.1:9999"


def test_bad_setting_names_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLEET_MQTT__PORT", "99999")
    with pytest.raises(ConfigError, match="IOTFLEET_MQTT__PORT"):
        load_settings()
    monkeypatch.setenv("IOTFLEET_MQTT__PORT", "1883")
    monkeypatch.setenv("IOTFLEET_INFLUX__URL", "ftp://x")
    with pytest.raises(ConfigError, match="IOTFLEET_INFLUX__URL"):
        load_settings()


def test_line_protocol_escaping_and_types() -> None:
    line = encode_point(
        "thermo stat",
        {"device_id": "a,b=c d", "site": ""},
        {"t": 21.5, "n": 3, "on": True, "mode": 'he"at\\'},
        1764240000123,
    )
    assert line == r'thermo\ stat,device_id=a\,b\=c\ d t=21.5,n=3i,on=true,mode="he\"at\\" 1764240000123'
    with pytest.raises(ValueError):
        encode_point("m", {}, {"x": float("nan")}, 1)


def test_influxql_quoting() -> None:
    assert quote_identifier('a"b') == '"a\\"b"'
    assert quote_string("it's") == "'it\\'s'"
    with pytest.raises(ValueError):
        quote_string("x\n;DROP")
