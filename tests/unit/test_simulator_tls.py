"""The simulator's TLS bridge (simulators/tls.py) against a local TLS server made with the platform PKI.

No broker: a tiny asyncio TLS server answers each CONNECT with CONNACK 0 and echoes what
follows, so the bridge's handshake, host-name check, record reading and errors are checked
in milliseconds. (Against the real broker: tests/integration/test_tls_edge.py.)
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotfleet.pki import PlatformPki, ensure_platform_pki
from iotfleet.settings import TlsSettings
from simulators import mqtt
from simulators.tls import ClientContexts, TlsOptions

CONNACK_OK = b"\x20\x03\x00\x00\x00"


class Recorder(mqtt.MqttHandler):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.messages: list[mqtt.IncomingPublish] = []

    def on_connack(self, reason: int, session_present: bool, receive_maximum: int) -> None:
        self.connack.set_result(reason)

    def on_message(self, message: mqtt.IncomingPublish, packet_id: int) -> None:
        self.messages.append(message)

    def on_disconnect(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PlatformPki:
    return ensure_platform_pki(TlsSettings(), tmp_path_factory.mktemp("pki"), [])


@pytest.fixture
async def server(pki: PlatformPki) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert_path, pki.server_key_path)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1024)  # the CONNECT
            writer.write(CONNACK_OK)
            # One PUBLISH larger than a TLS record (16 KiB): the bridge reads several records.
            topic = mqtt.topic_prefix("devices/thermostat/t-1/commands")
            writer.write(mqtt.encode_publish(topic, b"x" * 40_000, qos=0))
            await writer.drain()
            await reader.read(1)  # until the client closes
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield port


def connect_packet() -> bytes:
    return mqtt.encode_connect("t-1", username="t-1", password="pw", keepalive=30)


async def test_handshake_checks_the_chain_then_carries_mqtt_both_ways(server: int, pki: PlatformPki) -> None:
    contexts = ClientContexts(TlsOptions(str(pki.ca_cert_path)))
    handler = Recorder()
    connection = await mqtt.open_connection(
        handler, "127.0.0.1", server, connect_packet(), tls=(contexts.shared, "127.0.0.1")
    )
    assert await asyncio.wait_for(handler.connack, 5) == 0
    for _ in range(100):  # the 40 KB publish arrives in several records
        if handler.messages:
            break
        await asyncio.sleep(0.02)
    assert [len(m.payload) for m in handler.messages] == [40_000]
    assert connection.transport is not None
    assert connection.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    connection.disconnect()
    assert await asyncio.wait_for(handler.lost, 5) is None  # a clean close


async def test_a_server_the_ca_did_not_sign_is_refused(server: int, tmp_path: Path) -> None:
    other = ensure_platform_pki(TlsSettings(), tmp_path, [])  # another CA
    contexts = ClientContexts(TlsOptions(str(other.ca_cert_path)))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await mqtt.open_connection(
            Recorder(), "127.0.0.1", server, connect_packet(), tls=(contexts.shared, "127.0.0.1")
        )


async def test_a_name_not_in_the_certificate_is_refused(server: int, pki: PlatformPki) -> None:
    contexts = ClientContexts(TlsOptions(str(pki.ca_cert_path)))
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        await mqtt.open_connection(
            Recorder(), "127.0.0.1", server, connect_packet(), tls=(contexts.shared, "broker.example")
        )


async def test_a_plain_listener_fails_the_handshake_within_the_timeout(pki: PlatformPki) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.close()  # a plain MQTT listener closes on a ClientHello it cannot parse

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    contexts = ClientContexts(TlsOptions(str(pki.ca_cert_path)))
    async with listener:
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await mqtt.open_connection(
                Recorder(),
                "127.0.0.1",
                port,
                connect_packet(),
                tls=(contexts.shared, "127.0.0.1"),
                connect_timeout_s=5,
            )


def test_password_devices_share_one_context_certificate_devices_have_their_own(
    pki: PlatformPki, tmp_path: Path
) -> None:
    from iotfleet.pki import issue_device_certificate

    issued = issue_device_certificate(pki, "gate-1", None, 30)
    cert_file = tmp_path / "gate-1.pem"
    cert_file.write_text(str(issued.key_pem) + issued.cert_pem)
    contexts = ClientContexts(TlsOptions(str(pki.ca_cert_path)))
    assert contexts.for_device("a", None) is contexts.for_device("b", None) is contexts.shared
    own = contexts.for_device("gate-1", str(cert_file))
    assert own is not contexts.shared and contexts.for_device("gate-1", str(cert_file)) is own
    assert own.minimum_version == ssl.TLSVersion.TLSv1_2
