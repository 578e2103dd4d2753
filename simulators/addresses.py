"""Which local (source) addresses a fleet's connections are opened from.

A TCP connection is identified by (source address, source port, destination
address, destination port). Towards one broker port from one source address
there are only as many connections as ephemeral ports: ~28,000 with Linux's
default ``net.ipv4.ip_local_port_range`` (32768-60999). Every address of
127.0.0.0/8 is the local machine, so a simulator on the broker's host opens
its connections from 127.0.0.2, 127.0.0.3, … — ``per_source`` devices each
(20,000 by default, leaving headroom for sockets still in TIME_WAIT after a
connect storm). 127.0.0.1 is left to the platform's own services.

Against a broker on another host the machine has the addresses it has: pass
them explicitly (``--source-address``), or run the fleet from several hosts.
"""

from __future__ import annotations

import ipaddress
import socket

from iotfleet.errors import ConfigError

PER_SOURCE = 20_000
FIRST_LOOPBACK = ipaddress.IPv4Address("127.0.0.2")


def is_loopback(host: str) -> bool:
    """True when ``host`` is (or resolves to) a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def choose(host: str, devices: int, per_source: int = PER_SOURCE) -> list[str]:
    """Source addresses for ``devices`` connections to ``host`` (empty: let the OS pick one)."""
    if per_source < 1:
        raise ConfigError(f"--devices-per-source must be at least 1, got {per_source}")
    if devices <= per_source or not is_loopback(host):
        return []
    needed = -(-devices // per_source)
    if needed > 250:
        raise ConfigError(
            f"{devices:,} devices at {per_source:,} per source address need {needed} loopback addresses"
            " (at most 250): raise --devices-per-source"
        )
    return [str(FIRST_LOOPBACK + i) for i in range(needed)]


def parse(addresses: list[str]) -> list[str]:
    """Validate explicit ``--source-address`` values (IPv4, as the simulator's sockets are)."""
    out = []
    for text in addresses:
        try:
            out.append(str(ipaddress.IPv4Address(text.strip())))
        except ValueError:
            raise ConfigError(f"--source-address {text!r} is not an IPv4 address") from None
    return out
