"""`iotfleet up --listen` and the TLS settings reach the broker config and the server certificate."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from iotfleet import broker_files
from iotfleet.cli import build_settings, make_parser
from iotfleet.errors import StackError
from iotfleet.stack.supervisor import Stack, status_as_json


def test_listen_flag_moves_only_the_device_listeners(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = make_parser().parse_args(["up", "--listen", "10.1.2.3", "--state-dir", str(state)])
    settings = build_settings(args)
    assert settings.stack.listen == "10.1.2.3"
    stack = Stack(settings)
    stack._write_configs(stack.parts())
    conf = (state / "mosquitto" / "mosquitto.conf").read_text()
    assert f"listener {settings.mqtt.port} 127.0.0.1\n" in conf  # the platform's plain listener: loopback
    assert f"listener {settings.tls.port} 10.1.2.3\n" in conf
    assert f"listener {settings.tls.cert_port} 10.1.2.3\n" in conf
    assert "require_certificate true\ncrlfile " in conf and "tls_version tlsv1.2" in conf
    assert "protocol websockets" not in conf  # off unless IOTFLEET_TLS__WEBSOCKETS_PORT
    server = x509.load_pem_x509_certificate((state / "tls" / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)
    info = status_as_json(stack, [])
    assert info["ca_cert"] == str((state / "tls" / "ca.crt").resolve())
    assert info["tls"]["mqtts_certificate"] == f"mqtts://10.1.2.3:{settings.tls.cert_port}"


def test_an_address_not_on_this_host_fails_naming_the_setting(tmp_path: Path) -> None:
    args = make_parser().parse_args(["up", "--listen", "192.0.2.77", "--state-dir", str(tmp_path)])
    with pytest.raises(StackError, match="IOTFLEET_STACK__LISTEN"):
        Stack(build_settings(args))._check_tls_ports({})


def test_certificate_entries_in_the_devices_file() -> None:
    fingerprint = "ab" * 32
    entry = broker_files.certificate_entry(fingerprint.upper())
    assert entry == "x509:" + fingerprint and broker_files.check_hash(entry) == entry
    with pytest.raises(ValueError, match="64 lowercase hex"):
        broker_files.check_hash("x509:" + "zz" * 32)
    text = broker_files.devices_file_text([("dev-1", broker_files.DeviceEntry("thermostat", entry))])
    assert broker_files.parse_devices_file(text)["dev-1"].password_hash == entry
