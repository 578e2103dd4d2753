"""Presence: ``online``, ``last_seen`` and ``connected_since`` per device, from the broker.

The registry follows the retained ``status`` topics (online/offline, the LWT) and
every device's telemetry and acks. Readings can arrive at 15,000+/s, so nothing
is written per message: the MQTT thread only records "device X seen at t" in a
dict (one assignment), and a task flushes the latest state to the DB once per
``flush_interval_s`` in one executemany per kind. Telemetry and acks are taken at
QoS 0 through a shared subscription: presence is best effort, so a busy registry
lets the broker drop (never queue) them, and registry replicas split the load.

Hostile telemetry: presence never parses a payload and never uses a device's own
timestamp (``last_seen`` is the registry's clock at arrival), so no payload can
poison it. Any telemetry a device publishes on its own topic counts as "seen",
also a reading the ingest dead-letters: the broker authenticated the device, so it
is alive and connected, and an operator chasing its dead letters wants to see that
(AWS IoT's lifecycle events and ThingsBoard's "last activity" count the same way).
Payloads above the shared admission limit (``IOTFLEET_INGEST__MAX_PAYLOAD_BYTES``,
iotfleet/admission.py) are counted under ``channel="telemetry_oversized"``; the
broker's ``message_size_limit`` (derived from the same setting) bounds what paho
buffers before this code sees a message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any, cast

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Table, and_, bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry.broker_admin import MqttLink
from device_registry.models import Device
from iotfleet import topics
from iotfleet.settings import IngestSettings, MqttSettings
from iotfleet.topics import Channel

log = logging.getLogger("registry.presence")

SHARE_GROUP = "iotfleet-registry"
_ONLINE = topics.STATUS_ONLINE
_OFFLINE = topics.STATUS_OFFLINE


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


class Presence:
    def __init__(
        self,
        settings: MqttSettings,
        sessions: async_sessionmaker[AsyncSession],
        metrics: CollectorRegistry,
        *,
        flush_interval_s: float = 1.0,
        max_payload_bytes: int = IngestSettings().max_payload_bytes,
    ) -> None:
        self.sessions = sessions
        self.max_payload_bytes = max_payload_bytes
        self.flush_interval_s = flush_interval_s
        # device id → epoch seconds it was last heard from (telemetry, acks, live status)
        self._seen: dict[str, float] = {}
        # device id → (online, epoch seconds, retained) of its latest status message
        self._status: dict[str, tuple[bool, float, bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.link = MqttLink(
            settings,
            "presence",
            subscriptions=[
                (topics.device_filter(Channel.STATUS), 1),
                (topics.shared_filter(SHARE_GROUP, topics.device_filter(Channel.TELEMETRY)), 0),
                (topics.shared_filter(SHARE_GROUP, topics.device_filter(Channel.ACKS)), 0),
            ],
            on_message=self._on_message,
        )
        self.m_messages = Counter(
            "registry_presence_messages", "Device messages seen by presence", ["channel"], registry=metrics
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
        self.m_pending = Gauge(
            "registry_presence_pending_devices", "Devices with presence not yet written", registry=metrics
        )
        self.m_pending.set_function(lambda: len(self._seen) + len(self._status))
        self._telemetry_counter = self.m_messages.labels(Channel.TELEMETRY.value)
        self._acks_counter = self.m_messages.labels(Channel.ACKS.value)
        self._status_counter = self.m_messages.labels(Channel.STATUS.value)
        self._oversized_counter = self.m_messages.labels("telemetry_oversized")
        self.last_flush_s = 0.0
        self.last_flush_count = 0

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    def start(self) -> None:
        self.link.start()
        self._task = asyncio.create_task(self._flush_loop(), name="presence-flush")

    async def stop(self) -> None:
        self.link.stop()
        # Let a flush in progress finish (cancelling it mid-transaction would leave
        # SQLite locked for the final flush), then write what is left.
        self._stop.set()
        if self._task:
            await self._task
        await self.flush()

    # Runs on paho's network thread: keep it to a split and a dict assignment.
    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) != 4 or parts[0] != topics.DEVICES_ROOT:
            return
        device_id, channel = parts[2], parts[3]
        now = time.time()
        if channel == "status":
            self._status_counter.inc()
            payload = message.payload.strip().lower()
            if payload == _ONLINE:
                self._status[device_id] = (True, now, bool(message.retain))
            elif payload == _OFFLINE:
                self._status[device_id] = (False, now, bool(message.retain))
            else:
                return
            if not message.retain:
                self._seen[device_id] = now
        else:
            if channel == "telemetry":
                self._telemetry_counter.inc()
                if len(message.payload) > self.max_payload_bytes:  # seen all the same (see above)
                    self._oversized_counter.inc()
            else:
                self._acks_counter.inc()
            self._seen[device_id] = now

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.flush_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception as exc:  # the DB may be briefly away: keep the data, retry next tick
                log.warning("presence flush failed (%s); retrying in %.1f s", exc, self.flush_interval_s)

    async def flush(self) -> int:
        """Write what was seen since the last flush; return the number of devices updated."""
        # Swap, not copy: the MQTT thread keeps writing into the fresh dicts.
        seen, self._seen = self._seen, {}
        status, self._status = self._status, {}
        if not seen and not status:
            return 0
        started = time.monotonic()
        try:
            await self._write(seen, status)
        except Exception:
            for device_id, at in seen.items():
                self._seen[device_id] = max(at, self._seen.get(device_id, 0.0))
            for device_id, state in status.items():
                self._status.setdefault(device_id, state)
            raise
        self.last_flush_s = time.monotonic() - started
        self.last_flush_count = len(seen) + len(status)
        self.m_flush.observe(self.last_flush_s)
        self.m_flushed.inc(self.last_flush_count)
        return self.last_flush_count

    async def _write(self, seen: dict[str, float], status: dict[str, tuple[bool, float, bool]]) -> None:
        table = cast(Table, Device.__table__)
        c = table.c
        came_online: list[dict[str, Any]] = []
        went_offline: list[dict[str, Any]] = []
        for device_id, (online, at, _retained) in status.items():
            (came_online if online else went_offline).append({"b_id": device_id, "b_ts": _ts(at)})
        # updated_at=updated_at: presence is not an operator change (the column's onupdate would bump it).
        async with self.sessions() as session:
            if came_online:
                # connected_since is kept when the device was already online (e.g. the
                # retained "online" replayed to a restarted registry).
                await session.execute(
                    update(table)
                    .where(and_(c.id == bindparam("b_id"), c.online.is_(False)))
                    .values(online=True, connected_since=bindparam("b_ts"), updated_at=c.updated_at),
                    came_online,
                )
            if went_offline:
                await session.execute(
                    update(table)
                    .where(c.id == bindparam("b_id"))
                    .values(online=False, connected_since=None, updated_at=c.updated_at),
                    went_offline,
                )
            if seen:
                await session.execute(
                    update(table)
                    .where(c.id == bindparam("b_id"))
                    .values(last_seen=bindparam("b_ts"), updated_at=c.updated_at),
                    [{"b_id": device_id, "b_ts": _ts(at)} for device_id, at in seen.items()],
                )
            await session.commit()
