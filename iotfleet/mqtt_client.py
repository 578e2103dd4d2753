"""A small asyncio MQTT 5 client for the services' hot paths: the ingest and the rules engine.

Why not paho-mqtt here: paho reads the socket one byte at a time for each
packet header, builds an ``MQTTMessage`` and parses MQTT 5 properties per
message, and runs in its own thread, so every message crosses the GIL twice.
Measured on the 2-core reference machine (docs/benchmarks.md) that caps a paho
consumer below the ingest's 15,000 readings/s target, and the thread hops put
tens of milliseconds on the rules engine's reading → command p99. This client
does only what those services need — CONNECT with a persistent session, one
SUBSCRIBE to a few filters, PUBLISH in, PUBACK out (manual, in order), tracked
QoS 1 PUBLISH out (with MQTT 5 properties, an ack callback, the broker's
receive maximum honoured, queued while disconnected and re-sent after a
reconnect), keepalive, reconnect — and parses packets from 256 KiB socket reads
on the caller's event loop. ``telemetry_ingest/paho_transport.py`` keeps a
paho-mqtt implementation of the ingest's interface
(``IOTFLEET_INGEST__TRANSPORT=paho``).

Tokens handed to the sink are ``connection epoch << 16 | packet id``: after a
reconnect the broker redelivers every unacked message with its own packet ids,
so acks of an older connection are dropped, never sent on the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iotfleet import tls_clients
from iotfleet.mqtt_wire import (
    CONNACK_REASONS,
    PROP_RECEIVE_MAXIMUM,
    encode_utf8,
    encode_varint,
    parse_properties,
)
from iotfleet.settings import MqttSettings

log = logging.getLogger(__name__)

Sink = Callable[[str, bytes, int], None]
"""Receives (topic, payload, token) for each PUBLISH, in arrival order."""
StateCallback = Callable[[bool, str], None]
"""Called with (connected, reason) on every connection state change."""
AckCallback = Callable[[int], None]
"""Called with the broker's PUBACK reason code (0 = accepted, >= 0x80 = refused) of a tracked publish."""

CONNECT_TIMEOUT_S = 10.0
RECONNECT_FIRST_S = 0.2
RECONNECT_CAP_S = 5.0

# Packet types (fixed header high nibble).
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBACK = 0x90
UNSUBACK = 0xB0
PINGRESP = 0xD0
DISCONNECT = 0xE0

_PUBACK = struct.Struct(">BBH").pack
_U16 = struct.Struct(">H").pack
_U32 = struct.Struct(">I").pack


class MqttProtocolError(Exception):
    """The broker sent something this client does not accept; the connection is dropped."""


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int,
) -> bytes:
    flags = 0  # clean start 0: resume the session and its backlog
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props = b"\x11" + _U32(session_expiry_s) + b"\x21" + _U16(receive_maximum)
    body = b"\x00\x04MQTT\x05" + bytes([flags]) + _U16(keepalive_s) + encode_varint(len(props)) + props
    body += encode_utf8(client_id)
    if username is not None:
        body += encode_utf8(username)
    if password is not None:
        body += encode_utf8(password)
    return packet(0x10, body)


def subscribe_packet(packet_id: int, topic_filters: tuple[str, ...], qos: int) -> bytes:
    entries = b"".join(encode_utf8(f) + bytes([qos]) for f in topic_filters)
    return packet(0x82, _U16(packet_id) + b"\x00" + entries)


def unsubscribe_packet(packet_id: int, topic_filters: tuple[str, ...]) -> bytes:
    return packet(0xA2, _U16(packet_id) + b"\x00" + b"".join(encode_utf8(f) for f in topic_filters))


def disconnect_packet(*, end_session: bool = False) -> bytes:
    """Normal DISCONNECT; with ``end_session`` the broker deletes the session (expiry set to 0)."""
    if end_session:
        return packet(DISCONNECT, b"\x00\x05\x11" + _U32(0))
    return b"\xe0\x00"


def publish_packet(
    topic: str, payload: bytes, *, qos: int, packet_id: int = 0, properties: bytes = b"", dup: bool = False
) -> bytes:
    body = (
        encode_utf8(topic)
        + (_U16(packet_id) if qos else b"")
        + encode_varint(len(properties))
        + properties
        + payload
    )
    return packet(PUBLISH | (0x08 if dup else 0) | (qos << 1), body)


def _connack_receive_maximum(body: bytes) -> int:
    """The broker's Receive Maximum from a CONNACK body (65,535 when absent): our QoS 1 send window."""
    parsed = _read_varint(body, 2)
    if parsed is None:
        return 0xFFFF
    length, pos = parsed
    value = parse_properties(body, pos, min(len(body), pos + length)).get(PROP_RECEIVE_MAXIMUM)
    return max(1, value) if isinstance(value, int) else 0xFFFF


def _read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None if the bytes end first."""
    value = 0
    shift = 0
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttProtocolError("malformed remaining length")
    return None


@dataclass
class SessionConfig:
    client_id: str
    topic_filters: tuple[str, ...]
    """Subscribed together on every connection; empty for a session that only publishes."""
    qos: int
    receive_maximum: int
    retire: bool = False
    """Resume the session but UNSUBSCRIBE instead of SUBSCRIBE: only the queued backlog arrives."""


@dataclass(slots=True)
class _Outgoing:
    """A tracked QoS 1 publish: kept until the broker's PUBACK."""

    topic: str
    payload: bytes
    properties: bytes
    on_ack: AckCallback | None


class _Connection(asyncio.Protocol):
    """One TCP connection: splits the byte stream into packets."""

    def __init__(self, client: MqttClient, epoch: int) -> None:
        self.client = client
        self.epoch_bits = epoch << 16
        self.transport: asyncio.Transport | None = None
        self.rest = b""
        self.connack: asyncio.Future[tuple[int, bool, int]] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[int] | None = None
        """Created when a (UN)SUBSCRIBE is sent: a publishing-only session never waits for one."""
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        reason = repr(exc) if exc else "closed by the broker"
        for fut in (self.connack, self.suback) if self.suback is not None else (self.connack,):
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)

    def abort(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.rest:
            data = self.rest + data
        pos = 0
        end = len(data)
        sink = self.client.sink
        epoch_bits = self.epoch_bits
        try:
            while end - pos >= 2:
                first = data[pos]
                # Remaining length, inlined for the common 1-2 byte case.
                i = pos + 1
                byte = data[i]
                length = byte & 0x7F
                i += 1
                if byte >= 0x80:
                    parsed = _read_varint(data, pos + 1)
                    if parsed is None:
                        break
                    length, i = parsed
                stop = i + length
                if stop > end:
                    break
                if first & 0xF0 == PUBLISH:
                    topic_len = (data[i] << 8) | data[i + 1]
                    j = i + 2 + topic_len
                    topic = data[i + 2 : j].decode()
                    if first & 0x06:
                        token = epoch_bits | (data[j] << 8) | data[j + 1]
                        j += 2
                    else:
                        token = epoch_bits  # QoS 0: packet id 0, nothing to ack
                    props = data[j]
                    if props < 0x80:
                        j += 1 + props
                    else:
                        skipped = _read_varint(data, j)
                        if skipped is None:
                            raise MqttProtocolError("truncated PUBLISH properties")
                        j = skipped[1] + skipped[0]
                    sink(topic, data[j:stop], token)
                else:
                    self._control(first, data[i:stop])
                pos = stop
        except MqttProtocolError as exc:
            log.error("dropping the broker connection: %s", exc)
            self.abort(str(exc))
            return
        self.rest = data[pos:] if pos < end else b""

    def _control(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBACK:
            if len(body) < 2:
                raise MqttProtocolError("short PUBACK")
            self.client._acked((body[0] << 8) | body[1], body[2] if len(body) > 2 else 0)
        elif kind == PINGRESP:
            return
        elif kind == CONNACK:
            if len(body) < 2:
                raise MqttProtocolError("short CONNACK")
            if not self.connack.done():
                self.connack.set_result((body[1], bool(body[0] & 1), _connack_receive_maximum(body)))
        elif kind == UNSUBACK:
            if self.suback is not None and not self.suback.done():
                self.suback.set_result(0)  # no new messages are routed to this session any more
        elif kind == SUBACK:
            # packet id (2), properties (varint + bytes), one reason code per filter
            parsed = _read_varint(body, 2)
            if parsed is None:
                raise MqttProtocolError("short SUBACK")
            plen, at = parsed
            codes = body[at + plen :] or b"\x80"
            if self.suback is not None and not self.suback.done():
                self.suback.set_result(max(codes))  # the worst: any refused filter refuses the session
        elif kind == DISCONNECT:
            code = body[0] if body else 0
            self.abort(f"broker sent DISCONNECT (reason 0x{code:02x})")
        else:
            raise MqttProtocolError(f"unexpected packet type 0x{first:02x}")


class MqttClient:
    """A persistent MQTT 5 session subscribed to its filters (none: publishing only); reconnects until stopped."""

    def __init__(
        self,
        settings: MqttSettings,
        session: SessionConfig,
        sink: Sink,
        on_state: StateCallback | None = None,
    ) -> None:
        self.settings = settings
        self._ssl = tls_clients.mqtt_context(settings)  # once: every reconnect reuses it
        self.session = session
        self.sink = sink
        self.on_state = on_state or (lambda _up, _why: None)
        self._epoch = 0
        self._conn: _Connection | None = None
        self._connected = False
        self._paused = False
        self._was_up = False
        self._next_id = 0
        self._inflight: dict[int, _Outgoing] = {}
        self._backlog: deque[_Outgoing] = deque()
        self._send_window = 0xFFFF
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self.session_present = False

    @property
    def connected(self) -> bool:
        return self._connected

    # --- used by the pipeline ------------------------------------------------------------

    def ack(self, tokens: list[int]) -> None:
        conn = self._conn
        # Not ``self._connected`` (set once the SUBACK is in): a resumed session's queued messages
        # arrive right after the CONNACK, before the SUBACK. Dropping their acks left them in flight
        # for good, and with a backlog of a whole receive maximum the broker sent nothing more.
        # The epoch in each token keeps acks of an older connection out.
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        epoch_bits = self._epoch << 16
        acks = [_PUBACK(PUBACK, 2, t & 0xFFFF) for t in tokens if t & ~0xFFFF == epoch_bits and t & 0xFFFF]
        if acks:
            conn.transport.write(b"".join(acks))

    def publish(
        self, topic: str, payload: bytes, *, properties: bytes = b"", on_ack: AckCallback | None = None
    ) -> None:
        """QoS 1 publish, kept until the broker acks it: written now if connected and the broker's
        receive maximum allows, else queued (in order) and written on the next connection; one
        written but not acked when a connection drops is written again on the next. ``on_ack``
        gets the PUBACK reason code."""
        self._backlog.append(_Outgoing(topic, payload, properties, on_ack))
        self._all_acked.clear()
        if self._connected:
            self._pump()

    @property
    def unacked(self) -> int:
        """Tracked publishes not acked yet (written or queued)."""
        return len(self._inflight) + len(self._backlog)

    def _pump(self) -> None:
        conn = self._conn
        if conn is None or conn.transport is None:
            return
        chunks = []
        while self._backlog and len(self._inflight) < self._send_window:
            item = self._backlog.popleft()
            packet_id = self._next_id
            for _ in range(0xFFFF):  # the window (at most 65,535) leaves a free id
                packet_id = packet_id % 0xFFFF + 1
                if packet_id not in self._inflight:
                    break
            self._next_id = packet_id
            self._inflight[packet_id] = item
            chunks.append(
                publish_packet(
                    item.topic, item.payload, qos=1, packet_id=packet_id, properties=item.properties
                )
            )
        if chunks:
            conn.transport.write(b"".join(chunks))

    def _resend(self) -> None:
        """On a new connection: the unacked publishes again, in their order, then the queue."""
        conn = self._conn
        if self._inflight and conn is not None and conn.transport is not None:
            dup = self.session_present  # a new session never saw these packet ids: send them as new
            conn.transport.write(
                b"".join(
                    publish_packet(i.topic, i.payload, qos=1, packet_id=pid, properties=i.properties, dup=dup)
                    for pid, i in self._inflight.items()
                )
            )
        self._pump()

    def _acked(self, packet_id: int, reason: int) -> None:
        item = self._inflight.pop(packet_id, None)
        if item is None:
            return  # a PUBACK for an id we no longer track (a duplicate after a resend)
        if item.on_ack is not None:
            try:
                item.on_ack(reason)
            except Exception:  # the caller's bug must not take the connection down
                log.exception("publish ack callback failed for %s", item.topic)
        if self._backlog:
            self._pump()
        elif not self._inflight:
            self._all_acked.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the broker acked every tracked publish; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._all_acked.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def pause_reading(self) -> None:
        self._paused = True
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.resume_reading()

    # --- the session ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe and keep the session up until ``stop`` is set."""
        delay = RECONNECT_FIRST_S
        while not stop.is_set():
            reason = await self._one_connection(stop)
            if stop.is_set():
                return  # if still connected, the caller drains (acks) and then disconnects
            self._connected = False
            self.on_state(False, reason)
            if self._was_up:  # a session that worked: reconnect fast, back off only on failures
                self._was_up = False
                delay = RECONNECT_FIRST_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(RECONNECT_CAP_S, delay * 2)

    async def _one_connection(self, stop: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        self._epoch = (self._epoch + 1) & 0x7FFF_FFFF
        epoch = self._epoch
        s = self.settings
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, epoch),
                    s.host,
                    s.port,
                    ssl=self._ssl,
                    server_hostname=tls_clients.mqtt_server_hostname(s),
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            return f"cannot connect to {s.host}:{s.port}: {exc!r}"
        self._conn = conn
        assert conn.transport is not None
        try:
            conn.transport.write(
                connect_packet(
                    self.session.client_id,
                    username=s.username,
                    password=s.password.get_secret_value() if s.password else None,
                    keepalive_s=s.keepalive_s,
                    session_expiry_s=s.session_expiry_s,
                    receive_maximum=self.session.receive_maximum,
                )
            )
            code, self.session_present, self._send_window = await asyncio.wait_for(
                conn.connack, CONNECT_TIMEOUT_S
            )
            if code >= 0x80:
                conn.abort("refused")
                return f"broker refused the connection: {CONNACK_REASONS.get(code, hex(code))}"
            filters = self.session.topic_filters
            if filters:
                conn.suback = loop.create_future()
                if self.session.retire:
                    conn.transport.write(unsubscribe_packet(1, filters))
                else:
                    conn.transport.write(subscribe_packet(1, filters, self.session.qos))
                granted = await asyncio.wait_for(conn.suback, CONNECT_TIMEOUT_S)
                if granted >= 0x80:
                    conn.abort("subscribe refused")
                    return f"broker refused the subscription to {', '.join(filters)} (reason 0x{granted:02x})"
            self._resend()
            if self._paused:
                conn.transport.pause_reading()
            self._connected = True
            self._was_up = True
            self.on_state(True, "")
            keepalive = asyncio.create_task(self._keepalive(conn))
            stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            await asyncio.wait([conn.closed, stopping], return_when=asyncio.FIRST_COMPLETED)
            keepalive.cancel()
            stopping.cancel()
            if conn.closed.done():
                return conn.closed.result()
            return ""
        except (ConnectionError, TimeoutError) as exc:
            conn.abort(repr(exc))
            return f"connection to {s.host}:{s.port} failed: {exc!r}"

    async def _keepalive(self, conn: _Connection) -> None:
        interval = self.settings.keepalive_s
        while not conn.closed.done():
            await asyncio.sleep(interval / 2)
            if time.monotonic() - conn.last_rx > interval * 1.5:
                conn.abort("no answer from the broker within 1.5 keepalive intervals")
                return
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(b"\xc0\x00")

    async def disconnect(self, *, end_session: bool = False) -> None:
        """Normal DISCONNECT: the session (and its unacked messages) stays for the next start,
        unless ``end_session`` (a retired replica) asks the broker to delete it."""
        conn = self._conn
        self._connected = False
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        conn.transport.write(disconnect_packet(end_session=end_session))
        conn.transport.close()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(conn.closed), 2.0)
