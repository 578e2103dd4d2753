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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IOTFLEET_INGEST__JOURNAL__MAX_BYTES", "1000"),  # below 64 MiB
        ("IOTFLEET_INGEST__JOURNAL__ENABLED", "maybe"),
        ("IOTFLEET_REGISTRY__SQLITE_SYNCHRONOUS", "OFF"),  # acked commits must survive an OS crash
        ("IOTFLEET_STACK__BROKER_AUTOSAVE_CHANGES", "0"),
    ],
)
def test_durability_settings_fail_fast_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_durability_defaults() -> None:
    settings = load_settings()
    assert settings.ingest.journal.enabled and settings.ingest.journal.max_bytes == 2 * 1024**3
    assert settings.registry.sqlite_synchronous == "FULL"
    assert settings.stack.broker_autosave_changes == 1_000
