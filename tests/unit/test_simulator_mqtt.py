"""The lean MQTT 5 codec: what we encode parses back, and the stream parser survives any split."""

from __future__ import annotations

import asyncio

from iotfleet.mqtt_wire import publish_properties
from simulators import mqtt


class Recorder(mqtt.MqttHandler):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def on_connack(self, reason: int, session_present: bool, receive_maximum: int) -> None:
        self.events.append(("connack", reason, session_present, receive_maximum))

    def on_puback(self, packet_id: int, reason: int) -> None:
        self.events.append(("puback", packet_id, reason))

    def on_suback(self, packet_id: int, reasons: bytes) -> None:
        self.events.append(("suback", packet_id, reasons))

    def on_message(self, message: mqtt.IncomingPublish, packet_id: int) -> None:
        self.events.append(("message", message, packet_id))

    def on_disconnect(self, exc: Exception | None) -> None:
        self.events.append(("disconnect", exc))


def test_varint_round_trip() -> None:
    for value in (0, 1, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455):
        encoded = mqtt.encode_varint(value)
        assert mqtt.decode_varint(encoded, 0) == (value, len(encoded))


def test_publish_with_properties_parses_back() -> None:
    props = publish_properties(response_topic="devices/t/x/acks", correlation_data=b"abc", message_expiry=60)
    packet = mqtt.encode_publish(
        mqtt.topic_prefix("devices/t/x/commands"), b'{"a":1}', qos=1, packet_id=7, properties=props
    )
    assert packet[0] == 0x32
    length, start = mqtt.decode_varint(packet, 1)
    assert len(packet) == start + length
    message = mqtt.parse_publish(packet[0] & 0x0F, packet[start:])
    assert message.topic == "devices/t/x/commands"
    assert message.payload == b'{"a":1}'
    assert (message.qos, message.response_topic, message.correlation_data, message.message_expiry) == (
        1,
        "devices/t/x/acks",
        b"abc",
        60,
    )


def test_connect_packet_carries_will_and_credentials() -> None:
    packet = mqtt.encode_connect(
        "dev-1",
        username="dev-1",
        password="pw",
        keepalive=60,
        will_topic="devices/t/dev-1/status",
        will_payload=b"offline",
    )
    assert packet[0] == 0x10
    body = packet[2:]
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags = body[7]
    assert flags & 0x80 and flags & 0x40 and flags & 0x04 and flags & 0x20  # user, password, will, retained
    assert (flags >> 3) & 0x03 == 1  # will QoS 1
    assert b"devices/t/dev-1/status" in packet and packet.endswith(b"dev-1\x00\x02pw")


def test_resend_gets_new_packet_id_and_dup_flag() -> None:
    from simulators.fleet import _replace_pid

    packet = mqtt.encode_publish(mqtt.topic_prefix("a/b"), b"x" * 300, qos=1, packet_id=5)
    again = mqtt.with_dup_flag(_replace_pid(packet, 0x1234))
    assert again[0] == 0x3A
    _length, start = mqtt.decode_varint(again, 1)
    assert again[start + 5 : start + 7] == b"\x12\x34"  # after the 2+3 byte topic
    assert again[-300:] == b"x" * 300


async def test_stream_parser_handles_any_split() -> None:
    props = publish_properties(correlation_data=b"id-1")
    stream = (
        b"\x20\x03\x00\x00\x00"  # CONNACK success, no properties
        + b"\x40\x02\x00\x01"  # PUBACK 1
        + b"\x40\x04\x00\x02\x87\x00"  # PUBACK 2, reason 0x87
        + b"\x90\x04\x00\x03\x00\x01"  # SUBACK 3, granted QoS 1
        + mqtt.encode_publish(
            mqtt.topic_prefix("devices/t/x/commands"), b"{}", qos=1, packet_id=9, properties=props
        )
        + b"\xd0\x00"  # PINGRESP
    )
    for chunk in (1, 2, 3, 5, len(stream)):
        handler = Recorder()
        conn = mqtt.MqttConnection(handler)
        for i in range(0, len(stream), chunk):
            conn.data_received(stream[i : i + chunk])
        kinds = [e[0] for e in handler.events]
        assert kinds == ["connack", "puback", "puback", "suback", "message"], chunk
        assert handler.events[2] == ("puback", 2, 0x87)
        message = handler.events[4][1]
        assert isinstance(message, mqtt.IncomingPublish)
        assert message.correlation_data == b"id-1" and handler.events[4][2] == 9
    await asyncio.sleep(0)
