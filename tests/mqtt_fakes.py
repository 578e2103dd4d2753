"""A stand-in for the broker's side of iotfleet.mqtt_client connections, for unit tests."""

from __future__ import annotations

import struct

from iotfleet import mqtt_client as m


class Wire:
    """A transport that keeps what the client writes, split into packets."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def write(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            length, at = m._read_varint(data, pos + 1) or (0, 0)
            self.packets.append(data[pos : at + length])
            pos = at + length

    def publishes(self) -> list[tuple[int, int, str]]:
        """(first byte, packet id, topic) of every PUBLISH written."""
        out = []
        for raw in self.packets:
            if raw[0] & 0xF0 == m.PUBLISH:
                _, at = m._read_varint(raw, 1) or (0, 0)
                topic_len = struct.unpack(">H", raw[at : at + 2])[0]
                topic = raw[at + 2 : at + 2 + topic_len].decode()
                (packet_id,) = struct.unpack(">H", raw[at + 2 + topic_len : at + 4 + topic_len])
                out.append((raw[0], packet_id, topic))
        return out


def attach(client: m.MqttClient, epoch: int, *, window: int = 0xFFFF, session_present: bool = False) -> Wire:
    """What a successful (re)connection does: a new connection, the broker's window, then the resend."""
    wire = Wire()
    conn = m._Connection(client, epoch)
    conn.transport = wire  # type: ignore[assignment]
    client._conn = conn
    client._epoch = epoch
    client._send_window = window
    client.session_present = session_present
    client._resend()
    client._connected = True
    return wire


def puback(packet_id: int, reason: int = 0) -> bytes:
    return struct.pack(">BBHB", 0x40, 3, packet_id, reason)
