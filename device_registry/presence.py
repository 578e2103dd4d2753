"""Presence: ``online``, ``last_seen``, ``connected_since`` and every transition, from the broker.

Sources, in order of authority:

1. The broker's own log lines on ``$SYS/broker/log/N`` (see ``broker_log``):
   connect, clean disconnect, unclean close (will), keepalive timeout, kick.
   They are the truth about connections, whatever the device publishes.
2. Telemetry, acks and *live* status messages: the device is speaking, so it
   is online (cause ``message`` when it was shown offline); they move ``last_seen``.
3. The retained ``status`` replayed on (re)subscribe is only the device's own
   hint, possibly stale: parsed and counted, never taken as presence.

Readings arrive at 15,000+/s, so nothing is written per message: paho's thread
appends an event or sets "seen at" under a lock, and a task flushes once per
``flush_interval_s``: one ``SELECT … WHERE id IN`` per 500 devices involved
(which also drops clients that are no registry device), then executemany
updates and one batched insert of transitions. Telemetry and acks come at QoS 0
through a shared subscription (best effort; replicas split them).

Log lines are QoS 0 and missed while the registry's link is down, so when the
link drops (and when the registry starts) every device is marked offline
(``broker_restart`` / ``registry_restart``) and re-confirmed by its next
connect or message: the documented bound is in device_registry/README.md.

Hostile telemetry: presence never parses a payload and never uses a device's own
timestamp (``last_seen`` is the registry's clock at arrival), so no payload can
poison it. Any telemetry a device publishes on its own topic counts as "seen",
also a reading the ingest dead-letters: the broker authenticated the device, so it
is alive and connected (AWS IoT's lifecycle events and ThingsBoard's "last
activity" count the same way). Payloads above the shared admission limit
(``IOTFLEET_INGEST__MAX_PAYLOAD_BYTES``) are counted under
``channel="telemetry_oversized"``; the broker's ``max_packet_size`` (derived from
the same setting) bounds what paho buffers before this code sees a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Table, bindparam, delete, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry import broker_log
from device_registry.broker_admin import MqttLink
from device_registry.broker_log import Cause
from device_registry.models import Device, PresenceTransition
from iotfleet import topics
from iotfleet.presence_event import PresenceEvent
from iotfleet.settings import IngestSettings, MqttSettings
from iotfleet.topics import Channel

log = logging.getLogger("registry.presence")

SHARE_GROUP = "iotfleet-registry"
SELECT_CHUNK = 500
"""Devices per ``IN (…)`` lookup: far below SQLite's and asyncpg's parameter limits."""
MAX_STATUS_BYTES = 1024
PRUNE_EVERY_S = 3600.0
PUBLISH_INLINE_MAX = 1000
"""Transitions of one flush published on the event loop; more go through a worker thread."""
MAX_PENDING_EVENTS = 1_000_000
"""Connection events kept while the DB is away (~100 B each); beyond, they collapse into one reset."""


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def parse_status(payload: bytes | bytearray) -> bool | None:
    """``online``/``offline`` (any case), or JSON ``{"status": "online"}`` / ``{"online": true}``; else None."""
    text = bytes(payload).strip()
    if len(text) > MAX_STATUS_BYTES:
        return None
    word = text.lower()
    if word in (topics.STATUS_ONLINE, topics.STATUS_OFFLINE):
        return word == topics.STATUS_ONLINE
    if not text.startswith(b"{"):
        return None
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    online = body.get("online")
    if isinstance(online, bool):
        return online
    status = body.get("status")
    if isinstance(status, str) and status.lower() in ("online", "offline"):
        return status.lower() == "online"
    return None


@dataclass(slots=True)
class _Event:
    """A device came online / went offline at ``at``; ``device_id`` None = every device offline."""

    device_id: str | None
    online: bool
    cause: Cause
    at: float


@dataclass(slots=True)
class _Outcome:
    transitions: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, tuple[bool, float | None]] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)


class Presence:
    def __init__(
        self,
        settings: MqttSettings,
        sessions: async_sessionmaker[AsyncSession],
        metrics: CollectorRegistry,
        *,
        flush_interval_s: float = 1.0,
        history_days: int = 30,
        max_payload_bytes: int = IngestSettings().max_payload_bytes,
    ) -> None:
        self.sessions = sessions
        self.max_payload_bytes = max_payload_bytes
        self.flush_interval_s = flush_interval_s
        self.history_days = history_days
        self._lock = threading.Lock()
        # Connection events in arrival order (one MQTT connection: the broker's order).
        self._events: list[_Event] = []
        # device id → epoch seconds it last spoke (telemetry, acks, live status)
        self._seen: dict[str, float] = {}
        self._ever_connected = False
        self._task: asyncio.Task[None] | None = None
        self.running = False
        self._stop = asyncio.Event()
        self._last_prune = 0.0
        self.link = MqttLink(
            settings,
            "presence",
            subscriptions=[
                (broker_log.LOG_TOPIC, 0),
                (topics.device_filter(Channel.STATUS), 1),
                (topics.shared_filter(SHARE_GROUP, topics.device_filter(Channel.TELEMETRY)), 0),
                (topics.shared_filter(SHARE_GROUP, topics.device_filter(Channel.ACKS)), 0),
            ],
            on_message=self._on_message,
            on_state=self._on_link_state,
        )
        self.m_messages = Counter(
            "registry_presence_messages", "Device messages seen by presence", ["channel"], registry=metrics
        )
        self.m_log_lines = Counter(
            "registry_presence_broker_log_lines",
            "Broker log lines read, by what they were",
            ["kind"],
            registry=metrics,
        )
        self.m_status_unparsed = Counter(
            "registry_presence_status_unparsed",
            "Status messages in no known format (online/offline, JSON status/online)",
            registry=metrics,
        )
        self.m_events_lost = Counter(
            "registry_presence_event_overflows",
            f"Times {MAX_PENDING_EVENTS:,} unwritten connection events were replaced by 'everyone offline'",
            registry=metrics,
        )
        self.m_transitions = Counter(
            "registry_presence_transitions", "Presence transitions recorded", ["cause"], registry=metrics
        )
        self.m_flush = Histogram(
            "registry_presence_flush_seconds",
            "Time to write one presence batch to the DB",
            registry=metrics,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.m_flushed = Counter(
            "registry_presence_devices_flushed", "Device presence updates written", registry=metrics
        )
        self.m_published = Counter(
            "registry_presence_published",
            "Transitions published on iotfleet/presence/{type}/{id} (retained, for the rules engine)",
            registry=metrics,
        )
        self.m_pending = Gauge(
            "registry_presence_pending_devices", "Devices with presence not yet written", registry=metrics
        )
        self.m_pending.set_function(lambda: len(self._seen) + len(self._events))
        self._telemetry_counter = self.m_messages.labels(Channel.TELEMETRY.value)
        self._acks_counter = self.m_messages.labels(Channel.ACKS.value)
        self._status_counter = self.m_messages.labels(Channel.STATUS.value)
        self._oversized_counter = self.m_messages.labels("telemetry_oversized")
        self._log_event = self.m_log_lines.labels("connection_event")
        self._log_other = self.m_log_lines.labels("other")
        self.last_flush_s = 0.0
        self.last_flush_count = 0

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    def start(self) -> None:
        # Restartable: presence runs in the lease holder only, and the lease may come back.
        self._stop.clear()
        self._ever_connected = False  # events while another replica held the lease are unknown
        self.running = True
        self.link.start()
        self._task = asyncio.create_task(self._flush_loop(), name="presence-flush")

    async def stop(self, *, final_flush: bool = True) -> None:
        """Stop following; ``final_flush=False`` when the lease was lost (the new holder owns the
        writes from now on: what this replica saw and did not write, the new one sees again as
        a registry restart)."""
        self.running = False
        await asyncio.to_thread(self.link.stop)  # joins paho's thread: not on the loop
        # Let a flush in progress finish (cancelling it mid-transaction would leave
        # SQLite locked for the final flush), then write what is left.
        self._stop.set()
        if self._task:
            await self._task
            self._task = None
        if final_flush:
            await self.flush()
        else:
            with self._lock:
                self._events, self._seen = [], {}

    # --- paho's network thread: keep it to a parse and an append -----------------------------

    def _on_link_state(self, up: bool) -> None:
        # Down: log lines are being missed from now on. Up: this runs on the SUBACK, which the
        # broker sends before any message of the new subscriptions, so the reset is queued
        # before any line of the new connection.
        if up:
            cause = Cause.broker_restart if self._ever_connected else Cause.registry_restart
            self._ever_connected = True
        else:
            cause = Cause.broker_restart
        with self._lock:
            self._append(_Event(None, False, cause, time.time()))

    def _append(self, event: _Event) -> None:
        """Queue an event (lock held). Memory stays bounded if the DB is away for long."""
        if len(self._events) >= MAX_PENDING_EVENTS:
            self._events = [_Event(None, False, Cause.events_lost, time.time())]
            self.m_events_lost.inc()
        self._events.append(event)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic == broker_log.LOG_TOPIC:
            event = broker_log.parse_line(message.payload)
            if event is None:
                self._log_other.inc()
                return
            self._log_event.inc()
            with self._lock:
                self._append(_Event(event.client_id, event.online, event.cause, time.time()))
            return
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != topics.DEVICES_ROOT:
            return
        device_id, channel = parts[2], parts[3]
        if channel == "status":
            self._status_counter.inc()
            said = parse_status(message.payload)
            if said is None:
                self.m_status_unparsed.inc()
            # A replayed retained status may be stale (the device may have left without a
            # will while the registry was away); a live one means the device (or its will)
            # just spoke. Only the broker's log says "offline", so only "it spoke" counts.
            if message.retain or said is not True:
                return
        elif channel == "telemetry":
            self._telemetry_counter.inc()
            if len(message.payload) > self.max_payload_bytes:  # seen all the same (see above)
                self._oversized_counter.inc()
        elif channel == "acks":
            self._acks_counter.inc()
        else:
            return
        with self._lock:
            self._seen[device_id] = time.time()

    # --- the flusher -------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.flush_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.flush()
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    await self.prune()
            except Exception as exc:  # the DB may be briefly away: keep the data, retry next tick
                log.warning("presence flush failed (%s); retrying in %.1f s", exc, self.flush_interval_s)

    async def prune(self) -> int:
        """Delete transitions older than ``history_days``; return how many."""
        self._last_prune = time.monotonic()
        cutoff = datetime.now(UTC) - timedelta(days=self.history_days)
        async with self.sessions() as session:
            result = await session.execute(delete(PresenceTransition).where(PresenceTransition.at < cutoff))
            await session.commit()
        return int(getattr(result, "rowcount", 0) or 0)

    async def flush(self) -> int:
        """Write what happened since the last flush; return the number of devices updated."""
        with self._lock:
            events, self._events = self._events, []
            seen, self._seen = self._seen, {}
        if not events and not seen:
            return 0
        started = time.monotonic()
        try:
            count = await self._write(events, seen)
        except Exception:
            with self._lock:
                if len(events) + len(self._events) > MAX_PENDING_EVENTS:
                    self.m_events_lost.inc()
                    events = [_Event(None, False, Cause.events_lost, time.time())]
                self._events[:0] = events
                for device_id, at in seen.items():
                    self._seen[device_id] = max(at, self._seen.get(device_id, 0.0))
            raise
        self.last_flush_s = time.monotonic() - started
        self.last_flush_count = count
        self.m_flush.observe(self.last_flush_s)
        self.m_flushed.inc(count)
        return count

    async def _write(self, events: list[_Event], seen: dict[str, float]) -> int:
        # "Spoke at t" is an online event at t, ordered among the connection events by
        # arrival time (all come over the one MQTT connection, in the broker's order).
        timeline = events + [_Event(d, True, Cause.message, at) for d, at in seen.items()]
        timeline.sort(key=lambda e: e.at)
        updated = 0
        published: list[tuple[str, str, PresenceEvent]] = []
        async with self.sessions() as session:
            segment: list[_Event] = []
            for event in timeline:
                if event.device_id is None:
                    updated += await self._apply(session, segment, published)
                    segment = []
                    updated += await self._all_offline(session, event, published)
                else:
                    segment.append(event)
            updated += await self._apply(session, segment, published)
            await session.commit()
        if len(published) > PUBLISH_INLINE_MAX:
            # A fleet-wide reset (100,000 devices: ~4 s of paho calls) must not stall the API's loop;
            # flushes are awaited one after the other, so the order still holds.
            await asyncio.to_thread(self._publish, published)
        elif published:
            self._publish(published)
        return updated

    def _publish(self, published: list[tuple[str, str, PresenceEvent]]) -> None:
        """Each committed transition on the device's retained platform presence topic, in order.

        After the commit: what other services see is what the registry serves. paho queues
        them while the link is down (QoS 1, sent in order on reconnect).
        """
        if not self.running:
            # A standby replica: its link is down; the holder's presence sees the broker's
            # disconnect of the device and publishes the transition.
            return
        for device_type, device_id, event in published:
            try:
                topic = topics.presence_topic(device_type, device_id)
            except ValueError:  # a row from before today's id rules: nothing can subscribe to it
                continue
            self.link.client.publish(topic, event.payload(), qos=1, retain=True)
        self.m_published.inc(len(published))

    def announce(self, device_type: str, device_id: str, online: bool, cause: str, at: float) -> None:
        """Publish one transition recorded elsewhere (an operator's disable), once committed."""
        self._publish(
            [(device_type, device_id, PresenceEvent(online=online, cause=cause, at_ms=int(at * 1000)))]
        )

    def forget(self, device_type: str, device_id: str) -> None:
        """Clear a deleted device's retained presence (an empty retained message)."""
        try:
            topic = topics.presence_topic(device_type, device_id)
        except ValueError:
            return
        if self.running:
            self.link.client.publish(topic, b"", qos=1, retain=True)

    async def _apply(
        self, session: AsyncSession, events: Sequence[_Event], published: list[tuple[str, str, PresenceEvent]]
    ) -> int:
        if not events:
            return 0
        ids = sorted({e.device_id for e in events if e.device_id is not None})
        types: dict[str, str] = {}
        current = await _load_states(session, ids, types)
        outcome = _replay(events, current)
        table = cast(Table, Device.__table__)
        c = table.c
        # updated_at=updated_at: presence is not an operator change (the column's onupdate would bump it).
        if outcome.states:
            await session.execute(
                update(table)
                .where(c.id == bindparam("b_id"))
                .values(
                    online=bindparam("b_online"),
                    connected_since=bindparam("b_since"),
                    updated_at=c.updated_at,
                ),
                [
                    {"b_id": d, "b_online": online, "b_since": _ts(since) if since is not None else None}
                    for d, (online, since) in outcome.states.items()
                ],
            )
        if outcome.last_seen:
            await session.execute(
                update(table)
                .where(c.id == bindparam("b_id"))
                .values(last_seen=bindparam("b_ts"), updated_at=c.updated_at),
                [{"b_id": d, "b_ts": _ts(at)} for d, at in outcome.last_seen.items()],
            )
        if outcome.transitions:
            await session.execute(insert(PresenceTransition), outcome.transitions)
            for row in outcome.transitions:
                self.m_transitions.labels(row["cause"]).inc()
                at_ms = int(row["at"].timestamp() * 1000)
                event = PresenceEvent(online=row["online"], cause=row["cause"], at_ms=at_ms)
                published.append((types[row["device_id"]], row["device_id"], event))
        return len(outcome.states) + len(outcome.last_seen)

    async def _all_offline(
        self, session: AsyncSession, event: _Event, published: list[tuple[str, str, PresenceEvent]]
    ) -> int:
        """Every online device goes offline (one INSERT … SELECT and one UPDATE, whatever the fleet size)."""
        at = _ts(event.at)
        table = cast(Table, Device.__table__)
        d = table.c
        # Their ids and types for the platform presence topic (one row each: bounded by the fleet).
        going = await session.execute(select(d.id, d.type).where(d.online.is_(True)))
        offline = PresenceEvent(online=False, cause=event.cause.value, at_ms=int(event.at * 1000))
        published.extend((device_type, device_id, offline) for device_id, device_type in going)
        transitions = insert(PresenceTransition).from_select(
            ["device_id", "at", "online", "cause"],
            select(
                d.id, literal(at, PresenceTransition.at.type), literal(False), literal(event.cause.value)
            ).where(d.online.is_(True)),
        )
        result = await session.execute(transitions)
        count = int(getattr(result, "rowcount", 0) or 0)
        await session.execute(
            update(table)
            .where(d.online.is_(True))
            .values(online=False, connected_since=None, updated_at=d.updated_at)
        )
        if count > 0:
            self.m_transitions.labels(event.cause.value).inc(count)
            log.info("presence: %d devices marked offline (%s)", count, event.cause.value)
        return count


async def _load_states(
    session: AsyncSession, ids: Sequence[str], types: dict[str, str] | None = None
) -> dict[str, tuple[bool, float | None]]:
    """Registry devices among ``ids`` → (online, connected_since); other client ids are absent.

    ``types``, if given, receives each found device's type (for the platform presence topic).
    """
    d = Device.__table__.c
    states: dict[str, tuple[bool, float | None]] = {}
    for start in range(0, len(ids), SELECT_CHUNK):
        chunk = ids[start : start + SELECT_CHUNK]
        rows = await session.execute(select(d.id, d.online, d.connected_since, d.type).where(d.id.in_(chunk)))
        for device_id, online, since, device_type in rows:
            states[device_id] = (bool(online), since.timestamp() if since is not None else None)
            if types is not None:
                types[device_id] = device_type
    return states


def _replay(events: Iterable[_Event], current: dict[str, tuple[bool, float | None]]) -> _Outcome:
    """Apply events in order to the devices' current states; unknown ids are skipped."""
    out = _Outcome()
    state = dict(current)
    for event in events:
        device_id = event.device_id
        if device_id is None or device_id not in state:
            continue
        if event.online:
            out.last_seen[device_id] = event.at
        online, _since = state[device_id]
        if online == event.online:
            continue  # a take-over's new connect, telemetry while online, a second end line
        state[device_id] = (event.online, event.at if event.online else None)
        out.states[device_id] = state[device_id]
        out.transitions.append(
            {"device_id": device_id, "at": _ts(event.at), "online": event.online, "cause": event.cause.value}
        )
    return out
