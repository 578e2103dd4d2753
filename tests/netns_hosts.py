"""Hosts for multi-host tests: Linux network namespaces joined by a bridge, with addresses of our own.

``HostNetwork`` makes N "hosts" (one network namespace each, loopback up, one veth
pair whose outer end is enslaved to a bridge in the root namespace) on a random
/24 of 10.219.0.0/16, so parallel runs do not collide. The bridge carries an
address too (``.254``): the test process itself, in the root namespace, reaches
every host (to query InfluxDB, poll the API, watch the broker).

A host runs processes (``ip netns exec NS argv``, its own env) and tracks them;
``cut(host)`` takes its link down (its peers see nothing more: no FIN, no RST —
a pulled cable), ``kill_all(host)`` sends SIGKILL to every process in the
namespace (``ip netns pids``: also the daemons a process left behind, such as
PostgreSQL's postmaster). ``close()`` kills what runs in the namespaces and
deletes the links, the namespaces and the bridge, also after a failure.

Needs root and iproute2 (``ip netns``): ``require_netns()`` skips the test
otherwise, with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET_POOL = ipaddress.ip_network("10.219.0.0/16")
BRIDGE_HOST_OCTET = 254  # the root namespace's address on the bridge


def require_netns() -> None:
    """Skip (with the reason) where namespaces cannot be made: not root, or no ``ip netns``."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root (ip netns add, veth pairs)")
    if shutil.which("ip") is None:
        pytest.skip("multi-host tests need iproute2's `ip`")
    probe = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns` is unavailable here: {probe.stderr.strip()}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _subnets_in_use() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))[1:-1]
    for _ in range(64):
        subnet = candidates[secrets.randbelow(len(candidates))]
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free /24 in 10.219.0.0/16 for the test hosts")


@dataclass
class HostProcess:
    """A process we started in a host; stopped only by its pid (or with its namespace)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class Host:
    """One network namespace with one address on the test's bridge."""

    name: str
    netns: str
    address: str
    veth: str  # the outer end, in the root namespace (on the bridge)
    processes: list[HostProcess] = field(default_factory=list)

    def exec_prefix(self) -> list[str]:
        """What runs a command inside this host: ``[*prefix, *argv]``."""
        return ["ip", "netns", "exec", self.netns]

    def spawn(
        self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> HostProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*self.exec_prefix(), *argv],
                env=dict(env) if env is not None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = HostProcess(name, proc, log_path)
        self.processes.append(started)
        return started

    def pids(self) -> list[int]:
        """Every process in the namespace, ours or left behind by ours (daemons)."""
        done = _ip("netns", "pids", self.netns, check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def cut(self) -> None:
        """Pull the cable: the link goes down, the peers are told nothing."""
        _ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.veth, "up")

    def kill_all(self) -> int:
        """SIGKILL every process in the namespace (no shutdown code runs); how many were killed."""
        killed = 0
        for _ in range(5):  # a dying parent may still fork: repeat until the namespace is empty
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            for process in self.processes:
                try:
                    process.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.processes = [p for p in self.processes if p.alive()]
        return killed


class HostNetwork:
    """N hosts on one bridge; a context manager that removes everything it made."""

    def __init__(self, names: Iterable[str]) -> None:
        self.token = secrets.token_hex(3)
        self.subnet = _free_subnet()
        addresses = list(self.subnet.hosts())
        self.bridge = f"ifb{self.token}"
        self.gateway = str(addresses[BRIDGE_HOST_OCTET - 1])
        self.hosts: dict[str, Host] = {}
        self._names = list(names)
        if len(self._names) >= BRIDGE_HOST_OCTET - 1:
            raise ValueError("too many hosts for one /24")
        self._made_bridge = False

    def __enter__(self) -> HostNetwork:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self._names, start=1):
            host = Host(
                name=name,
                netns=f"iotf-{self.token}-{name}",
                address=str(self.subnet.network_address + index),
                veth=f"ifv{self.token}{index}",  # at most 15 characters: ifv + 6 + index
            )
            _ip("netns", "add", host.netns)
            self.hosts[name] = host  # from here on close() removes it
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "route", "add", "default", "via", self.gateway)

    def close(self) -> None:
        for host in self.hosts.values():
            try:
                host.kill_all()
            finally:
                _ip("link", "del", host.veth, check=False)
                _ip("netns", "del", host.netns, check=False)
        self.hosts.clear()
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False
