"""Client-side TLS of the platform's own connections to another host: MQTT, InfluxDB, the broker agent.

One place builds the SSL contexts so every client verifies the same way: the peer's chain
against the configured CA file (or the system's CAs) and its name (host name or IP SAN).
Contexts are built once per client object, never per message.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from iotfleet.errors import ConfigError
from iotfleet.settings import MqttSettings


class _ServerNameContext(ssl.SSLContext):
    """A client context that checks (and sends as SNI) a fixed name instead of the host connected to.

    paho-mqtt wraps its socket with ``server_hostname=<host>``; this is how it checks
    IOTFLEET_MQTT__TLS_SERVER_NAME instead (e.g. the broker reached through an address its
    certificate does not name).
    """

    server_name: str

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def verifying_context(ca_file: Path | None, setting: str, server_name: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying chain and host name against ``ca_file`` (or the system CAs)."""
    context: ssl.SSLContext
    if server_name:
        named = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        named.server_name = server_name
        context = named
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{setting}: cannot load CA certificate {ca_file}: {exc}") from None
    return context


def mqtt_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The SSL context of a service's MQTT connection, or None for plain MQTT (IOTFLEET_MQTT__TLS false)."""
    if not settings.tls:
        return None
    return verifying_context(settings.ca_file, "IOTFLEET_MQTT__CA_FILE", settings.tls_server_name)


def mqtt_server_hostname(settings: MqttSettings) -> str | None:
    """The name the broker's certificate must carry (None for plain MQTT)."""
    if not settings.tls:
        return None
    return settings.tls_server_name or settings.host


def apply_to_paho(client: Any, settings: MqttSettings) -> None:
    """Turn TLS on for a paho-mqtt client when the settings ask for it (before connect)."""
    context = mqtt_context(settings)
    if context is not None:
        client.tls_set_context(context)


def http_verify(url: str, ca_file: Path | None, setting: str) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for an http(s) URL: our CA's context for https with a CA file, else the default."""
    if url.startswith("https://") and ca_file is not None:
        return verifying_context(ca_file, setting)
    return True
