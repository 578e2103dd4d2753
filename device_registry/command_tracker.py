"""The registry's command-lifecycle and alert tracker: the system of record for commands and alerts.

It keeps one MQTT 5 session of its own (fixed client id, clean_start=False,
session expiry) subscribed at QoS 1 to the devices' ``acks``, the rules
engine's command events and alert events. Messages are acknowledged to the
broker only after the transaction recording them committed (paho
``manual_ack``), so a registry restart or crash loses none: the broker
redelivers what was not acknowledged and queues what arrives meanwhile.

Every status change is monotonic (``queued → sent → delivered → succeeded |
failed``, ``expired``), so events applied twice or out of order cannot move a
command backwards. A sweep marks ``queued``/``sent`` commands past their TTL
``expired``. The tracker also publishes operator commands and the
``iotfleet/rules/changed`` notices, and on every (re)connect republishes the
operator commands still ``queued`` (unexpired) — at least once; devices
deduplicate by command id.

One tracker per registry deployment: it runs in the replica holding the registry
lease (``device_registry.lease``), started and stopped with it; the client id is per
deployment, so a new holder's session takes the old one's over at the broker. A standby
replica records the commands its API creates as ``queued`` and does not publish them: the
holder finds them within ``OUTBOX_POLL_S`` (``_outbox``; a command is published again only
with its own id) and publishes them; one created during a takeover is published by the new
holder when its link connects (``resend_queued``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry import notifications
from device_registry.lease import Deposed
from device_registry.models_notifications import Transition
from device_registry.models_rules import AlertRow, AlertStatus, CommandRow, CommandStatus
from iotfleet import tls_clients, topics
from iotfleet.errors import TopicError
from iotfleet.settings import Settings
from iotfleet.topics import Channel
from rules_engine import wire

log = logging.getLogger("registry.commands")

BATCH = 500
OUTBOX_POLL_S = 1.0
"""How often the holder looks for queued operator commands it has not published (a standby's)."""
OUTBOX_PAGE = 5_000


def utc_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass(frozen=True, slots=True)
class _Sent:
    command_id: str
    error: str | None


class CommandTracker:
    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        # Stable across restarts of this deployment (its persistent session holds what arrives while
        # the registry is down) and distinct between deployments sharing a broker: named after the DB.
        deployment = hashlib.sha256(settings.registry_database_url().encode()).hexdigest()[:8]
        self.client_id = f"{settings.rules.client_id}-tracker-{deployment}"
        self.connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Incoming | _Sent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._mid_lock = threading.Lock()
        self._pending: dict[int, str] = {}
        self._early: OrderedDict[int, ReasonCode] = OrderedDict()
        self.notified = False  # the batch being recorded enqueued notifications
        self.on_notifications: Callable[[], None] | None = None
        """Called after a commit that enqueued notifications (the sender's ``wake``)."""
        self.fence: Callable[[AsyncSession], Awaitable[None]] | None = None
        """Raises ``lease.Deposed`` in a transaction if this replica no longer holds the lease."""
        self.standby_publish: Callable[[str, bytes], None] | None = None
        """Publishes a notice while the tracker is not running (a standby: the admin link)."""
        self.running = False
        self._in_flight: set[str] = set()
        """Ids published on the current connection and not yet PUBACKed (not republished by _outbox)."""
        self.m_events = Counter(
            "registry_command_events", "Command/alert/ack messages recorded", ["kind"], registry=registry
        )
        self.m_status = Counter(
            "registry_command_transitions", "Command status transitions", ["status"], registry=registry
        )
        self.m_connected = Gauge(
            "registry_tracker_connected", "1 when the tracker's MQTT session is up", registry=registry
        )
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        mqtt_settings = settings.mqtt
        if mqtt_settings.username:
            password = mqtt_settings.password.get_secret_value() if mqtt_settings.password else None
            self.client.username_pw_set(mqtt_settings.username, password)
        tls_clients.apply_to_paho(self.client, mqtt_settings)  # the broker on another host
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(500)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = _no_delay

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        # Restartable (the lease may come back): nothing from a former run carries over.
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        with self._mid_lock:
            self._pending.clear()
            self._early.clear()
        self._in_flight.clear()
        self.running = True
        self._tasks = [
            asyncio.create_task(self._worker(), name="command-tracker"),
            asyncio.create_task(self._sweeper(), name="command-expiry"),
            asyncio.create_task(self._outbox(), name="command-outbox"),
        ]
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.mqtt.session_expiry_s
        props.ReceiveMaximum = 1000
        self.client.connect_async(
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            keepalive=self.settings.mqtt.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    async def stop(self) -> None:
        self.running = False
        self.client.disconnect()
        # Joins paho's thread, which may be mid-connect to an unreachable broker: not on the loop.
        await asyncio.to_thread(self.client.loop_stop)
        self.connected.clear()
        self.m_connected.set(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # --- MQTT (paho thread) ------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            log.warning("tracker link refused by the broker: %s", reason)
            return
        qos1 = SubscribeOptions(qos=1)
        client.subscribe(
            [
                (topics.device_filter(Channel.ACKS), qos1),
                (topics.COMMAND_EVENTS, qos1),
                (topics.ALERT_EVENTS, qos1),
            ]
        )
        self.connected.set()
        self.m_connected.set(1)
        log.info("tracker link connected to %s:%s", self.settings.mqtt.host, self.settings.mqtt.port)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._in_flight.clear)  # resend_queued sends them all
            asyncio.run_coroutine_threadsafe(self.resend_queued(), self._loop)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if self.connected.is_set():
            log.warning("tracker link lost (%s); reconnecting", reason)
        self.connected.clear()
        self.m_connected.set(0)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._loop is None:
            return
        item = _Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._mid_lock:
            command_id = self._pending.pop(mid, None)
            if command_id is None:
                # The PUBACK beat publish_command's bookkeeping (it publishes without our lock:
                # paho calls this holding its own lock, the other order would deadlock). Only the
                # newest are kept, far fewer than the 65,535 mids before one is reused.
                self._early[mid] = reason
                if len(self._early) > 1000:
                    self._early.popitem(last=False)
                return
        self._sent(command_id, reason)

    def _sent(self, command_id: str, reason: ReasonCode) -> None:
        if self._loop is not None:
            sent = _Sent(command_id, f"broker refused the command: {reason}" if reason.is_failure else None)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, sent)

    # --- publishing ------------------------------------------------------------------------
    def publish_command(self, row: CommandRow) -> None:
        """Publish a recorded command (its remaining TTL as message expiry); queued in paho if offline.

        Not running (a standby replica): nothing is published here; the holder's ``_outbox``
        publishes the queued row."""
        if not self.running:
            return
        remaining = int((row.expires_at - now()).total_seconds())
        if remaining <= 0:
            return
        command = wire.OutgoingCommand(
            device_type=row.device_type,
            device_id=row.device_id,
            name=row.name,
            args=dict(row.args),
            ttl_s=remaining,
            id=row.id,
            ts=int(row.created_at.timestamp() * 1000),
        )
        info = self.client.publish(command.topic, command.payload(), qos=1, properties=command.properties())
        with self._mid_lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = row.id
        self._in_flight.add(row.id)
        if early is not None:
            self._sent(row.id, early)

    def rules_changed(self, rule_id: str, version: int, change: str) -> None:
        payload = orjson.dumps({"rule_id": rule_id, "version": version, "change": change})
        if not self.running and self.standby_publish is not None:
            self.standby_publish(topics.RULES_CHANGED, payload)
            return
        self.client.publish(topics.RULES_CHANGED, payload, qos=1)

    async def publish_outbox(self) -> int:
        """Publish the queued operator commands not published on this connection (recorded by a
        standby replica, or before a takeover); return how many."""
        async with self.sessions() as session:
            ids = (
                await session.scalars(
                    select(CommandRow.id)
                    .where(
                        CommandRow.status == CommandStatus.queued,
                        CommandRow.expires_at > now(),
                        CommandRow.rule_id.is_(None),
                    )
                    .limit(OUTBOX_PAGE)
                )
            ).all()
            new = [i for i in ids if i not in self._in_flight]
            if not new:
                return 0
            rows = (await session.scalars(select(CommandRow).where(CommandRow.id.in_(new)))).all()
        for row in rows:
            if row.id not in self._in_flight and row.status == CommandStatus.queued:
                self.publish_command(row)
        return len(rows)

    async def _outbox(self) -> None:
        while True:
            await asyncio.sleep(OUTBOX_POLL_S)
            if not self.connected.is_set():
                continue  # resend_queued sends them all on connect
            try:
                await self.publish_outbox()
            except Exception:
                log.exception("publishing recorded commands failed; retrying")

    async def resend_queued(self) -> None:
        """Operator commands recorded but not yet accepted by the broker (e.g. before a restart)."""
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(CommandRow).where(
                        CommandRow.status == CommandStatus.queued,
                        CommandRow.expires_at > now(),
                        CommandRow.rule_id.is_(None),
                    )
                )
            ).all()
        for row in rows:
            self.publish_command(row)
        if rows:
            log.info("republished %d queued commands", len(rows))

    # --- recording (event loop) --------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.notified = False
            try:
                async with self.sessions() as session, session.begin():
                    await _prefetch(session, batch)
                    for item in batch:
                        await self._apply(session, item)
                    if self.fence is not None:
                        await self.fence(session)
            except Deposed as exc:
                # Another replica holds the lease: nothing recorded, nothing acked (the broker
                # redelivers to the new holder's session); this tracker is being stopped.
                log.warning("command events not recorded: %s", exc)
                return
            except Exception:
                # The DB is down or locked: the messages stay unacknowledged and the broker
                # redelivers them after a reconnect; retry this batch in a moment meanwhile.
                log.exception("recording %d command/alert events failed; retrying", len(batch))
                await asyncio.sleep(1.0)
                for item in batch:
                    self._queue.put_nowait(item)
                continue
            for item in batch:
                if isinstance(item, _Incoming) and item.qos > 0:
                    self.client.ack(item.mid, item.qos)
                elif isinstance(item, _Sent):
                    self._in_flight.discard(item.command_id)
            if self.notified and self.on_notifications is not None:
                self.on_notifications()

    async def _apply(self, session: AsyncSession, item: _Incoming | _Sent) -> None:
        if isinstance(item, _Sent):
            if item.error is None:
                await self._advance(session, item.command_id, CommandStatus.sent, sent_at=now())
            else:
                await self._advance(session, item.command_id, CommandStatus.failed, detail=item.error)
            return
        try:
            if item.topic == topics.COMMAND_EVENTS:
                await self._command_event(session, orjson.loads(item.payload))
            elif item.topic == topics.ALERT_EVENTS:
                await self._alert_event(session, orjson.loads(item.payload))
            else:
                await self._ack(session, item.topic, item.payload)
        except (ValueError, ValidationError, TopicError) as exc:
            # A malformed event is recorded as such (counted, logged) and acknowledged: redelivery won't fix it.
            self.m_events.labels("invalid").inc()
            log.warning("ignored an invalid message on %s: %s", item.topic, str(exc)[:200])

    async def _advance(
        self, session: AsyncSession, command_id: str, status: CommandStatus, **values: Any
    ) -> bool:
        """Move a command forward (never back); timestamps are filled in even when the status stays."""
        row = await session.get(CommandRow, command_id)
        if row is None:
            return False
        current = CommandStatus(row.status)
        # A device's final answer beats our own "expired" verdict: it did get the command in time.
        allowed = status.rank > current.rank or (
            current is CommandStatus.expired and status in (CommandStatus.succeeded, CommandStatus.failed)
        )
        for key, value in values.items():
            if key.endswith("_at"):
                if getattr(row, key) is None:
                    setattr(row, key, value)
            elif allowed:
                setattr(row, key, value)
        if not allowed:
            return False
        row.status = status.value
        self.m_status.labels(status.value).inc()
        return True

    async def _command_event(self, session: AsyncSession, body: dict[str, Any]) -> None:
        kind = body.get("event")
        if kind == "created":
            event = wire.CommandCreated.model_validate(body)
            self.m_events.labels("created").inc()
            row = await session.get(CommandRow, event.id)
            created = utc_ms(event.ts)
            if row is None:
                session.add(
                    CommandRow(
                        id=event.id,
                        device_id=event.device_id,
                        device_type=event.device_type,
                        name=event.name,
                        args=event.args,
                        status=CommandStatus.queued.value,
                        source=event.source,
                        rule_id=event.rule_id,
                        ttl_s=event.ttl_s,
                        created_at=created,
                        expires_at=created + timedelta(seconds=event.ttl_s),
                    )
                )
                await session.flush()
            else:  # the device's ack overtook the event: fill the details in
                row.name, row.args, row.source, row.rule_id = (
                    event.name,
                    event.args,
                    event.source,
                    event.rule_id,
                )
                row.ttl_s, row.created_at = event.ttl_s, created
                row.expires_at = created + timedelta(seconds=event.ttl_s)
        elif kind == "sent":
            sent = wire.CommandSent.model_validate(body)
            self.m_events.labels("sent").inc()
            await self._advance(session, sent.id, CommandStatus.sent, sent_at=utc_ms(sent.at))
        elif kind == "failed":
            failed = wire.CommandFailed.model_validate(body)
            self.m_events.labels("failed").inc()
            await self._advance(
                session, failed.id, CommandStatus.failed, detail=failed.detail, completed_at=utc_ms(failed.at)
            )
        else:
            raise ValueError(f"unknown command event {kind!r}")

    async def _ack(self, session: AsyncSession, topic: str, payload: bytes) -> None:
        parsed = topics.parse_device_topic(topic)
        ack = wire.Ack.model_validate_json(payload)
        self.m_events.labels("ack").inc()
        at = now()
        row = await session.get(CommandRow, ack.id)
        if row is None:
            # Ack before the rules engine's "created" event: keep it, details follow.
            session.add(
                CommandRow(
                    id=ack.id,
                    device_id=parsed.device_id,
                    device_type=parsed.device_type,
                    name="",
                    args={},
                    status=CommandStatus.delivered.value,
                    source="unknown",
                    ttl_s=1,
                    created_at=at,
                    expires_at=at,
                    delivered_at=at,
                )
            )
            await session.flush()
            row = await session.get(CommandRow, ack.id)
            assert row is not None
        elif row.device_id != parsed.device_id:
            # A device may only answer for itself (the broker ACL already limits the topic).
            raise ValueError(f"ack for command {ack.id} of {row.device_id} came from {parsed.device_id}")
        if ack.status in ("received", "delivered"):
            await self._advance(session, ack.id, CommandStatus.delivered, delivered_at=at)
        else:
            await self._advance(
                session,
                ack.id,
                CommandStatus(ack.status),
                delivered_at=at,
                completed_at=at,
                detail=ack.detail or None,
            )

    async def _alert_event(self, session: AsyncSession, body: dict[str, Any]) -> None:
        kind = body.get("event")
        if kind == "raised":
            event = wire.AlertRaised.model_validate(body)
            open_key = f"{event.rule_id}:{event.device_id}"
            if await session.scalar(select(AlertRow.id).where(AlertRow.open_key == open_key)) is not None:
                self.m_events.labels("alert_duplicate").inc()
                return
            if await session.get(AlertRow, event.id) is not None:
                return  # redelivered
            try:
                async with session.begin_nested():
                    alert = AlertRow(
                        id=event.id,
                        rule_id=event.rule_id,
                        rule_name=event.rule_name,
                        device_id=event.device_id,
                        device_type=event.device_type,
                        severity=event.severity,
                        message=event.message,
                        status=AlertStatus.active.value,
                        values=event.values,
                        open_key=open_key,
                        raised_at=utc_ms(event.at),
                    )
                    session.add(alert)
                    await session.flush()
                    await notifications.enqueue(
                        session, alert, Transition.raised, named=event.notify, at=alert.raised_at
                    )
                    self.notified = True
            except IntegrityError:  # a concurrent raise won: one open alert per (rule, device)
                self.m_events.labels("alert_duplicate").inc()
                return
            self.m_events.labels("alert_raised").inc()
        elif kind == "cleared":
            cleared = wire.AlertCleared.model_validate(body)
            open_alert = await session.scalar(
                select(AlertRow).where(AlertRow.open_key == f"{cleared.rule_id}:{cleared.device_id}")
            )
            if open_alert is None:
                return  # nothing open (a redelivered clear, or a clear without a raise)
            open_alert.status = AlertStatus.cleared.value
            open_alert.cleared_at = utc_ms(cleared.at)
            open_alert.clear_reason = cleared.reason[:200] or "cleared"
            open_alert.open_key = None
            await session.flush()
            await notifications.enqueue(session, open_alert, Transition.cleared, at=open_alert.cleared_at)
            self.notified = True
            self.m_events.labels("alert_cleared").inc()
        else:
            raise ValueError(f"unknown alert event {kind!r}")

    async def expire(self) -> int:
        """Mark queued/sent commands past their TTL expired; return how many."""
        at = now()
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(CommandRow)
                .where(
                    CommandRow.status.in_([CommandStatus.queued.value, CommandStatus.sent.value]),
                    CommandRow.expires_at <= at,
                )
                .values(
                    status=CommandStatus.expired.value, completed_at=at, detail="no answer before the TTL"
                )
            )
            if self.fence is not None:
                await self.fence(session)
        count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            self.m_status.labels("expired").inc(count)
        return count

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rules.tracker_sweep_s)
            try:
                await self.expire()
            except Exception:
                log.exception("expiry sweep failed; retrying")


async def _prefetch(session: AsyncSession, batch: list[_Incoming | _Sent]) -> None:
    """Load the batch's command rows in one query: ``session.get`` then finds them without a query each.

    A job's 10,000 PUBACKs and acks arrive in batches of 500; one SELECT per row was most of their cost.
    """
    ids: set[str] = set()
    for item in batch:
        if isinstance(item, _Sent):
            ids.add(item.command_id)
        elif item.topic not in (topics.ALERT_EVENTS,):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                command_id = orjson.loads(item.payload).get("id")
                if isinstance(command_id, str) and len(command_id) <= 64:
                    ids.add(command_id)
    if ids:
        # .all(): the rows become objects in the session's identity map only when fetched.
        (await session.scalars(select(CommandRow).where(CommandRow.id.in_(ids)))).all()


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Commands are small packets that must not wait for a delayed TCP ACK (paho leaves Nagle on).
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_command_id() -> str:
    return str(uuid.uuid4())
