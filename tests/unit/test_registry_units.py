"""Registry pieces that need no servers: roles, keys, schemas, cursors, dynsec commands, config."""

from __future__ import annotations

import os
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from device_registry import auth, broker_admin
from device_registry.broker_admin import BrokerAdmin
from device_registry.db import check_database_url
from device_registry.models import Role
from device_registry.presence import Presence
from device_registry.problems import Problem
from device_registry.routers.devices import _decode_cursor, _encode_cursor
from device_registry.schemas import DeviceBulkCreate, DeviceCreate, DeviceUpdate
from iotfleet import broker_files, dynsec, topics
from iotfleet.errors import ConfigError
from iotfleet.settings import MqttSettings


def test_roles_nest() -> None:
    assert Role.admin.allows(Role.operator) and Role.admin.allows(Role.viewer)
    assert Role.operator.allows(Role.viewer) and not Role.operator.allows(Role.admin)
    assert not Role.viewer.allows(Role.operator)


def test_api_keys_are_random_and_stored_hashed() -> None:
    row, secret = auth.make_api_key("ci", Role.viewer)
    _other, other_secret = auth.make_api_key("ci", Role.viewer)
    assert secret.startswith("ifk_") and len(secret) > 40 and secret != other_secret
    assert row.key_hash == auth.hash_key(secret) and secret not in row.key_hash
    assert row.prefix == secret[:10] and row.role == "viewer"


@pytest.mark.parametrize(
    "body",
    [
        {"type": "toaster"},
        {"type": "thermostat", "id": "has space"},
        {"type": "thermostat", "id": "a/b"},
        {"type": "thermostat", "id": "+"},
        {"type": "thermostat", "id": ""},
        {"type": "thermostat", "tags": {"a b": "x"}},
        {"type": "thermostat", "tags": {"k": "v" * 257}},
        {"type": "thermostat", "metadata": {"blob": "x" * 20_000}},
        {"type": "thermostat", "name": ""},
        {"type": "thermostat", "extra": 1},
    ],
)
def test_device_create_rejects(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DeviceCreate.model_validate(body)


def test_device_create_and_update_accept() -> None:
    created = DeviceCreate.model_validate(
        {"type": "gps_tracker", "id": "Truck_7.a-1", "tags": {"fleet:id": "x"}}
    )
    assert created.id == "Truck_7.a-1"
    assert DeviceCreate.model_validate({"type": "thermostat"}).id is None
    update = DeviceUpdate.model_validate({"name": "n"})
    assert update.model_dump(exclude_unset=True) == {"name": "n"}
    with pytest.raises(ValidationError):
        DeviceUpdate.model_validate({"type": "thermostat"})
    with pytest.raises(ValidationError):
        DeviceBulkCreate.model_validate({"devices": [{"type": "thermostat"}] * 10_001})


def test_cursors_round_trip_and_reject_garbage() -> None:
    for device_id in ["a", "thermostat-0001", "Z.z_9-"]:
        assert _decode_cursor(_encode_cursor(device_id)) == device_id
    for garbage in ["%%%", "!!", "=", "\u00e9"]:
        with pytest.raises(Problem) as info:
            _decode_cursor(garbage)
        assert info.value.status == 422


def test_device_broker_identity() -> None:
    """A device is one device-file line ($6$ hash and its type) and the channels of the one ACL table."""
    password_hash = broker_files.hash_password("pw", salt=b"0123456789ab")
    assert broker_files.check_hash(password_hash) == password_hash
    entry = broker_files.DeviceEntry("thermostat", password_hash)
    assert broker_files.devices_file_text([("t-1", entry)]) == f"t-1 thermostat {password_hash}\n"
    assert broker_files.parse_devices_file(f"# c\nt-1 thermostat {password_hash}\n") == {"t-1": entry}
    assert broker_files.hash_password("pw") != password_hash  # salted
    assert entry.fingerprint() != broker_files.DeviceEntry("smart_plug", password_hash).fingerprint()
    for bad in ["$7$101$x$y", "$6$short$AAAA", "plain"]:
        with pytest.raises(ValueError):
            broker_files.check_hash(bad)
    # Every device ACL comes from the one table in iotfleet.topics (the plugin's options).
    assert topics.device_channels("write") == ["telemetry", "status", "acks", "state/reported"]
    assert topics.device_channels("read") == ["commands", "errors", "state/delta"]
    assert len(dynsec.device_acls("thermostat", "t-1")) == 10


def test_control_messages_adapt_to_the_broker() -> None:
    admin = BrokerAdmin(MqttSettings())
    start = admin._chunk
    admin._adapt(start, 0.01)
    assert admin._chunk == start * 2
    for _ in range(20):
        admin._adapt(admin._chunk, 0.01)
    assert admin._chunk == broker_admin.MAX_CHUNK
    admin._adapt(500, 50.0)  # 0.1 s per command: 10 fit in the 1 s budget
    assert admin._chunk == 10
    admin._adapt(10, 30.0)
    assert admin._chunk == 1


def test_database_url_is_checked() -> None:
    assert check_database_url("sqlite+aiosqlite:///x.db")
    assert check_database_url("postgresql+asyncpg://u:p@h/db")
    for bad in ["nonsense", "mysql://u@h/db", "postgresql://u@h/db", "sqlite:///x.db"]:
        with pytest.raises(ConfigError, match="IOTFLEET_REGISTRY__DATABASE_URL"):
            check_database_url(bad)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"IOTFLEET_REGISTRY__DATABASE_URL": "mysql://x"}, "IOTFLEET_REGISTRY__DATABASE_URL"),
        ({"IOTFLEET_REGISTRY__PORT": "99999"}, "IOTFLEET_REGISTRY__PORT"),
    ],
)
def test_bad_config_fails_fast_naming_the_setting(env: dict[str, str], setting: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "device_registry.main"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert setting in result.stderr and "Traceback" not in result.stderr


def _message(topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(topic=topic.encode())
    message.payload = payload
    message.retain = retain
    return message


def test_presence_keeps_only_the_latest_state_in_memory() -> None:
    presence = Presence(MqttSettings(), sessions=None, metrics=CollectorRegistry())  # type: ignore[arg-type]
    for seq in range(1000):
        presence._on_message(_message("devices/thermostat/t-1/telemetry", f'{{"seq": {seq}}}'.encode()))
    presence._on_message(_message("devices/thermostat/t-2/status", b"online", retain=True))
    presence._on_message(_message("devices/thermostat/t-3/status", b"online"))
    presence._on_message(_message("devices/thermostat/t-3/status", b"offline"))
    presence._on_message(_message("devices/thermostat/t-4/status", b"garbage"))
    presence._on_message(_message("devices/thermostat/t-5/acks", b"{}"))
    presence._on_message(_message("elsewhere/t-6/telemetry", b"{}"))
    presence._on_message(_message("$SYS/broker/log/N", b"1: Client t-7 disconnected."))
    presence._on_message(_message("$SYS/broker/log/N", b"1: New connection from 127.0.0.1:1 on port 2."))
    # 1000 readings of one device are one pending write; a retained status is only a (possibly
    # stale) hint and a live "offline" is the device's word, not the broker's: neither is a sign of life.
    assert set(presence._seen) == {"t-1", "t-3", "t-5"}
    assert [(e.device_id, e.online, e.cause.value) for e in presence._events] == [
        ("t-7", False, "disconnected")
    ]
    assert presence.m_status_unparsed._value.get() == 1  # "garbage"
