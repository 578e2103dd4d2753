"""Mosquitto's own log lines, as published on ``$SYS/broker/log/N`` (``log_dest topic``).

Connection events are what the broker knows and the registry cannot see from
device topics: a connect, a clean DISCONNECT, a socket closed without one, a
keepalive expiry. The wording is Mosquitto 2.0's (src/loop.c, handle_connect.c);
a line this module does not know is no event (counted by the caller).
A session take-over ("Client X already connected, closing old connection.",
level E) logs no end line for the old connection, only the new connect, so a
device that reconnects under the same id stays online.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

LOG_TOPIC = "$SYS/broker/log/N"
"""Notice level: connects and disconnects (needs ``connection_messages true``, ``log_type notice``)."""


class Cause(StrEnum):
    """Why a device's presence changed (recorded with each transition)."""

    connected = "connected"
    """The broker accepted its CONNECT."""
    message = "message"
    """It sent telemetry, an ack or a live status while shown offline (e.g. connected while the registry was away)."""
    disconnected = "disconnected"
    """Clean MQTT DISCONNECT."""
    will = "will"
    """The connection ended without DISCONNECT (process killed, socket error): the broker sent its will."""
    timeout = "timeout"
    """No packet within 1.5 × keepalive (network cut, frozen process): the broker dropped it, will sent."""
    kicked = "kicked"
    """Disconnected by an administrative action (disabled, deleted, credentials rotated)."""
    broker_restart = "broker_restart"
    """The registry's link to the broker dropped: every device is offline until it is heard from again."""
    registry_restart = "registry_restart"
    """The registry (re)started: events while it was away are unknown; devices are re-confirmed as they speak."""
    events_lost = "events_lost"
    """The registry's DB stayed away so long that its in-memory backlog hit its bound: treated like a restart."""


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    client_id: str
    online: bool
    cause: Cause
    broker_time: str
    """The line's own stamp: epoch seconds, or as ``log_timestamp_format`` says (ours: ISO 8601)."""


_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(")
_ENDINGS: tuple[tuple[re.Pattern[str], Cause], ...] = (
    (re.compile(r"Client (\S+) disconnected\.$"), Cause.disconnected),
    (re.compile(r"Client (\S+) closed its connection\.$"), Cause.will),
    (re.compile(r"Client (\S+) has exceeded timeout, disconnecting\.$"), Cause.timeout),
    (re.compile(r"Socket error on client (\S+), disconnecting\.$"), Cause.will),
    (re.compile(r"Client (\S+) disconnected due to protocol error\.$"), Cause.will),
    # 2.0.11 writes "Client X been disconnected …" (sic); later versions add the "has".
    (re.compile(r"Client (\S+) (?:has )?been disconnected by administrative action\.$"), Cause.kicked),
)
MAX_LINE = 1024
"""Longer payloads are no log line of interest (client ids are ≤ 64 characters here)."""


def parse_line(payload: bytes | bytearray) -> ConnectionEvent | None:
    """``b"2026-12-01T05:38:10: New client connected from ... as dev-1 (p5, c1, k60, u'dev-1')."`` → an event, or None.

    "Client X disconnected, not authorised." is deliberately no event: a refused
    CONNECT under a live device's id must not mark that device offline.
    """
    if len(payload) > MAX_LINE:
        return None
    try:
        stamp, sep, message = bytes(payload).decode().partition(": ")
    except UnicodeDecodeError:
        return None
    if not sep:
        return None
    if message.startswith("New client connected"):
        found = _CONNECTED.match(message)
        return ConnectionEvent(found.group(1), True, Cause.connected, stamp) if found else None
    for pattern, cause in _ENDINGS:
        found = pattern.match(message)
        if found:
            return ConnectionEvent(found.group(1), False, cause, stamp)
    return None
