"""Readiness and health probes shared by the stack supervisor and the test harness."""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Callable

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def port_in_use(host: str, port: int) -> bool:
    """True if something accepts connections on host:port, or the port cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def bind_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on (address not on this host, port taken), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"address {host!r} does not resolve: {exc.strerror}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (tests only: a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_ports(count: int, *, block: int = 0, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports, then (if ``block``) the base of ``block`` consecutive free ones last.

    The sockets stay bound until all are chosen, so the OS cannot hand out one twice.
    """
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
            ports.append(int(sock.getsockname()[1]))
        if block:
            # Start the scan at a random block: concurrent callers (parallel test workers, two stacks
            # started at once) would otherwise all pick the first free block and collide.
            # Below the kernel's ephemeral range: any outgoing connection (and every free_port())
            # takes its port from there, and could take one of the block between now and its use.
            bases = list(range(20_000, _ephemeral_low() - block, block)) or list(range(20_000, 60_000, block))
            start = random.randrange(len(bases))
            for base in bases[start:] + bases[:start]:
                span = range(base, base + block)
                if not any(p in ports for p in span) and not any(port_in_use(host, p) for p in span):
                    ports.append(base)
                    break
            else:
                raise RuntimeError(f"no block of {block} free ports")
        return ports
    finally:
        for sock in held:
            sock.close()


def http_ok(url: str, timeout: float = 1.0, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        response = httpx.get(url, timeout=timeout, verify=verify)
    except httpx.HTTPError:
        return False
    return response.status_code < 300


def mqtt_ok(host: str, port: int, username: str, password: str, timeout: float = 2.0) -> bool:
    """True if the broker answers CONNECT with success for these credentials."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    outcome: dict[str, bool] = {}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        outcome["ok"] = not getattr(reason, "is_failure", True)

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    try:
        while "ok" not in outcome and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        return outcome.get("ok", False)
    finally:
        client.disconnect()


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = "") -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what or 'condition'} not ready after {timeout:.0f} s")
        time.sleep(interval)
