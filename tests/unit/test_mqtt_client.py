"""The asyncio MQTT 5 client (ingest and rules engine): framing, acks, tracked publishes."""

from __future__ import annotations

import asyncio
import struct

import pytest

from iotfleet import mqtt_client as m
from iotfleet.mqtt_wire import publish_properties
from iotfleet.settings import MqttSettings
from tests.mqtt_fakes import attach, puback


def publish_from_broker(topic: str, payload: bytes, packet_id: int, props: bytes = b"") -> bytes:
    body = m.encode_utf8(topic) + struct.pack(">H", packet_id) + m.encode_varint(len(props)) + props + payload
    return m.packet(0x32, body)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_varint_roundtrip(value: int) -> None:
    encoded = m.encode_varint(value)
    assert m._read_varint(encoded, 0) == (value, len(encoded))


def test_connect_packet_requests_a_persistent_session() -> None:
    raw = m.connect_packet(
        "ingest-thermostat-0",
        username="u",
        password="p",
        keepalive_s=30,
        session_expiry_s=86_400,
        receive_maximum=10_000,
    )
    assert raw[0] == 0x10
    length, at = m._read_varint(raw, 1) or (0, 0)
    body = raw[at:]
    assert len(body) == length
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags = body[7]
    assert flags & 0x02 == 0  # clean start off: the backlog survives restarts
    assert flags & 0xC0 == 0xC0
    assert b"\x11" + struct.pack(">I", 86_400) in body
    assert b"\x21" + struct.pack(">H", 10_000) in body


async def test_publishes_are_framed_across_any_read_boundary() -> None:
    received: list[tuple[str, bytes, int]] = []
    client = m.MqttClient(
        MqttSettings(), m.SessionConfig("c", ("f",), 1, 10), lambda t, p, k: received.append((t, p, k))
    )
    stream = b"".join(
        [
            publish_from_broker("devices/thermostat/a/telemetry", b'{"x":1}', 1),
            publish_from_broker("devices/thermostat/b/telemetry", b"y" * 300, 2, props=b"\x01\x01"),
            publish_from_broker("devices/thermostat/c/telemetry", b"z" * 20_000, 65_535),
            b"\xd0\x00",  # PINGRESP in between
            publish_from_broker("devices/thermostat/d/telemetry", b"", 3),
        ]
    )
    expected = [
        ("devices/thermostat/a/telemetry", b'{"x":1}', (7 << 16) | 1),
        ("devices/thermostat/b/telemetry", b"y" * 300, (7 << 16) | 2),
        ("devices/thermostat/c/telemetry", b"z" * 20_000, (7 << 16) | 65_535),
        ("devices/thermostat/d/telemetry", b"", (7 << 16) | 3),
    ]
    for step in (1, 2, 3, 7, 100, 4096, len(stream)):
        received.clear()
        conn = m._Connection(client, 7)
        for start in range(0, len(stream), step):
            conn.data_received(stream[start : start + step])
        assert received == expected, step
        assert conn.rest == b""


class FakeTransport:
    """What the client writes to its socket."""

    def __init__(self, written: list[bytes]) -> None:
        self.written = written

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


async def test_acks_of_an_older_connection_are_not_sent() -> None:
    client = m.MqttClient(MqttSettings(), m.SessionConfig("c", ("f",), 1, 10), lambda t, p, k: None)
    written: list[bytes] = []
    conn = m._Connection(client, 3)
    conn.transport = FakeTransport(written)  # type: ignore[assignment]
    client._conn = conn
    client._epoch = 3
    client._connected = True
    client.ack([(2 << 16) | 5, (3 << 16) | 6, (3 << 16) | 0, (3 << 16) | 7])
    assert written == [b"\x40\x02\x00\x06\x40\x02\x00\x07"]


async def test_acks_go_out_before_the_suback() -> None:
    """A resumed session's backlog arrives between CONNACK and SUBACK: its acks must not be lost."""
    client = m.MqttClient(MqttSettings(), m.SessionConfig("c", ("f",), 1, 10), lambda t, p, k: None)
    written: list[bytes] = []
    conn = m._Connection(client, 4)
    conn.transport = FakeTransport(written)  # type: ignore[assignment]
    client._conn = conn
    client._epoch = 4
    assert not client._connected  # the SUBACK is still to come
    client.ack([(4 << 16) | 9])
    assert written == [b"\x40\x02\x00\x09"]


async def test_connack_refusal_is_reported() -> None:
    client = m.MqttClient(MqttSettings(), m.SessionConfig("c", ("f",), 1, 10), lambda t, p, k: None)
    conn = m._Connection(client, 1)
    conn.data_received(b"\x20\x03\x00\x86\x00")
    assert await asyncio.wait_for(conn.connack, 1) == (0x86, False, 0xFFFF)


def test_retiring_packets() -> None:
    # DISCONNECT, reason 0, properties: session expiry interval 0 -> the broker deletes the session
    assert m.disconnect_packet(end_session=True) == b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"
    assert m.disconnect_packet() == b"\xe0\x00"
    assert m.unsubscribe_packet(1, ("$share/g/t",)) == b"\xa2\x0f\x00\x01\x00\x00\x0a$share/g/t"


async def test_tracked_publishes_honour_the_broker_window_and_report_each_puback() -> None:
    client = m.MqttClient(MqttSettings(), m.SessionConfig("out", (), 1, 10), lambda t, p, k: None)
    wire = attach(client, 1, window=2)
    acks: list[tuple[str, int]] = []
    for name in ("a", "b", "c"):
        client.publish(f"t/{name}", b"x", on_ack=lambda reason, name=name: acks.append((name, reason)))
    assert [(pid, topic) for _, pid, topic in wire.publishes()] == [(1, "t/a"), (2, "t/b")]
    assert client.unacked == 3
    assert client._conn is not None
    client._conn.data_received(puback(1) + puback(2, 0x87))
    assert acks == [("a", 0), ("b", 0x87)]
    assert [(pid, topic) for _, pid, topic in wire.publishes()][2:] == [(3, "t/c")]
    assert not await client.flush(0.01)
    client._conn.data_received(puback(3))
    assert await client.flush(1) and client.unacked == 0


async def test_publishes_survive_a_lost_connection_and_are_sent_again_in_order() -> None:
    client = m.MqttClient(MqttSettings(), m.SessionConfig("out", (), 1, 10), lambda t, p, k: None)
    client.publish("t/queued", b"1")  # not connected yet: kept
    first = attach(client, 1)
    client.publish("t/next", b"2")
    assert [topic for _, _, topic in first.publishes()] == ["t/queued", "t/next"]
    assert client._conn is not None
    client._conn.data_received(puback(1))
    client._connected = False  # the connection drops before the second PUBACK
    client.publish("t/offline", b"3")
    second = attach(client, 2, session_present=True)
    sent = second.publishes()
    assert [(pid, topic) for _, pid, topic in sent] == [(2, "t/next"), (3, "t/offline")]
    assert sent[0][0] & 0x08 and not sent[1][0] & 0x08  # DUP only on the re-sent one
    third = attach(client, 3, session_present=False)  # the broker lost the session: resent as new
    assert [(first_byte & 0x08, topic) for first_byte, _, topic in third.publishes()] == [
        (0, "t/next"),
        (0, "t/offline"),
    ]


def test_connack_receive_maximum_is_read_past_other_properties() -> None:
    user = b"\x26" + m.encode_utf8("k") + m.encode_utf8("v")
    props = b"\x22\x00\x0a" + user + b"\x21\x00\x14" + b"\x12" + m.encode_utf8("assigned")
    assert m._connack_receive_maximum(b"\x00\x00" + m.encode_varint(len(props)) + props) == 20
    assert m._connack_receive_maximum(b"\x00\x00\x00") == 0xFFFF


def test_command_properties_decode_as_paho_reads_them() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    block = publish_properties(
        correlation_data=b"id-1", response_topic="devices/t/d/acks", message_expiry=30, content_type="a/b"
    )
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.unpack(m.encode_varint(len(block)) + block)  # type: ignore[no-untyped-call]
    assert props.CorrelationData == b"id-1"
    assert props.ResponseTopic == "devices/t/d/acks"
    assert props.MessageExpiryInterval == 30
    assert props.ContentType == "a/b"


def test_subscribe_packet_carries_every_filter() -> None:
    raw = m.subscribe_packet(1, ("a/+", "b/#"), 1)
    assert raw == b"\x82\x0f\x00\x01\x00" + m.encode_utf8("a/+") + b"\x01" + m.encode_utf8("b/#") + b"\x01"
