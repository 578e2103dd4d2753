"""MQTT 5 wire primitives shared by the two hand-rolled clients.

The services' client (iotfleet/mqtt_client.py: ingest, rules engine) and the simulator's
many-connection publisher (simulators/mqtt.py) are different clients on purpose
(a few service sessions carrying whole streams, ten thousand small publishers); what they
share is the wire format, kept here once.
"""

from __future__ import annotations

import struct

CONNACK_REASONS = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x97: "quota exceeded",
    0x9F: "connection rate exceeded",
}
"""CONNACK reason codes (MQTT 5, 3.2.2.2) a broker may refuse a connection with."""


class MalformedPacketError(ValueError):
    """Raised when bytes from the broker are not valid MQTT (here: a variable byte integer)."""


def encode_varint(value: int) -> bytes:
    """MQTT variable byte integer (remaining length, property lengths)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); IndexError if the data ends inside the number."""
    value = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MalformedPacketError("malformed variable byte integer")


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

# MQTT 5 property identifiers (3.3.2.3 and friends).
PROP_PAYLOAD_FORMAT = 0x01
PROP_MESSAGE_EXPIRY = 0x02
PROP_CONTENT_TYPE = 0x03
PROP_RESPONSE_TOPIC = 0x08
PROP_CORRELATION_DATA = 0x09
PROP_SUBSCRIPTION_ID = 0x0B
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEPALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS_MAXIMUM = 0x22
PROP_TOPIC_ALIAS = 0x23
PROP_MAXIMUM_QOS = 0x24
PROP_RETAIN_AVAILABLE = 0x25
PROP_USER_PROPERTY = 0x26
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_WILDCARD_SUB = 0x28
PROP_SUB_ID_AVAILABLE = 0x29
PROP_SHARED_SUB = 0x2A


def encode_utf8(text: str | bytes) -> bytes:
    """An MQTT string or binary data: 2-byte length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return _U16.pack(len(raw)) + raw


def publish_properties(
    *,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    message_expiry: int | None = None,
    content_type: str | None = None,
) -> bytes:
    """PUBLISH properties (a command's, a command ack's), encoded without their length prefix."""
    props = b""
    if message_expiry is not None:
        props += bytes((PROP_MESSAGE_EXPIRY,)) + _U32.pack(message_expiry)
    if content_type is not None:
        props += bytes((PROP_CONTENT_TYPE,)) + encode_utf8(content_type)
    if response_topic is not None:
        props += bytes((PROP_RESPONSE_TOPIC,)) + encode_utf8(response_topic)
    if correlation_data is not None:
        props += bytes((PROP_CORRELATION_DATA,)) + encode_utf8(correlation_data)
    return props


def parse_properties(data: bytes, pos: int, end: int) -> dict[int, object]:
    """MQTT 5 properties between ``pos`` and ``end``; user properties are skipped."""
    props: dict[int, object] = {}
    while pos < end:
        pid = data[pos]
        pos += 1
        if pid in (PROP_PAYLOAD_FORMAT, PROP_MAXIMUM_QOS, PROP_RETAIN_AVAILABLE) or pid in (
            PROP_WILDCARD_SUB,
            PROP_SUB_ID_AVAILABLE,
            PROP_SHARED_SUB,
        ):
            props[pid] = data[pos]
            pos += 1
        elif pid in (PROP_MESSAGE_EXPIRY, PROP_SESSION_EXPIRY, PROP_MAXIMUM_PACKET_SIZE):
            props[pid] = _U32.unpack_from(data, pos)[0]
            pos += 4
        elif pid in (PROP_RECEIVE_MAXIMUM, PROP_TOPIC_ALIAS_MAXIMUM, PROP_TOPIC_ALIAS, PROP_SERVER_KEEPALIVE):
            props[pid] = _U16.unpack_from(data, pos)[0]
            pos += 2
        elif pid == PROP_SUBSCRIPTION_ID:
            props[pid], pos = decode_varint(data, pos)
        elif pid in (PROP_CONTENT_TYPE, PROP_RESPONSE_TOPIC, PROP_ASSIGNED_CLIENT_ID, PROP_REASON_STRING):
            (n,) = _U16.unpack_from(data, pos)
            props[pid] = bytes(data[pos + 2 : pos + 2 + n]).decode("utf-8", "replace")
            pos += 2 + n
        elif pid == PROP_CORRELATION_DATA:
            (n,) = _U16.unpack_from(data, pos)
            props[pid] = bytes(data[pos + 2 : pos + 2 + n])
            pos += 2 + n
        elif pid == PROP_USER_PROPERTY:
            for _ in range(2):
                (n,) = _U16.unpack_from(data, pos)
                pos += 2 + n
        else:
            # Other properties (auth method/data, server reference...) are never sent to a
            # plain client here; stop rather than misparse.
            break
    return props
