"""The fleet engine: thousands of simulated devices on one asyncio loop.

Each device is a ``SimDevice`` (``__slots__``, a behaviour model, a lean MQTT
connection). There is no task and no timer handle per device: publishing is
driven by a fleet-wide timing wheel (10 ms slots, one ``loop.call_at`` per
slot that has devices due), connections by ``asyncio.Protocol`` callbacks. Counters live once per process in ``Stats``.

Delivery: QoS 1 publishes stay in the device's in-flight table until the
broker's PUBACK; on a lost connection they are resent (DUP) after the
reconnect, and readings taken while offline are buffered (bounded) and sent
on reconnect, as a real device with a small flash buffer would. So a
``--verify`` run can demand zero missing readings even with disconnect faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from iotfleet import topics
from iotfleet.catalogue import get_device_type
from iotfleet.mqtt_wire import CONNACK_REASONS, publish_properties
from iotfleet.topics import Channel
from simulators import mqtt
from simulators.faults import DeviceFaults, FaultKind, FaultSpec, assign_faults
from simulators.models import OUT_OF_RANGE, SPIKES, DeviceModel, make_model
from simulators.tls import ClientContexts, TlsOptions

log = logging.getLogger(__name__)

OFFLINE, CONNECTING, ONLINE, STOPPED = 0, 1, 2, 3
SLOT_S = 0.01  # publish timing resolution
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason: accepted, but nobody subscribed
KIND_TELEMETRY, KIND_OTHER = 0, 1


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a device needs to connect: from the registry's bulk provisioning or a credentials file."""

    id: str
    type: str
    username: str
    password: str
    client_id: str
    # Where the device's seq counter resumes: a real device keeps counting across restarts,
    # and a rerun of the same ids must not look like duplicates of the previous run.
    next_seq: int = 0
    # A certificate device (auth "certificate"): its key and certificate (PEM, one file, 0600),
    # presented in the TLS handshake instead of a password.
    cert_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "username": self.username,
            "password": self.password,
            "client_id": self.client_id,
            "next_seq": self.next_seq,
        }
        if self.cert_file is not None:
            out["cert_file"] = self.cert_file
        return out


@dataclass
class FleetConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    # MQTT over TLS: the CA file the broker's certificate must chain to (None: plain TCP), and
    # the name it must carry (default: host).
    tls_cafile: str | None = None
    tls_server_hostname: str | None = None
    interval_s: float = 10.0
    jitter: float = 0.1  # ± fraction of the interval, so devices do not publish in lockstep
    batch: int = 1  # readings per telemetry message (a JSON array when > 1)
    qos: int = 1
    ramp_up_per_s: float = 1_000.0
    keepalive_s: int = 60
    # How long a device waits for TCP + CONNACK: connect_timeout_s, doubled with each consecutive
    # failure up to connect_timeout_cap_s. After a broker restart the broker may take longer than
    # 10 s to answer each of a fleet's queued CONNECTs; a device that gives up and retries makes
    # the broker's work for its CONNECT wasted and the queue no shorter (a storm that never
    # converges: measured with 30,000 devices on 2 brokers). Patience that grows with failures
    # lets the queue drain.
    connect_timeout_s: float = 10.0
    connect_timeout_cap_s: float = 120.0
    # Reconnect backoff, "full jitter": attempt n waits uniform(0, min(cap, base * 2**n)) seconds.
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    # Local addresses the connections are opened from (empty: the OS picks). One address pair
    # has ~28,000 ephemeral ports, so a large fleet on loopback spreads over 127.0.0.x: the
    # device with fleet-wide index i uses source_addresses[i // per_source].
    source_addresses: list[str] = field(default_factory=list)
    per_source: int = 20_000
    # This process's slice of the fleet: its device j has the fleet-wide index offset + j * stride.
    index_offset: int = 0
    index_stride: int = 1
    offline_buffer: int = 1_000  # readings kept per device while disconnected
    # The broker keeps a device's session (its subscription and QoS 1 commands sent meanwhile)
    # this long while it is away, so commands reach devices that were offline when sent.
    session_expiry_s: int = 3_600
    faults: list[FaultSpec] = field(default_factory=list)
    seed: int = 0
    max_future_s: int = 300  # the ingest's limits: skew beyond them is expected to be dead-lettered
    max_past_s: int = 30 * 86_400
    publish_on_start: bool = False  # first reading right after CONNACK (bench), else spread over 1 interval
    drain_timeout_s: float = 30.0
    # The device contract (telemetry_ingest/README.md): PUBACK 0x10 "no matching subscribers" on a
    # telemetry publish means "not delivered, send again later" (after a broker restart, until the
    # ingest has subscribed again). Resent after 0.5, 1, 2, 4, 8, 8 s (jittered), then given up.
    resend_unrouted: bool = False
    unrouted_retries: int = 6


class Stats:
    """Counters of one process; plain ints (a dict snapshot travels to the parent process)."""

    FIELDS = (
        "devices",
        "connected",
        "connects",
        "connect_failures",
        "disconnects",
        "reconnects",
        "readings_published",
        "messages_published",
        "readings_acked",
        "readings_refused",
        "readings_unrouted",
        "readings_unrouted_resent",
        "readings_unrouted_given_up",
        "readings_resent",
        "readings_dropped",
        "readings_faulted",
        "duplicates_sent",
        "malformed_sent",
        "out_of_range_sent",
        "skewed_sent",
        "spikes_sent",
        "stuck_sent",
        "out_of_order_sent",
        "disconnects_injected",
        "storms_injected",
        "status_published",
        "offline_published",
        "commands_received",
        "commands_invalid",
        "commands_ignored",
        "acks_sent",
        "acks_refused",
        "deltas_received",
        "deltas_invalid",
        "states_reported",
        "subscribe_refused",
        "bytes_sent",
    )
    DICTS = ("connect_errors", "connects_by_source")

    def __init__(self) -> None:
        self.devices = 0
        self.connected = 0
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.reconnects = 0
        self.readings_published = 0
        self.messages_published = 0
        self.readings_acked = 0
        self.readings_refused = 0
        self.readings_unrouted = 0  # PUBACK 0x10 on telemetry (counted each time)
        self.readings_unrouted_resent = 0
        self.readings_unrouted_given_up = 0
        self.readings_resent = 0
        self.readings_dropped = 0
        self.readings_faulted = 0
        self.duplicates_sent = 0
        self.malformed_sent = 0
        self.out_of_range_sent = 0
        self.skewed_sent = 0
        self.spikes_sent = 0
        self.stuck_sent = 0
        self.out_of_order_sent = 0
        self.disconnects_injected = 0
        self.storms_injected = 0
        self.status_published = 0
        self.offline_published = 0
        self.commands_received = 0
        self.commands_invalid = 0
        self.commands_ignored = 0
        self.acks_sent = 0
        self.acks_refused = 0
        self.deltas_received = 0  # desired-state deltas (device shadow), the empty "cleared" ones excluded
        self.deltas_invalid = 0
        self.states_reported = 0
        self.subscribe_refused = 0
        self.bytes_sent = 0
        self.connect_errors: Counter[str] = Counter()
        self.connects_by_source: Counter[str] = Counter()  # the sockets' real local addresses
        self.command_latency_ms: list[float] = []  # command ts → device receipt (same host clock)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.FIELDS}
        for name in self.DICTS:
            out[name] = dict(getattr(self, name))
        return out


class SimDevice(mqtt.MqttHandler):
    """One simulated device: a behaviour model behind one MQTT connection."""

    __slots__ = (
        "attempt",
        "batch",
        "conn",
        "creds",
        "dropped",
        "faults",
        "fleet",
        "held",
        "inflight",
        "model",
        "next_at",
        "pending",
        "pid",
        "rejected",
        "resend",
        "scheduled",
        "seq",
        "source",
        "state",
        "sub_pid",
        "topic_acks",
        "topic_status",
        "topic_telemetry",
        "unrouted",
        "unrouted_lost",
        "was_online",
    )

    def __init__(
        self, fleet: Fleet, creds: DeviceCredentials, faults: DeviceFaults | None, source: str | None = None
    ) -> None:
        self.fleet = fleet
        self.creds = creds
        self.source = source
        self.model: DeviceModel = make_model(creds.type, fleet.rng, time.time())
        self.faults = faults
        self.conn: mqtt.MqttConnection | None = None
        self.state = OFFLINE
        self.seq = creds.next_seq
        self.pid = 0
        self.sub_pid = 0
        self.attempt = 0
        self.inflight: dict[int, tuple[bytes, int, int]] = {}  # pid → (packet, first seq, readings)
        self.resend: list[tuple[bytes, int, int]] | None = None
        self.pending: list[tuple[bytes, int, int]] | None = None  # built while offline
        self.batch: list[dict[str, Any]] | None = None
        self.held: tuple[bytes, int, int] | None = None  # out_of_order: published after the next one
        self.rejected: list[int] | None = None  # seqs we expect the platform to dead-letter
        self.dropped: list[int] | None = None  # seqs never sent (offline buffer full)
        # PUBACK 0x10'd telemetry waiting to be sent again: first seq → (tries, timer, entry).
        self.unrouted: dict[int, tuple[int, asyncio.TimerHandle | None, tuple[bytes, int, int]]] | None = None
        self.unrouted_lost: list[int] | None = None  # seqs given up after the last retry
        self.was_online = False
        self.scheduled = False
        self.next_at = 0.0
        self.topic_telemetry = mqtt.topic_prefix(topics.device_topic(creds.type, creds.id, Channel.TELEMETRY))
        self.topic_status = mqtt.topic_prefix(topics.device_topic(creds.type, creds.id, Channel.STATUS))
        self.topic_acks = mqtt.topic_prefix(topics.device_topic(creds.type, creds.id, Channel.ACKS))

    # --- connection ------------------------------------------------------------------
    def connect_packet(self) -> bytes:
        c = self.creds
        return mqtt.encode_connect(
            c.client_id,
            username=c.username,
            password=None if c.cert_file is not None else c.password,
            keepalive=self.fleet.config.keepalive_s,
            will_topic=topics.device_topic(c.type, c.id, Channel.STATUS),
            will_payload=topics.STATUS_OFFLINE,
            will_retain=True,
            will_qos=1,
            session_expiry=self.fleet.config.session_expiry_s,
            # A run starts from a clean session; a reconnect resumes it (queued commands arrive).
            clean_start=not self.was_online,
        )

    async def connect(self) -> None:
        if self.state != OFFLINE:
            return
        fleet = self.fleet
        self.state = CONNECTING
        try:
            self.conn = await mqtt.open_connection(
                self,
                fleet.config.host,
                fleet.config.port,
                self.connect_packet(),
                connect_timeout_s=self.connect_timeout(),
                source=self.source,
                tls=fleet.tls_for(self.creds),
            )
        except (OSError, TimeoutError) as exc:
            self._connect_failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        # No CONNACK in time: drop it and retry (a broker at its limits answers late or never).
        conn = self.conn
        fleet.loop.call_later(self.connect_timeout(), self._connack_deadline, conn)

    def connect_timeout(self) -> float:
        cfg = self.fleet.config
        return min(cfg.connect_timeout_cap_s, cfg.connect_timeout_s * (1 << min(self.attempt, 8)))

    def _connack_deadline(self, conn: mqtt.MqttConnection) -> None:
        if self.conn is conn and self.state == CONNECTING:
            conn.closed = True  # counted here, not again as "closed before CONNACK"
            conn.abort()
            self._connect_failed("no CONNACK in time")

    def _connect_failed(self, reason: str) -> None:
        stats = self.fleet.stats
        stats.connect_failures += 1
        stats.connect_errors[reason] += 1
        self.state = OFFLINE
        self.conn = None
        self._schedule_reconnect()

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        fleet = self.fleet
        if fleet.stopping:
            self.state = STOPPED
            return
        if delay is None:
            delay = backoff_delay(self.attempt, fleet.config, fleet.rng)
            self.attempt += 1
        fleet.loop.call_later(delay, fleet.start_connect, self)

    def on_connack(self, reason: int, session_present: bool, receive_maximum: int) -> None:
        fleet = self.fleet
        if reason != 0:
            conn = self.conn
            self.conn = None
            self.state = OFFLINE
            if conn is not None:
                conn.closed = True  # this failure is counted here, not again in on_disconnect
                conn.abort()
            self._connect_failed(f"CONNACK 0x{reason:02x} {CONNACK_REASONS.get(reason, '')}".strip())
            return
        stats = fleet.stats
        if self.was_online:
            stats.reconnects += 1
        self.was_online = True
        stats.connects += 1
        stats.connected += 1
        transport = self.conn.transport if self.conn is not None else None
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        stats.connects_by_source[str(sockname[0]) if sockname else "?"] += 1
        self.attempt = 0
        self.state = ONLINE
        now = fleet.loop.time()
        self._publish(self.topic_status, topics.STATUS_ONLINE, KIND_OTHER, retain=True)
        stats.status_published += 1
        self.sub_pid = self._next_pid()
        self._write(mqtt.encode_subscribe(self.sub_pid, self._commands_topic(), 1), now)
        # The device shadow: the retained delta arrives on subscribe (what changed while we were
        # away); the full state is reported first, as a device does after a (re)boot.
        self._write(mqtt.encode_subscribe(self._next_pid(), self._state_topic(Channel.STATE_DELTA), 1), now)
        self._report_state(self.model.state())
        # What the broker never acknowledged goes again, then what was measured while offline.
        resend, self.resend = self.resend, None
        for stored, first_seq, n in resend or ():
            pid = self._next_pid()
            packet = mqtt.with_dup_flag(_replace_pid(stored, pid))
            self.inflight[pid] = (packet, first_seq, n)
            self._write(packet, now)
            stats.readings_resent += n
        pending, self.pending = self.pending, None
        for packet, first_seq, n in pending or ():
            self._send_built(packet, first_seq, n)
        if not self.scheduled and fleet.publishing:
            self._schedule_first()

    def _commands_topic(self) -> str:
        return topics.device_topic(self.creds.type, self.creds.id, Channel.COMMANDS)

    def _state_topic(self, channel: Channel) -> str:
        # Built when needed, not kept per device: shadow traffic is rare next to telemetry.
        return topics.device_topic(self.creds.type, self.creds.id, channel)

    def _report_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        topic = mqtt.topic_prefix(self._state_topic(Channel.STATE_REPORTED))
        self._publish(topic, orjson.dumps(state), KIND_OTHER)
        self.fleet.stats.states_reported += 1

    def on_delta(self, payload: bytes) -> None:
        """Apply a desired-state delta (``{"version", "state": {…}, "ts"}``) and report the result."""
        if not payload:
            return  # the platform cleared the retained delta: we converged
        stats = self.fleet.stats
        stats.deltas_received += 1
        model = get_device_type(self.creds.type).state
        try:
            body = orjson.loads(payload)
            if model is None or not isinstance(body, dict) or not isinstance(body.get("state"), dict):
                raise ValueError("not a delta")
            delta = model.model_validate(body["state"]).model_dump(mode="json", exclude_unset=True)
        except (ValueError, ValidationError):
            stats.deltas_invalid += 1
            return
        self._report_state(self.model.apply_state({k: v for k, v in delta.items() if v is not None}))

    def on_suback(self, packet_id: int, reasons: bytes) -> None:
        if reasons and reasons[0] >= 0x80:
            self.fleet.stats.subscribe_refused += 1

    def on_disconnect(self, exc: Exception | None) -> None:
        fleet = self.fleet
        was_online = self.state == ONLINE
        self.conn = None
        if was_online:
            fleet.stats.connected -= 1
            fleet.stats.disconnects += 1
        if self.inflight:
            keep = [entry for entry in self.inflight.values() if entry[2] > 0]
            self.resend = (self.resend or []) + keep
            self.inflight = {}
        if fleet.stopping:
            self.state = STOPPED
            return
        self.state = OFFLINE
        if not was_online:
            self.fleet.stats.connect_failures += 1
            self.fleet.stats.connect_errors[f"closed before CONNACK: {exc or 'EOF'}"] += 1
        self._schedule_reconnect()

    def drop(self, offline_s: float | None) -> None:
        """Abrupt disconnect (no DISCONNECT packet): the broker fires the LWT."""
        conn = self.conn
        if conn is None or self.state != ONLINE:
            return
        self.state = OFFLINE  # before abort: on_disconnect must not schedule its own reconnect
        self.fleet.stats.connected -= 1
        self.fleet.stats.disconnects += 1
        conn.closed = True
        conn.abort()
        self.conn = None
        if self.inflight:
            self.resend = (self.resend or []) + [e for e in self.inflight.values() if e[2] > 0]
            self.inflight = {}
        self.attempt = max(self.attempt, 1)  # it counts as a reconnect
        self._schedule_reconnect(offline_s)

    # --- publishing -------------------------------------------------------------------
    def _next_pid(self) -> int:
        pid = self.pid
        while True:
            pid = pid + 1 if pid < 65_535 else 1
            if pid not in self.inflight:
                self.pid = pid
                return pid

    def _write(self, packet: bytes, now: float) -> None:
        conn = self.conn
        if conn is not None:
            conn.write(packet, now)
            self.fleet.stats.bytes_sent += len(packet)

    def _publish(
        self, topic: bytes, payload: bytes, kind: int, *, retain: bool = False, properties: bytes = b""
    ) -> None:
        """A non-telemetry publish (status, ack) at QoS 1; dropped silently if offline."""
        if self.state != ONLINE:
            return
        pid = self._next_pid()
        packet = mqtt.encode_publish(
            topic, payload, qos=1, packet_id=pid, retain=retain, properties=properties
        )
        self.inflight[pid] = (packet, -1, 0)
        self._write(packet, self.fleet.loop.time())

    def _send_built(self, payload: bytes, first_seq: int, n: int) -> None:
        """Send a telemetry payload now, or keep it for the reconnect (bounded)."""
        fleet = self.fleet
        stats = fleet.stats
        if self.state != ONLINE:
            pending = self.pending
            if pending is None:
                pending = self.pending = []
            if sum(e[2] for e in pending) + n > fleet.config.offline_buffer:
                # The buffer is full: the oldest reading is lost, as on a real device.
                _old, old_first, old_n = pending.pop(0)
                if old_n:
                    if self.dropped is None:
                        self.dropped = []
                    self.dropped.extend(range(old_first, old_first + old_n))
                    stats.readings_dropped += old_n
            pending.append((payload, first_seq, n))
            return
        qos = fleet.config.qos
        if qos:
            pid = self._next_pid()
            packet = mqtt.encode_publish(self.topic_telemetry, payload, qos=1, packet_id=pid)
            self.inflight[pid] = (packet, first_seq, n)
        else:
            packet = mqtt.encode_publish(self.topic_telemetry, payload, qos=0)
        self._write(packet, fleet.loop.time())
        stats.messages_published += 1
        stats.readings_published += n
        if not qos:
            stats.readings_acked += n  # QoS 0: nothing to wait for; "acked" means written

    def on_puback(self, packet_id: int, reason: int) -> None:
        entry = self.inflight.pop(packet_id, None)
        if entry is None:
            return
        stats = self.fleet.stats
        n = entry[2]
        if reason >= 0x80:
            if n:
                stats.readings_refused += n
            else:
                stats.acks_refused += 1
        elif n and reason == NO_MATCHING_SUBSCRIBERS and self.fleet.config.resend_unrouted:
            self._unrouted(entry)
        elif n:
            if self.unrouted:
                self.unrouted.pop(entry[1], None)
            stats.readings_acked += n

    def _unrouted(self, entry: tuple[bytes, int, int]) -> None:
        """PUBACK 0x10 on telemetry: nobody subscribed (yet). Send it again later, a bounded number of times."""
        fleet = self.fleet
        stats = fleet.stats
        _packet, first, n = entry
        stats.readings_unrouted += n
        unrouted = self.unrouted
        if unrouted is None:
            unrouted = self.unrouted = {}
        tries = unrouted[first][0] if first in unrouted else 0
        if tries >= fleet.config.unrouted_retries:
            del unrouted[first]
            stats.readings_unrouted_given_up += n
            stats.readings_acked += n  # the broker did accept it: it just had nobody to give it to
            if self.unrouted_lost is None:
                self.unrouted_lost = []
            self.unrouted_lost.extend(range(first, first + n))
            return
        # Stopping: no point waiting, try at once (bounded by the retries).
        delay = min(8.0, 0.5 * 2**tries) * fleet.rng.uniform(0.5, 1.0) if fleet.publishing else 0.0
        handle = fleet.loop.call_later(delay, self._resend_unrouted, first)
        unrouted[first] = (tries + 1, handle, entry)

    def _resend_unrouted(self, first: int) -> None:
        unrouted = self.unrouted
        if not unrouted or first not in unrouted:
            return
        tries, _handle, entry = unrouted[first]
        unrouted[first] = (tries, None, entry)
        packet, _first, n = entry
        self.fleet.stats.readings_unrouted_resent += n
        if self.state != ONLINE:
            self.resend = [*(self.resend or []), entry]  # goes again after the reconnect
            return
        pid = self._next_pid()
        fresh = _replace_pid(packet, pid)  # a new publish (the first was acked): no DUP flag
        fresh = bytes((fresh[0] & ~0x08,)) + fresh[1:]
        self.inflight[pid] = (fresh, first, n)
        self._write(fresh, self.fleet.loop.time())

    def flush_unrouted(self) -> None:
        """End of run: the ones waiting go now (their timers would outlast the drain)."""
        for first, (_tries, handle, _entry) in list((self.unrouted or {}).items()):
            if handle is not None:
                handle.cancel()
                self._resend_unrouted(first)

    def _schedule_first(self) -> None:
        fleet = self.fleet
        interval = self.interval()
        delay = 0.0 if fleet.config.publish_on_start else fleet.rng.uniform(0.0, interval)
        self.next_at = fleet.loop.time() + delay
        self.scheduled = True
        fleet.schedule(self, self.next_at)

    def interval(self) -> float:
        return self.model.report_interval() or self.fleet.config.interval_s

    def tick(self) -> None:
        """Take a reading (online or not), publish it, schedule the next one."""
        fleet = self.fleet
        if not fleet.publishing:
            self.scheduled = False
            return
        cfg = fleet.config
        interval = self.interval()
        self.next_at += (
            interval * (1.0 + fleet.rng.uniform(-cfg.jitter, cfg.jitter)) if cfg.jitter else interval
        )
        now = fleet.loop.time()
        # Fallen behind (overload): skip ahead instead of bursting.
        self.next_at = max(self.next_at, now)
        fleet.schedule(self, self.next_at)
        self.take_reading()

    def take_reading(self) -> None:
        fleet = self.fleet
        wall = time.time()
        model = self.model
        model.step(wall)
        reading = model.reading(wall)
        seq = self.seq
        self.seq = seq + 1
        ts = int(wall * 1000)
        faults = self.faults
        if faults is not None:
            reading, ts = self._fault_reading(faults, reading, ts, seq, fleet.elapsed())
        # ts and seq first: a truncated (malformed) payload still tells which reading it was.
        reading = {"ts": ts, "seq": seq, **reading}
        size = fleet.config.batch
        if size > 1:
            batch = self.batch
            if batch is None:
                batch = self.batch = []
            batch.append(reading)
            if len(batch) < size:
                return
            self.batch = None
            self._emit(orjson.dumps(batch), batch[0]["seq"], len(batch))
        else:
            self._emit(orjson.dumps(reading), seq, 1)

    def flush_batch(self) -> None:
        batch = self.batch
        if batch:
            self.batch = None
            self._emit(orjson.dumps(batch), batch[0]["seq"], len(batch))
        held, self.held = self.held, None
        if held is not None:
            self._send_built(*held)

    def _reject(self, first_seq: int, n: int) -> None:
        if self.rejected is None:
            self.rejected = []
        self.rejected.extend(range(first_seq, first_seq + n))

    def _fault_reading(
        self, faults: DeviceFaults, reading: dict[str, Any], ts: int, seq: int, elapsed: float
    ) -> tuple[dict[str, Any], int]:
        rng = self.fleet.rng
        stats = self.fleet.stats
        device_type = self.creds.type
        spec = faults.stuck
        if spec is not None and elapsed >= spec.after_s:
            if faults.stuck_values is None:
                names = [spec.field] if spec.field else list(reading)
                faults.stuck_values = {k: reading[k] for k in names if k in reading}
            reading.update(faults.stuck_values)
            stats.stuck_sent += 1
        spec = faults.spike
        if spec is not None and elapsed >= spec.after_s and rng.random() < spec.rate:
            name, magnitude, low, high = SPIKES[device_type]
            name = spec.field or name
            value = reading[name] + magnitude * rng.choice((-1.0, 1.0))
            value = min(max(value, low), high)
            reading[name] = int(value) if isinstance(reading[name], int) else round(value, 1)
            stats.spikes_sent += 1
        spec = faults.out_of_range
        if spec is not None and elapsed >= spec.after_s and rng.random() < spec.rate:
            bad = OUT_OF_RANGE[device_type]
            name = spec.field if spec.field in bad else rng.choice(list(bad))
            reading[name] = bad[name]
            self._reject(seq, 1)
            stats.out_of_range_sent += 1
            stats.readings_faulted += 1
        if faults.skew_ms:
            ts += faults.skew_ms
            stats.skewed_sent += 1
            cfg = self.fleet.config
            if faults.skew_ms > cfg.max_future_s * 1000 or -faults.skew_ms > cfg.max_past_s * 1000:
                self._reject(seq, 1)
                stats.readings_faulted += 1
        return reading, ts

    def _emit(self, payload: bytes, first_seq: int, n: int) -> None:
        """Payload-level faults (malformed, duplicate, out of order), then send."""
        faults = self.faults
        if faults is None:
            self._send_built(payload, first_seq, n)
            return
        rng = self.fleet.rng
        stats = self.fleet.stats
        elapsed = self.fleet.elapsed()
        spec = faults.malformed
        if spec is not None and elapsed >= spec.after_s and rng.random() < spec.rate:
            # Cut the JSON mid-way: what a device with a buffer overrun or a bad encoder sends.
            payload = payload[: max(1, len(payload) // 2)]
            self._reject(first_seq, n)
            stats.malformed_sent += 1
            stats.readings_faulted += n
        spec = faults.out_of_order
        if spec is not None and self.held is None and elapsed >= spec.after_s and rng.random() < spec.rate:
            self.held = (payload, first_seq, n)
            stats.out_of_order_sent += 1
            return
        self._send_built(payload, first_seq, n)
        held, self.held = self.held, None
        if held is not None:
            self._send_built(*held)
        spec = faults.duplicate
        if spec is not None and elapsed >= spec.after_s and rng.random() < spec.rate:
            # Same bytes again (same seq and ts): a device retrying after a lost PUBACK.
            self._send_built(payload, first_seq, 0)
            stats.duplicates_sent += 1

    # --- commands ---------------------------------------------------------------------
    def on_message(self, message: mqtt.IncomingPublish, packet_id: int) -> None:
        fleet = self.fleet
        if message.qos and self.conn is not None:
            self.conn.write(bytes((mqtt.PUBACK, 2, packet_id >> 8, packet_id & 0xFF)), fleet.loop.time())
        if message.topic.endswith("/state/delta") and message.topic == self._state_topic(Channel.STATE_DELTA):
            self.on_delta(message.payload)
            return
        stats = fleet.stats
        stats.commands_received += 1
        if self.faults is not None and self.faults.ignore_commands:
            stats.commands_ignored += 1
            return
        command_id, status, detail = self._execute(message.payload)
        body = orjson.dumps({"id": command_id, "status": status, "detail": detail})
        topic = mqtt.topic_prefix(message.response_topic) if message.response_topic else self.topic_acks
        props = publish_properties(correlation_data=message.correlation_data)
        delay = self.faults.slow_ack_s if self.faults is not None else 0.0
        if delay:
            fleet.loop.call_later(delay, self._send_ack, topic, body, props)
        else:
            self._send_ack(topic, body, props)

    def _send_ack(self, topic: bytes, body: bytes, props: bytes) -> None:
        if self.state != ONLINE:
            return
        self._publish(topic, body, KIND_OTHER, properties=props)
        self.fleet.stats.acks_sent += 1

    def _execute(self, payload: bytes) -> tuple[str | None, str, str]:
        stats = self.fleet.stats
        try:
            command = orjson.loads(payload)
            if not isinstance(command, dict):
                raise ValueError("command is not a JSON object")
        except ValueError as exc:
            stats.commands_invalid += 1
            return None, "failed", f"invalid command JSON: {exc}"
        command_id = command.get("id")
        command_id = str(command_id) if command_id is not None else None
        ts = command.get("ts")
        if isinstance(ts, int | float) and ts > 0:
            stats.command_latency_ms.append(max(0.0, time.time() * 1000 - ts))
        name = command.get("name")
        device_type = get_device_type(self.creds.type)
        if not isinstance(name, str) or name not in device_type.commands:
            stats.commands_invalid += 1
            known = ", ".join(device_type.commands)
            return command_id, "failed", f"unknown command {name!r} for {self.creds.type} (known: {known})"
        try:
            validated = device_type.validate_command(name, command.get("args") or {})
        except ValidationError as exc:
            stats.commands_invalid += 1
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "args"
            return command_id, "failed", f"invalid args: {where}: {first['msg']}"
        try:
            detail = self.model.apply(name, validated)
        except ValueError as exc:
            return command_id, "failed", str(exc)
        if name == "reboot":
            # Answer first, then go away for a moment like a real device restarting.
            self.fleet.loop.call_later(0.2, self.reboot)
        return command_id, "succeeded", detail

    def reboot(self) -> None:
        if self.state != ONLINE or self.conn is None:
            return
        self._publish(self.topic_status, topics.STATUS_OFFLINE, KIND_OTHER, retain=True)
        self.drop(offline_s=1.0 + self.fleet.rng.uniform(0.0, 1.0))

    def graceful_close(self) -> None:
        """End of run: retained offline, then DISCONNECT (no LWT)."""
        if self.state == ONLINE and self.conn is not None:
            self.conn.disconnect(end_session=True)  # the run is over: the broker may forget us

    def outcome(self) -> dict[str, Any]:
        """What verification needs: how many seqs were taken and which are not expected stored."""
        unacked: list[int] = list(self.unrouted_lost or ())
        waiting = [entry for _tries, _handle, entry in (self.unrouted or {}).values()]
        for _packet, first, n in (
            list(self.inflight.values()) + (self.resend or []) + (self.pending or []) + waiting
        ):
            unacked.extend(range(first, first + n))
        return {
            "id": self.creds.id,
            "type": self.creds.type,
            "first_seq": self.creds.next_seq,
            "seqs": self.seq,
            "rejected": sorted(set(self.rejected or ())),
            "dropped": list(self.dropped or ()),
            "unacked": sorted(set(unacked)),
            "faults": self.faults.kinds() if self.faults is not None else [],
            "skew_ms": self.faults.skew_ms if self.faults is not None else 0,
        }


def backoff_delay(attempt: int, config: FleetConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    After a broker restart every device of a fleet loses its connection in the
    same instant. Full jitter spreads their retries evenly over a window that
    doubles with each failed attempt, so the broker meets a rate it can serve
    instead of one synchronized wave per step (what a fixed delay or "equal
    jitter" with its floor of half the window give). The cap bounds how long a
    device stays away once the broker is back.
    """
    ceiling = min(config.backoff_cap_s, config.backoff_base_s * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, ceiling)


async def _poll(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``done`` until true or ``timeout_s`` passed (nothing to await: the state is in callbacks)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval_s)


def _replace_pid(packet: bytes, pid: int) -> bytes:
    """Give a stored PUBLISH a new packet id (the old one may be reused after a reconnect)."""
    pos = 1
    while packet[pos] & 0x80:
        pos += 1
    pos += 1
    tlen = (packet[pos] << 8) | packet[pos + 1]
    at = pos + 2 + tlen
    return packet[:at] + bytes((pid >> 8, pid & 0xFF)) + packet[at + 2 :]


class Fleet:
    """The devices of one process and the loop-level machinery around them."""

    def __init__(self, devices: list[DeviceCredentials], config: FleetConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = Stats()
        self.stopping = False
        self.started_at = 0.0
        self.loop = asyncio.get_running_loop()
        fault_map = assign_faults([(d.id, d.type) for d in devices], config.faults, config.seed)
        self.devices = [
            SimDevice(self, creds, fault_map.get(creds.id), self.source_for(index))
            for index, creds in enumerate(devices)
        ]
        self.size = len(self.devices)
        self.stats.devices = self.size
        self._connect_queue: list[SimDevice] = []
        self._background: set[asyncio.Task[None]] = set()
        self._handles: list[asyncio.TimerHandle] = []
        self.stop_requested = False
        self.publishing = True
        # Timing wheel: slot number → devices due in it. 10,000 devices publishing every
        # 10 s need ~100 loop timers per second instead of 1,000 TimerHandles in a heap.
        self._slots: dict[int, list[SimDevice]] = {}
        self.tls: ClientContexts | None = None
        if config.tls_cafile is not None:
            self.tls = ClientContexts(TlsOptions(config.tls_cafile, config.tls_server_hostname))

    def tls_for(self, creds: DeviceCredentials) -> tuple[ssl.SSLContext, str] | None:
        """The TLS context and server name a device connects with (None: plain TCP)."""
        if self.tls is None:
            return None
        context = self.tls.for_device(creds.id, creds.cert_file)
        return context, self.tls.options.server_hostname or self.config.host

    def source_for(self, index: int) -> str | None:
        """The local address of this process's device ``index`` (None: the OS picks)."""
        cfg = self.config
        if not cfg.source_addresses:
            return None
        fleet_index = cfg.index_offset + index * cfg.index_stride
        return cfg.source_addresses[min(fleet_index // cfg.per_source, len(cfg.source_addresses) - 1)]

    def schedule(self, device: SimDevice, at: float) -> None:
        slot = int(at / SLOT_S) + 1  # the end of the slot: never early
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [device]
            self.loop.call_at(slot * SLOT_S, self._run_slot, slot)
        else:
            bucket.append(device)

    def _run_slot(self, slot: int) -> None:
        for device in self._slots.pop(slot, ()):
            device.tick()

    def request_stop(self) -> None:
        """End the run early but cleanly (Ctrl-C): drain, say offline, disconnect, report."""
        self.stop_requested = True

    def elapsed(self) -> float:
        return self.loop.time() - self.started_at

    def start_connect(self, device: SimDevice) -> None:
        if self.stopping or device.state != OFFLINE:
            return
        task = self.loop.create_task(device.connect())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ramp_up(self) -> None:
        """Connect every device at ``ramp_up_per_s`` (what a fleet powering up after an outage does)."""
        rate = self.config.ramp_up_per_s
        tick = 0.02
        per_tick = rate * tick
        budget = 0.0
        index = 0
        while index < self.size and not self.stopping:
            budget += per_tick
            while budget >= 1.0 and index < self.size:
                self.start_connect(self.devices[index])
                index += 1
                budget -= 1.0
            await asyncio.sleep(tick)

    async def keepalive(self) -> None:
        """One sweep for the whole fleet instead of a timer per connection."""
        half = self.config.keepalive_s / 2
        while not self.stopping:
            await asyncio.sleep(min(half, 5.0))
            now = self.loop.time()
            for device in self.devices:
                conn = device.conn
                if device.state == ONLINE and conn is not None and now - conn.last_tx > half:
                    conn.write(mqtt.PINGREQ_PACKET, now)

    def schedule_connection_faults(self) -> None:
        by_spec: dict[int, tuple[FaultSpec, list[SimDevice]]] = {}
        for device in self.devices:
            faults = device.faults
            if faults is None:
                continue
            for spec in (faults.disconnect, faults.reconnect_storm):
                if spec is not None:
                    by_spec.setdefault(id(spec), (spec, []))[1].append(device)
        for spec, members in by_spec.values():
            if spec.kind == FaultKind.DISCONNECT:
                # Each device on its own clock: a trickle of LWTs, not one burst.
                period = spec.every_s or 60.0
                for device in members:
                    first = spec.at_s if spec.at_s is not None else self.rng.uniform(0.3, 1.0) * period
                    self._handles.append(self.loop.call_later(first, self._disconnect_fault, device, spec))
            else:
                first = spec.at_s if spec.at_s is not None else 30.0
                self._handles.append(self.loop.call_later(first, self._storm, spec, members))

    def _disconnect_fault(self, device: SimDevice, spec: FaultSpec) -> None:
        if self.stopping:
            return
        if device.state == ONLINE:
            self.stats.disconnects_injected += 1
            device.drop(spec.offline_s)
        if spec.every_s is not None or spec.at_s is None:
            period = spec.every_s or 60.0
            delay = period * self.rng.uniform(0.8, 1.2)
            self._handles.append(self.loop.call_later(delay, self._disconnect_fault, device, spec))

    def _storm(self, spec: FaultSpec, members: list[SimDevice]) -> None:
        """All members drop at once and come back at once (no jitter): the worst case for a broker."""
        if self.stopping:
            return
        self.stats.storms_injected += 1
        for device in members:
            device.drop(0.0)
        if spec.every_s is not None:
            self._handles.append(self.loop.call_later(spec.every_s, self._storm, spec, members))

    async def run(
        self,
        duration_s: float,
        *,
        on_tick: Callable[[], None] | None = None,
        tick_s: float = 0.5,
    ) -> None:
        """Ramp up, publish for ``duration_s`` seconds from the start, then stop cleanly."""
        self.started_at = self.loop.time()
        end = self.started_at + duration_s
        ramp = self.loop.create_task(self.ramp_up())
        keepalive = self.loop.create_task(self.keepalive())
        self.schedule_connection_faults()
        try:
            while self.loop.time() < end and not self.stop_requested:
                await asyncio.sleep(min(tick_s, max(0.0, end - self.loop.time())))
                if on_tick is not None:
                    on_tick()
        finally:
            await self.stop(on_tick=on_tick, tick_s=tick_s)
            ramp.cancel()
            keepalive.cancel()
            for task in (ramp, keepalive):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def inflight_readings(self) -> int:
        return sum(
            sum(e[2] for e in d.inflight.values()) + sum(e[2] for e in d.resend or ()) for d in self.devices
        )

    async def stop(self, *, on_tick: Callable[[], None] | None = None, tick_s: float = 0.5) -> None:
        """Flush batches, wait for the broker to ack what is in flight, say offline, disconnect."""
        self.publishing = False
        for device in self.devices:
            device.flush_batch()
            device.flush_unrouted()
        for handle in self._handles:
            handle.cancel()
        deadline = self.loop.time() + self.config.drain_timeout_s
        while self.loop.time() < deadline:
            busy = any(d.inflight or d.resend or d.pending or d.unrouted for d in self.devices)
            if not busy:
                break
            await asyncio.sleep(0.05)
            if on_tick is not None:
                on_tick()
        self.stopping = True
        for device in self.devices:
            if device.state == ONLINE:
                device._publish(device.topic_status, topics.STATUS_OFFLINE, KIND_OTHER, retain=True)
                self.stats.status_published += 1
                self.stats.offline_published += 1
        await _poll(lambda: not any(d.inflight and d.state == ONLINE for d in self.devices), 5.0)
        for device in self.devices:
            device.graceful_close()
        await _poll(lambda: all(d.conn is None for d in self.devices), 5.0)
        for task in list(self._background):
            task.cancel()
        for device in self.devices:
            if device.conn is not None:
                device.conn.abort()

    def outcomes(self) -> list[dict[str, Any]]:
        return [device.outcome() for device in self.devices]
