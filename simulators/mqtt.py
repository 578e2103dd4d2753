"""A lean asyncio MQTT 5 client for simulated devices: one small Protocol per device connection.

Why not aiomqtt/paho per device: measured on the reference machine (2 cores), a
fleet of one aiomqtt client per device publishes 1,300-3,000 QoS 1 readings/s
and costs ~13 KB per client, because every client carries its own paho state
machine, locks, task and buffers. A device needs only a small subset of
MQTT 5 — CONNECT (with a will), PUBLISH/PUBACK at QoS 0/1, SUBSCRIBE/SUBACK,
PINGREQ and DISCONNECT — and an ``asyncio.Protocol`` callback per connection
has no task, no queue and no lock. The fleet measures >10,000 readings/s from
one process with this client (see ``bench/simulator.py``).

Scope (on purpose): client side only; no QoS 2, no topic aliases, no AUTH
packet, no session resumption (a reconnect resends unacknowledged publishes,
at least once, which the platform's idempotent writes absorb).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iotfleet.mqtt_wire import (
    PROP_CORRELATION_DATA,
    PROP_MESSAGE_EXPIRY,
    PROP_RECEIVE_MAXIMUM,
    PROP_RESPONSE_TOPIC,
    PROP_SESSION_EXPIRY,
    MalformedPacketError,
    decode_varint,
    encode_utf8,
    encode_varint,
    parse_properties,
)
from simulators.tls import TlsBridge

# Packet types (high nibble of the first byte).
CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82  # SUBSCRIBE has fixed flags 0b0010
SUBACK = 0x90
PINGREQ_PACKET = b"\xc0\x00"
PINGRESP = 0xD0
DISCONNECT = 0xE0
DISCONNECT_NORMAL = b"\xe0\x00"
# Normal disconnection that also ends the session (session expiry interval property = 0).
DISCONNECT_END_SESSION = b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class MqttError(Exception):
    """A protocol error or a refusal by the broker."""


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    keepalive: int,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_retain: bool = True,
    will_qos: int = 1,
    session_expiry: int = 0,
    receive_maximum: int = 0,
    clean_start: bool = True,
) -> bytes:
    flags = 0x02 if clean_start else 0x00
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    props = b""
    if session_expiry:
        props += bytes((PROP_SESSION_EXPIRY,)) + _U32.pack(session_expiry)
    if receive_maximum:
        props += bytes((PROP_RECEIVE_MAXIMUM,)) + _U16.pack(receive_maximum)
    body = encode_utf8("MQTT") + bytes((5, flags)) + _U16.pack(keepalive) + encode_varint(len(props)) + props
    body += encode_utf8(client_id)
    if will_topic is not None:
        body += b"\x00" + encode_utf8(will_topic) + encode_utf8(will_payload)
    if username is not None:
        body += encode_utf8(username)
    if password is not None:
        body += encode_utf8(password)
    return _packet(CONNECT, body)


def encode_publish(
    topic_bytes: bytes,
    payload: bytes,
    *,
    qos: int,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
    properties: bytes = b"",
) -> bytes:
    """A PUBLISH packet; ``topic_bytes`` is the topic already length-prefixed (see ``topic_prefix``)."""
    first = PUBLISH | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    head = topic_bytes + (_U16.pack(packet_id) if qos else b"") + encode_varint(len(properties)) + properties
    return bytes((first,)) + encode_varint(len(head) + len(payload)) + head + payload


def topic_prefix(topic: str) -> bytes:
    """A topic encoded once as an MQTT string, reused for every publish of a device."""
    return encode_utf8(topic)


def encode_subscribe(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    return _packet(SUBSCRIBE, _U16.pack(packet_id) + b"\x00" + encode_utf8(topic_filter) + bytes((qos,)))


def with_dup_flag(packet: bytes) -> bytes:
    """The same PUBLISH with DUP set, for a resend after a reconnect."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


@dataclass(slots=True)
class IncomingPublish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None


def parse_publish(flags: int, body: bytes) -> IncomingPublish:
    qos = (flags >> 1) & 0x03
    (tlen,) = _U16.unpack_from(body, 0)
    topic = body[2 : 2 + tlen].decode("utf-8", "replace")
    pos = 2 + tlen
    if qos:
        pos += 2
    plen, pos = decode_varint(body, pos)
    props = parse_properties(body, pos, pos + plen) if plen else {}
    pos += plen
    message = IncomingPublish(topic, body[pos:], qos, bool(flags & 0x01))
    if props:
        rt = props.get(PROP_RESPONSE_TOPIC)
        cd = props.get(PROP_CORRELATION_DATA)
        me = props.get(PROP_MESSAGE_EXPIRY)
        message.response_topic = rt if isinstance(rt, str) else None
        message.correlation_data = cd if isinstance(cd, bytes) else None
        message.message_expiry = me if isinstance(me, int) else None
    return message


class MqttHandler:
    """What a connection reports to its owner (the simulated device). Override what you need."""

    def on_connack(self, reason: int, session_present: bool, receive_maximum: int) -> None: ...
    def on_puback(self, packet_id: int, reason: int) -> None: ...
    def on_suback(self, packet_id: int, reasons: bytes) -> None: ...
    def on_message(self, message: IncomingPublish, packet_id: int) -> None: ...
    def on_disconnect(self, exc: Exception | None) -> None: ...


class MqttConnection(asyncio.Protocol):
    """One TCP connection speaking the client side of MQTT 5. Callbacks go to ``handler``.

    Kept deliberately small (``__slots__``, no task, no queue): ten thousand of
    these live in one process. Writes go straight to the transport; asyncio
    buffers them when the socket is full (``paused`` tells the owner).
    """

    __slots__ = ("_buf", "closed", "handler", "last_tx", "paused", "transport")

    def __init__(self, handler: MqttHandler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.closed = False
        self.paused = False
        self.last_tx = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        size = len(buf)
        handler = self.handler
        try:
            while size - pos >= 2:
                first = buf[pos]
                # Fast path: PUBACK with no reason code (the common case at QoS 1).
                if first == PUBACK and buf[pos + 1] == 2 and size - pos >= 4:
                    handler.on_puback((buf[pos + 2] << 8) | buf[pos + 3], 0)
                    pos += 4
                    continue
                try:
                    length, body_start = decode_varint(buf, pos + 1)
                except IndexError:
                    break
                end = body_start + length
                if end > size:
                    break
                body = buf[body_start:end]
                pos = end
                self._dispatch(first, body)
        except (MqttError, MalformedPacketError) as exc:
            self._buf = b""
            self.abort(exc if isinstance(exc, MqttError) else MqttError(str(exc)))
            return
        self._buf = buf[pos:] if pos < size else b""

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        handler = self.handler
        if kind == PUBLISH:
            message = parse_publish(first & 0x0F, body)
            packet_id = 0
            if message.qos:
                (packet_id,) = _U16.unpack_from(body, 2 + _U16.unpack_from(body, 0)[0])
            handler.on_message(message, packet_id)
        elif kind == PUBACK:
            handler.on_puback(_U16.unpack_from(body, 0)[0], body[2] if len(body) > 2 else 0)
        elif kind == CONNACK:
            reason = body[1]
            receive_maximum = 65_535
            if len(body) > 2:
                plen, pos = decode_varint(body, 2)
                props = parse_properties(body, pos, pos + plen)
                rm = props.get(PROP_RECEIVE_MAXIMUM)
                if isinstance(rm, int):
                    receive_maximum = rm
            handler.on_connack(reason, bool(body[0] & 0x01), receive_maximum)
        elif kind == SUBACK:
            (packet_id,) = _U16.unpack_from(body, 0)
            plen, pos = decode_varint(body, 2)
            handler.on_suback(packet_id, body[pos + plen :])
        elif kind == PINGRESP:
            pass
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            self.abort(MqttError(f"broker sent DISCONNECT (reason 0x{reason:02x})"))
        else:
            raise MqttError(f"unexpected packet type 0x{first:02x}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.transport = None
            self.handler.on_disconnect(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # --- API for the owner ---------------------------------------------------------
    def write(self, packet: bytes, now: float = 0.0) -> bool:
        transport = self.transport
        if transport is None or self.closed:
            return False
        transport.write(packet)
        self.last_tx = now
        return True

    def disconnect(self, end_session: bool = False) -> None:
        """Clean DISCONNECT (reason 0): the broker discards the will (and the session if asked)."""
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(DISCONNECT_END_SESSION if end_session else DISCONNECT_NORMAL)
            transport.close()

    def abort(self, exc: Exception | None = None) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will (LWT)."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        elif not self.closed:
            self.connection_lost(exc)


# Linux: bind() picks no port until connect(), so a port is unique per (source, destination)
# pair and not per source address alone (<linux/in.h> IP_BIND_ADDRESS_NO_PORT, Linux 4.2+).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_resolved: dict[tuple[str, int], Any] = {}


async def _connect_from(host: str, port: int, source: str) -> socket.socket:
    """A TCP socket to (host, port) opened from the local address ``source``."""
    loop = asyncio.get_running_loop()
    address = _resolved.get((host, port))
    if address is None:  # once per process: 100,000 lookups would queue on the executor
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=socket.AF_INET)
        if not infos:
            raise OSError(f"cannot resolve {host}")
        address = _resolved[(host, port)] = infos[0][4]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if sys.platform == "linux":
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(
    handler: MqttHandler,
    host: str,
    port: int,
    connect_packet: bytes,
    *,
    connect_timeout_s: float = 10.0,
    now: Callable[[], float] | None = None,
    source: str | None = None,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> MqttConnection:
    """Open TCP (from ``source`` if given), TLS if ``tls`` (context, server host name) is given, send
    CONNECT; the CONNACK arrives later through ``handler.on_connack``."""
    loop = asyncio.get_running_loop()
    protocol = MqttConnection(handler)

    def factory() -> asyncio.Protocol:
        if tls is None:
            return protocol
        return TlsBridge(tls[0], tls[1], protocol)

    async def connect() -> None:
        if source is None:
            transport, outer = await loop.create_connection(factory, host, port)
        else:
            sock = await _connect_from(host, port, source)
            transport, outer = await loop.create_connection(factory, sock=sock)
        if isinstance(outer, TlsBridge):
            try:
                await outer.handshake()
            except BaseException:  # refused, or the connect timeout: no half-open socket left behind
                transport.abort()
                raise

    await asyncio.wait_for(connect(), connect_timeout_s)
    protocol.write(connect_packet, now() if now else loop.time())
    return protocol
