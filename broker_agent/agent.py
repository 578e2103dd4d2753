"""The device table of one broker, applied to the broker's device file in coalesced batches.

Every change request (the registry's) waits in a queue; one writer task takes
everything that arrived within ``batch_window_ms``, applies it to the in-memory
table, writes the device file (temp file, fsync, rename: the broker never
reads a half-written file), SIGHUPs the broker and waits until the broker has
reloaded — proven by a probe CONNECT with a password that only the new file
holds — before answering every request of the batch. So when the registry's
API call returns, a created device can connect and a disabled, deleted,
rotated or re-typed one has been kicked (the device plugin kicks every device
whose entry went away or changed: mosquitto/plugin/README.md).

The agent only ever writes its own files: the platform's accounts live in
dynamic security, which the agent never touches, and usernames in the
platform's namespace (``iotfleet-``) are refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iotfleet import broker_files
from iotfleet.mqtt_wire import encode_varint

log = logging.getLogger("broker-agent")

PLATFORM_PREFIX = "iotfleet-"
"""The platform's account namespace: never a device entry."""
PROBE_USER = "iotfleet-broker-agent"
"""The agent's own device-file entry, re-keyed at every write to prove the broker reloaded."""
PROBE_TYPE = "iotfleet_probe"
"""Its type: no device type has it, so the probe owns no device's topics."""


class AgentError(Exception):
    """The files could not be written."""


@dataclass
class Change:
    upsert: dict[str, broker_files.DeviceEntry]
    remove: list[str]
    done: asyncio.Future[ApplyResult]


@dataclass(frozen=True)
class ApplyResult:
    generation: int
    devices: int
    reloaded: bool
    write_s: float
    reload_s: float


@dataclass
class AgentFiles:
    devices_file: Path
    broker_pid_file: Path


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.devices = Gauge("broker_agent_devices", "Device entries in the device file", registry=registry)
        self.changes = Counter("broker_agent_changes", "Device entries changed", ["kind"], registry=registry)
        self.writes = Counter("broker_agent_writes", "Device file writes (one per batch)", registry=registry)
        self.write_seconds = Histogram(
            "broker_agent_write_seconds",
            "Render + write + fsync + rename of the device file",
            registry=registry,
        )
        self.reload_seconds = Histogram(
            "broker_agent_reload_seconds", "SIGHUP until the broker accepted the new file", registry=registry
        )
        self.reload_failures = Counter(
            "broker_agent_reload_failures", "Reloads not confirmed (broker down or slow)", registry=registry
        )


@dataclass
class Agent:
    files: AgentFiles
    broker_host: str
    broker_port: int
    metrics: AgentMetrics
    batch_window_s: float = 0.005
    reload_timeout_s: float = 10.0
    boot_id: str = field(default_factory=lambda: secrets.token_hex(8))
    entries: dict[str, broker_files.DeviceEntry] = field(default_factory=dict)
    generation: int = 0
    last_error: str | None = None
    """Why the last write failed (None: the files are current)."""
    broker_state: str = "not reloaded yet"
    _queue: list[Change] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _probe_password: str = ""

    def load(self) -> None:
        """Start from the device file this agent wrote before (the broker keeps working meanwhile)."""
        try:
            stored = broker_files.parse_devices_file(self.files.devices_file.read_text())
        except FileNotFoundError:
            stored = {}
        stored.pop(PROBE_USER, None)
        self.entries = stored
        self.metrics.devices.set(len(self.entries))
        log.info("loaded %d device entries from %s", len(self.entries), self.files.devices_file)

    async def submit(self, upsert: dict[str, broker_files.DeviceEntry], remove: list[str]) -> ApplyResult:
        """Queue a change; returns once it is on disk and the broker reloaded (or could not)."""
        bad = [u for u in [*upsert, *remove] if u.startswith(PLATFORM_PREFIX)]
        if bad:
            raise ValueError(f"usernames in the platform namespace are not devices: {', '.join(bad[:5])}")
        done: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._queue.append(Change(upsert, remove, done))
        self._wake.set()
        return await done

    async def run(self) -> None:
        """The one writer: write the initial files, then one write + reload per batch of changes."""
        try:
            await self._write_and_reload()
        except Exception as exc:  # reported on /healthz; the next batch retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("writing the device files failed: %s", self.last_error)
        while True:
            await self._wake.wait()
            if self.batch_window_s:
                await asyncio.sleep(self.batch_window_s)  # let a burst of requests share one reload
            self._wake.clear()
            batch, self._queue = self._queue, []
            for change in batch:
                for username in change.remove:
                    if self.entries.pop(username, None) is not None:
                        self.metrics.changes.labels("removed").inc()
                for username, entry in change.upsert.items():
                    kind = "changed" if username in self.entries else "added"
                    if self.entries.get(username) != entry:
                        self.metrics.changes.labels(kind).inc()
                    self.entries[username] = entry
            try:
                result = await self._write_and_reload()
            except Exception as exc:  # every waiting request learns it; the next batch retries
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("writing the device files failed: %s", self.last_error)
                for change in batch:
                    if not change.done.done():
                        change.done.set_exception(AgentError(self.last_error))
                continue
            for change in batch:
                if not change.done.done():
                    change.done.set_result(result)

    async def _write_and_reload(self) -> ApplyResult:
        self.generation += 1
        self._probe_password = broker_files.new_device_password()
        probe = broker_files.DeviceEntry(PROBE_TYPE, broker_files.hash_password(self._probe_password))
        entries = [*self.entries.items(), (PROBE_USER, probe)]
        started = time.monotonic()
        # Rendering 100,000 lines and fsyncing ~11 MB takes tens of ms: off the event loop.
        await asyncio.to_thread(self._write, entries)
        write_s = time.monotonic() - started
        self.metrics.writes.inc()
        self.metrics.write_seconds.observe(write_s)
        self.metrics.devices.set(len(self.entries))
        started = time.monotonic()
        reloaded = await self._reload()
        reload_s = time.monotonic() - started
        self.last_error = None
        if reloaded:
            self.metrics.reload_seconds.observe(reload_s)
            self.broker_state = "reloaded"
        else:
            self.metrics.reload_failures.inc()
        log.info(
            "generation %d: %d devices written in %.3f s, broker %s in %.3f s",
            self.generation,
            len(self.entries),
            write_s,
            "reloaded" if reloaded else "NOT reloaded (not running?)",
            reload_s,
        )
        return ApplyResult(
            self.generation, len(self.entries), reloaded, round(write_s, 4), round(reload_s, 4)
        )

    def _write(self, entries: list[tuple[str, broker_files.DeviceEntry]]) -> None:
        broker_files.write_atomic(self.files.devices_file, broker_files.devices_file_text(entries))

    def _broker_pid(self) -> int | None:
        try:
            pid = int(self.files.broker_pid_file.read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    async def _reload(self) -> bool:
        """SIGHUP the broker and wait until it accepts the probe password only the new file holds."""
        pid = self._broker_pid()
        if pid is None:
            self.broker_state = f"not running (no live pid in {self.files.broker_pid_file})"
            return False  # it reads the files when it starts
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + self.reload_timeout_s
        while time.monotonic() < deadline:
            try:
                if await self._probe():
                    return True
            except OSError as exc:
                self.broker_state = f"probe failed: {exc}"
            await asyncio.sleep(0.005)
        self.broker_state = f"did not confirm the reload within {self.reload_timeout_s:.0f} s"
        log.warning("broker %s", self.broker_state)
        return False

    async def _probe(self) -> bool:
        """An MQTT 3.1.1 CONNECT with the probe account: CONNACK 0 = the new file is live."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.broker_host, self.broker_port), timeout=2.0
        )
        try:
            writer.write(
                # client id = username: the device plugin accepts nothing else
                _connect_packet(PROBE_USER, PROBE_USER, self._probe_password)
            )
            await writer.drain()
            connack = await asyncio.wait_for(reader.readexactly(4), timeout=self.reload_timeout_s)
            accepted = connack[0] == 0x20 and connack[3] == 0
            if accepted:
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            return accepted
        except (asyncio.IncompleteReadError, TimeoutError):
            return False
        finally:
            writer.close()


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 10) + _utf8(client_id)
    body += _utf8(username) + _utf8(password)
    return b"\x10" + encode_varint(len(body)) + body
