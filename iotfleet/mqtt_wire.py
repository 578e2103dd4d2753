"""MQTT 5 wire primitives shared by the two hand-rolled clients.

The services' client (iotfleet/mqtt_client.py: ingest, rules engine) and the simulator's
many-connection publisher (simulators/mqtt.py) are different clients on purpose
(a few service sessions carrying whole streams, ten thousand small publishers); what they
share is the wire format, kept here once.
"""

from __future__ import annotations

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
