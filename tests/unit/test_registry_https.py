"""When the registry serves HTTPS, and what it refuses to start with (device_registry/listeners.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_registry.listeners import https_listener
from iotfleet.errors import ConfigError
from iotfleet.pki import ensure_platform_pki
from iotfleet.settings import RegistrySettings, TlsSettings, load_settings
from iotfleet.stack.supervisor import Stack


def test_a_default_stack_keeps_plain_http_on_loopback_only(tmp_path: Path) -> None:
    stack = Stack(load_settings(state_dir=tmp_path))
    assert stack.https_host() is None and stack.https_base() is None
    assert stack._registry_https_env() == {}


def test_listen_opens_https_on_that_address_with_the_platform_certificate(tmp_path: Path) -> None:
    stack = Stack(
        load_settings(state_dir=tmp_path, stack={"listen": "0.0.0.0"}, registry={"https_port": 9443})
    )
    assert stack.https_host() == "0.0.0.0"
    assert stack.https_base() == "https://127.0.0.1:9443"  # a wildcard is reached on loopback here
    env = stack._registry_https_env()
    assert env["IOTFLEET_REGISTRY__HTTPS_HOST"] == "0.0.0.0"
    assert env["IOTFLEET_REGISTRY__HTTPS_PORT"] == "9443"
    assert env["IOTFLEET_REGISTRY__TLS_CERTFILE"] == str((tmp_path / "tls" / "server.crt").resolve())
    assert env["IOTFLEET_REGISTRY__TLS_KEYFILE"] == str((tmp_path / "tls" / "server.key").resolve())
    # Explicitly on loopback (a test, or a reverse proxy on this host) is "listening" too.
    assert Stack(load_settings(state_dir=tmp_path, stack={"listen": "127.0.0.1"})).https_host() == "127.0.0.1"
    # Or HTTPS alone, without moving the device listeners.
    only = Stack(load_settings(state_dir=tmp_path, registry={"https_host": "::1"}))
    assert only.https_base() == "https://[::1]:8443"


def test_https_needs_a_loadable_certificate_and_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="IOTFLEET_REGISTRY__TLS_CERTFILE and IOTFLEET_REGISTRY__TLS_KEYFILE"
    ):
        https_listener(RegistrySettings(https_host="127.0.0.1"))
    pki = ensure_platform_pki(TlsSettings(), tmp_path, [])
    other = ensure_platform_pki(TlsSettings(), tmp_path / "other", [])
    mismatched = RegistrySettings(
        https_host="127.0.0.1", tls_certfile=pki.server_cert_path, tls_keyfile=other.server_key_path
    )
    with pytest.raises(ConfigError, match="IOTFLEET_REGISTRY__TLS_CERTFILE / __TLS_KEYFILE: cannot load"):
        https_listener(mismatched)
    good = https_listener(
        RegistrySettings(
            https_host="127.0.0.1", tls_certfile=pki.server_cert_path, tls_keyfile=pki.server_key_path
        )
    )
    assert good is not None and good.url == "https://127.0.0.1:8443"
    assert https_listener(RegistrySettings()) is None
