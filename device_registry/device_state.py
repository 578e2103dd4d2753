"""The device shadow: desired and reported state per device, the delta, and its way to the device.

Documents are partial documents of the type's state model (``DeviceType.state``
in the catalogue), changed by JSON merge patches (RFC 7396; the models are flat,
so a patch sets the fields it holds and ``null`` removes one). ``delta`` = the
desired fields whose reported value differs (or is missing).

Write paths, all serialised by one lock per registry (read-modify-write of a row
must not interleave) and all batched:

- ``PATCH /api/v1/devices/{id}/state/desired`` (``Shadow.patch_desired``), with
  optimistic concurrency on the desired version;
- ``set_desired_many(session, device_ids, patch)``: many devices in the caller's
  transaction (jobs), Core statements in chunks, nothing per device but the dict
  work;
- the devices' ``state/reported`` and the rules engine's desired-state requests
  (``iotfleet/state/desired``), consumed by ``Shadow`` on a persistent MQTT
  session with manual acks: each message is acknowledged only after the batch
  holding it committed (a registry crash loses none; redelivery is harmless:
  merge patches are idempotent, a no-op bumps no version, and a rule request
  whose id was the last applied is skipped).

Delivery to the device is an outbox: a change of the delta sets
``delta_pending`` in the same transaction; the publisher sends the row's
current delta as a RETAINED QoS 1 message on ``devices/{type}/{id}/state/delta``
(an empty retained message when the delta became empty, which clears it) and
clears the flag when the broker acknowledged that version. A device that was
offline gets the retained delta when it subscribes; a registry that crashed
before publishing publishes at start. One publisher per deployment (fixed
client id, like the command tracker): it runs in the replica holding the registry
lease (``device_registry.lease``); a standby's writes wait in the outbox for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry.models import Device
from device_registry.models_state import DeviceStateRow
from iotfleet import tls_clients, topics
from iotfleet.admission import Limits, Rejected, StateAdmission, device_error
from iotfleet.catalogue import DEVICE_TYPES, State, get_device_type
from iotfleet.errors import TopicError
from iotfleet.settings import Settings
from iotfleet.topics import Channel
from rules_engine import wire

log = logging.getLogger("registry.state")

TABLE = cast(Table, DeviceStateRow.__table__)
CHUNK = 500
"""Devices per ``IN (…)`` lookup and per executemany: far below SQLite's and asyncpg's limits."""
BATCH = 2_000
"""Messages (reports, rule requests) recorded per transaction."""
PUBLISH_PAGE = 1_000
MAX_QUEUED = 100_000
"""Messages waiting to be recorded, beyond which QoS 0 reports are dropped (memory bound)."""
RETRY_S = 10.0
"""How often the pending rows are scanned for deltas nobody sent (also at start, at every reconnect
and after ``ShadowService.wake()``); one in flight on the current connection is never sent twice."""
ACK_COALESCE_S = 0.1
"""PUBACKs arriving within this window clear their rows in one transaction."""
MAX_DOCUMENT_BYTES = 16 * 1024
"""A stored document's size as JSON: far above any state model (a few bounded fields)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- the documents (pure) ------------------------------------------------------------------


class NoStateError(ValueError):
    """The device type has no configurable state."""


class PatchError(ValueError):
    """A patch the state model refuses: ``errors`` as the API's problem lists them."""

    def __init__(self, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.errors = errors


def state_model(device_type: str) -> type[State]:
    """The state model of a type; NoStateError if it has none (UnknownDeviceTypeError if unknown)."""
    model = get_device_type(device_type).state
    if model is None:
        raise NoStateError(f"device type {device_type!r} has no configurable state")
    return model


def validate_patch(device_type: str, patch: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch checked against the type's state model: the fields it sets (valid values, as
    JSON) and those it removes (``None``). Raises NoStateError or PatchError."""
    model = state_model(device_type)
    if not isinstance(patch, Mapping):
        raise PatchError("a state patch is a JSON object", [{"field": "body", "message": "not an object"}])
    try:
        return model.model_validate(dict(patch)).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"]) or "body",
                "message": err["msg"],
                "type": err["type"],
            }
            for err in exc.errors(include_url=False)[:20]
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise PatchError(f"invalid {device_type} state: {summary}", errors) from None


def merge(document: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7396 on a flat document: set what the patch holds, remove what it sets to null."""
    out = dict(document)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_MISSING = object()


def delta_of(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """The desired fields the device has not reported (missing or with another value)."""
    return {k: v for k, v in desired.items() if reported.get(k, _MISSING) != v}


def delta_message(version: int, delta: Mapping[str, Any], at_ms: int) -> bytes:
    """The ``state/delta`` payload; b"" (which clears the retained message) when nothing differs."""
    if not delta:
        return b""
    return orjson.dumps({"version": version, "state": dict(delta), "ts": at_ms})


def parse_if_match(value: str | None) -> int | None:
    """The desired version named by an ``If-Match`` header (``"3"``, ``3``, ``W/"3"``); None for
    none or ``*``; ValueError for anything else."""
    if value is None:
        return None
    text = value.strip()
    if text == "*":
        return None
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or len(text) > 12:
        raise ValueError(f'If-Match must be a desired version such as "3", got {value[:40]!r}')
    return int(text)


def etag(version: int) -> str:
    return f'"{version}"'


@dataclass(slots=True)
class Shadow:
    """One device's state row as plain data (Core reads and executemany writes, no ORM per row)."""

    device_id: str
    device_type: str
    desired: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 0
    desired_updated_at: datetime | None = None
    desired_source: str | None = None
    desired_request_id: str | None = None
    reported: dict[str, Any] = field(default_factory=dict)
    reported_version: int = 0
    reported_updated_at: datetime | None = None
    delta: dict[str, Any] = field(default_factory=dict)
    delta_seq: int = 0
    delta_pending: bool = False
    stored: bool = False
    """A row exists in the table (update, not insert)."""
    changed: bool = False

    def values(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_type": self.device_type,
            "desired": self.desired,
            "desired_version": self.desired_version,
            "desired_updated_at": self.desired_updated_at,
            "desired_source": self.desired_source,
            "desired_request_id": self.desired_request_id,
            "reported": self.reported,
            "reported_version": self.reported_version,
            "reported_updated_at": self.reported_updated_at,
            "delta": self.delta,
            "delta_seq": self.delta_seq,
            "delta_pending": self.delta_pending,
        }

    def _recompute(self) -> None:
        delta = delta_of(self.desired, self.reported)
        if delta != self.delta:
            self.delta = delta
            self.delta_seq += 1
            self.delta_pending = True

    def set_desired(
        self, patch: Mapping[str, Any], *, source: str, at: datetime, request_id: str | None = None
    ) -> bool:
        """Apply a validated merge patch to ``desired``; False (nothing bumped) if it changes nothing."""
        desired = merge(self.desired, patch)
        if request_id is not None:
            self.desired_request_id = request_id
            self.changed = True
        if desired == self.desired:
            return False
        if len(orjson.dumps(desired)) > MAX_DOCUMENT_BYTES:
            raise PatchError(
                f"desired state would exceed {MAX_DOCUMENT_BYTES} bytes",
                [{"field": "body", "message": "document too large"}],
            )
        self.desired = desired
        self.desired_version += 1
        self.desired_updated_at = at
        self.desired_source = source[:200]
        self.changed = True
        self._recompute()
        return True

    def set_reported(self, patch: Mapping[str, Any], *, at: datetime) -> bool:
        reported = merge(self.reported, patch)
        # A report is the device saying "now": its time moves even when nothing changed.
        self.reported_updated_at = at
        self.changed = True
        if reported == self.reported:
            return False
        self.reported = reported
        self.reported_version += 1
        self._recompute()
        return True


_COLUMNS = tuple(TABLE.c[name] for name in Shadow.__dataclass_fields__ if name not in ("stored", "changed"))


def _shadow(row: Any) -> Shadow:
    values = dict(row._mapping)
    return Shadow(**values, stored=True)


async def load(
    session: AsyncSession, device_ids: Iterable[str], *, for_update: bool = False
) -> dict[str, Shadow]:
    """The stored shadows of these devices (those without a row are absent), in chunks."""
    ids = list(dict.fromkeys(device_ids))
    out: dict[str, Shadow] = {}
    for start in range(0, len(ids), CHUNK):
        stmt = select(*_COLUMNS).where(TABLE.c.device_id.in_(ids[start : start + CHUNK]))
        if for_update:  # PostgreSQL: row locks against a concurrent writer; SQLite ignores it
            stmt = stmt.with_for_update()
        for row in await session.execute(stmt):
            shadow = _shadow(row)
            out[shadow.device_id] = shadow
    return out


async def device_types(session: AsyncSession, device_ids: Iterable[str]) -> dict[str, str]:
    """id → type of the registry devices among these ids (unknown ids are absent)."""
    ids = list(dict.fromkeys(device_ids))
    out: dict[str, str] = {}
    for start in range(0, len(ids), CHUNK):
        rows = await session.execute(
            select(Device.id, Device.type).where(Device.id.in_(ids[start : start + CHUNK]))
        )
        out.update({device_id: device_type for device_id, device_type in rows})
    return out


async def save(session: AsyncSession, shadows: Iterable[Shadow]) -> int:
    """Write the changed shadows: one executemany of inserts and one of updates per chunk."""
    new = [s.values() for s in shadows if s.changed and not s.stored]
    old = [s for s in shadows if s.changed and s.stored]
    for start in range(0, len(new), CHUNK):
        await session.execute(insert(TABLE), new[start : start + CHUNK])
    if old:
        # Bind names must differ from column names in an UPDATE's SET: prefixed b_.
        names = [c.name for c in _COLUMNS if c.name not in ("device_id", "device_type")]
        stmt = (
            update(TABLE)
            .where(TABLE.c.device_id == bindparam("b_device_id"))
            .values({name: bindparam(f"b_{name}") for name in names})
        )
        params = [{f"b_{k}": v for k, v in s.values().items() if k != "device_type"} for s in old]
        for start in range(0, len(params), CHUNK):
            await session.execute(stmt, params[start : start + CHUNK])
    for s in shadows:
        if s.changed:
            s.stored, s.changed = True, False
    return len(new) + len(old)


@dataclass
class DesiredBatch:
    """What ``set_desired_many`` did: ids by outcome (``refused``: id → why)."""

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    outbox: list[Shadow] = field(default_factory=list, repr=False)
    """The changed shadows whose delta is to be published (what ``ShadowService`` sends at once)."""
    converged: set[str] = field(default_factory=set, repr=False)
    """Of ``changed`` and ``unchanged``: the devices whose REPORTED state already holds every field
    the patch sets (nothing to wait for; an unchanged desired state alone does not say that)."""

    @property
    def pending(self) -> bool:
        return bool(self.changed)


async def set_desired_many(
    session: AsyncSession,
    device_ids: Sequence[str],
    patch: Mapping[str, Any],
    *,
    source: str = "api",
    request_id: str | None = None,
) -> DesiredBatch:
    """Merge ``patch`` into the desired state of many devices, in the caller's transaction.

    The patch is validated once per device type (a device whose type refuses it, or has no
    state, is ``refused`` with the reason; unknown ids are ``missing``). The caller commits; the
    deltas are published by the registry's shadow publisher after that (outbox: call
    ``Shadow.wake()`` to send them at once, else they go within ``RETRY_S``). On PostgreSQL the
    rows are locked (``FOR UPDATE``); inside the registry, hold ``Shadow.lock`` around the
    transaction so that reports and API patches do not interleave.
    """
    result = DesiredBatch()
    types = await device_types(session, device_ids)
    shadows = await load(session, types, for_update=True)
    valid: dict[str, dict[str, Any] | str] = {}
    at = utcnow()
    for device_id in dict.fromkeys(device_ids):
        device_type = types.get(device_id)
        if device_type is None:
            result.missing.append(device_id)
            continue
        checked = valid.get(device_type)
        if checked is None:
            try:
                checked = validate_patch(device_type, patch)
            except (NoStateError, PatchError) as exc:
                checked = str(exc)
            valid[device_type] = checked
        if isinstance(checked, str):
            result.refused[device_id] = checked
            continue
        shadow = shadows.get(device_id)
        if shadow is None:
            shadow = shadows[device_id] = Shadow(device_id, device_type)
        try:
            changed = shadow.set_desired(checked, source=source, at=at, request_id=request_id)
        except PatchError as exc:
            result.refused[device_id] = str(exc)
            continue
        (result.changed if changed else result.unchanged).append(device_id)
        if not any(key in shadow.delta for key, value in checked.items() if value is not None):
            result.converged.add(device_id)
    await save(session, shadows.values())
    result.outbox = [s for s in shadows.values() if s.delta_pending]
    return result


# --- the MQTT side ---------------------------------------------------------------------------

ReportHook = Callable[[AsyncSession, Mapping[str, "Shadow"]], Awaitable[object]]
"""Called in the transaction recording a batch of reports, with the shadows of the devices that
reported (id → shadow, reported state applied): e.g. jobs mark executions whose state arrived."""


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "registry_state_messages",
            "State messages consumed, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.deltas = Counter(
            "registry_state_deltas_published",
            "Retained state/delta messages sent, by result",
            ["result"],
            registry=registry,
        )
        self.batch = Histogram(
            "registry_state_batch_seconds",
            "Time to record one batch of state messages",
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.connected = Gauge(
            "registry_state_connected", "1 when the shadow's MQTT session is up", registry=registry
        )


class ShadowService:
    """The registry's shadow runtime: consumer of reports and rule requests, delta publisher."""

    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.lock = asyncio.Lock()
        """Held around every read-modify-write of shadow rows in this registry."""
        self.report_hooks: list[ReportHook] = []
        limits = Limits.from_settings(settings.ingest)
        self.admissions = {
            name: StateAdmission(t, limits) for name, t in DEVICE_TYPES.items() if t.state is not None
        }
        self.max_errors = limits.max_errors
        deployment = hashlib.sha256(settings.registry_database_url().encode()).hexdigest()[:8]
        self.client_id = f"{settings.rules.client_id}-shadow-{deployment}"
        self.connected = threading.Event()
        self.running = False
        """Its session and publisher run (in the registry lease holder only)."""
        self.metrics = ShadowMetrics(registry)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Incoming] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._scan = True  # scan the pending rows at the next wake (start, reconnect, retry, wake())
        self._tasks: list[asyncio.Task[None]] = []
        self._mid_lock = threading.Lock()
        self._pending: dict[int, tuple[str, int]] = {}  # mid → (device id, delta seq)
        self._early: OrderedDict[int, ReasonCode] = OrderedDict()
        # device id → (delta seq, sent at, acked): kept until the DB flag of that seq is cleared, so a
        # page read meanwhile does not send the same delta twice.
        self._inflight: dict[str, tuple[int, float, bool]] = {}
        self._acked: list[tuple[str, int]] = []
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
        self.client.max_inflight_messages_set(1_000)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        # Restartable (it runs while this replica holds the registry lease): a fresh run.
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        with self._mid_lock:
            self._pending.clear()
            self._early.clear()
        self._inflight.clear()
        self._acked.clear()
        self._scan = True
        self.running = True
        self._tasks = [
            asyncio.create_task(self._consume(), name="state-consumer"),
            asyncio.create_task(self._publisher(), name="state-publisher"),
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
        await asyncio.to_thread(self.client.loop_stop)  # joins paho's thread: not on the loop
        self.connected.clear()
        self.metrics.connected.set(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        """Publish every pending delta now: for writers outside this service (``set_desired_many`` in
        a caller's transaction), after their commit. One scan of the pending rows."""
        self._scan = True
        self._wake.set()

    # --- paho's thread -----------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            log.warning("shadow link refused by the broker: %s", reason)
            return
        qos1 = SubscribeOptions(qos=1)
        client.subscribe(
            [(topics.device_filter(Channel.STATE_REPORTED), qos1), (topics.DESIRED_STATE_REQUESTS, qos1)]
        )
        self.connected.set()
        self.metrics.connected.set(1)
        log.info("shadow link connected to %s:%s", self.settings.mqtt.host, self.settings.mqtt.port)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reconnected)

    def _reconnected(self) -> None:
        # What was unacknowledged goes again (retained: a repeat is harmless).
        self._inflight = {k: v for k, v in self._inflight.items() if v[2]}
        self.wake()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if self.connected.is_set():
            log.warning("shadow link lost (%s); reconnecting", reason)
        self.connected.clear()
        self.metrics.connected.set(0)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos == 0 and self._queue.qsize() >= MAX_QUEUED:
            # QoS 1 is bounded by the session's receive maximum (acked after commit); QoS 0 reports
            # are not, so past this backlog they are dropped (counted) rather than held in memory.
            self.metrics.messages.labels("reported", "dropped_backlog").inc()
            return
        if self._loop is not None:
            item = _Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._mid_lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                # The PUBACK beat our bookkeeping (see CommandTracker._on_publish): kept for it.
                self._early[mid] = reason
                if len(self._early) > 1000:
                    self._early.popitem(last=False)
                return
        self._published(entry, reason)

    def _published(self, entry: tuple[str, int], reason: ReasonCode) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._delta_acked, entry, reason.is_failure)

    # --- the event loop: publishing ----------------------------------------------------------
    def _delta_acked(self, entry: tuple[str, int], failed: bool) -> None:
        device_id, seq = entry
        if failed:  # kept as sent: tried again after the next reconnect
            self.metrics.deltas.labels("refused").inc()
            log.warning("the broker refused the state/delta of %s (svc-registry ACL?)", device_id)
            return
        current = self._inflight.get(device_id)
        if current is not None and current[0] == seq:
            self._inflight[device_id] = (seq, current[1], True)
        self.metrics.deltas.labels("acked").inc()
        self._acked.append(entry)
        self._wake.set()

    def _send(self, device_type: str, device_id: str, version: int, delta: dict[str, Any], seq: int) -> None:
        topic = topics.device_topic(device_type, device_id, Channel.STATE_DELTA)
        payload = delta_message(version, delta, int(time.time() * 1000))
        self._inflight[device_id] = (seq, time.monotonic(), False)
        info = self.client.publish(topic, payload, qos=1, retain=True)
        with self._mid_lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = (device_id, seq)
        if early is not None:
            self._published((device_id, seq), early)

    async def publish_pending(self) -> int:
        """Send the delta of every row whose delta the broker has not acknowledged (pages by id)."""
        sent = 0
        after = ""
        while True:
            async with self.sessions() as session:
                rows = (
                    await session.execute(
                        select(
                            TABLE.c.device_id,
                            TABLE.c.device_type,
                            TABLE.c.desired_version,
                            TABLE.c.delta,
                            TABLE.c.delta_seq,
                        )
                        .where(TABLE.c.delta_pending.is_(True), TABLE.c.device_id > after)
                        .order_by(TABLE.c.device_id)
                        .limit(PUBLISH_PAGE)
                    )
                ).all()
            for device_id, device_type, version, delta, seq in rows:
                inflight = self._inflight.get(device_id)
                if inflight is not None and inflight[0] == seq:
                    # On its way (paho queues and the session retransmits it) or acked: sending it
                    # again would only lengthen the queue. A reconnect forgets the unacked ones.
                    continue
                try:
                    self._send(device_type, device_id, version, delta, seq)
                except TopicError:  # a row no topic can be built for: never retried in a loop
                    log.warning("cannot publish the delta of %r (%s)", device_id, device_type)
                    continue
                sent += 1
            if len(rows) < PUBLISH_PAGE:
                return sent
            after = rows[-1][0]

    async def _clear_acked(self) -> None:
        acked, self._acked = self._acked, []
        if not acked:
            return
        stmt = (
            update(TABLE)
            .where(TABLE.c.device_id == bindparam("b_id"), TABLE.c.delta_seq == bindparam("b_seq"))
            .values(delta_pending=False)
        )
        params = [{"b_id": device_id, "b_seq": seq} for device_id, seq in acked]
        try:
            async with self.sessions() as session, session.begin():
                for start in range(0, len(params), CHUNK):
                    await session.execute(stmt, params[start : start + CHUNK])
        except Exception:
            log.exception("clearing %d acknowledged deltas failed; retrying", len(acked))
            self._acked = acked + self._acked
            return
        for device_id, seq in acked:
            current = self._inflight.get(device_id)
            if current is not None and current[0] == seq:
                del self._inflight[device_id]

    def send_committed(self, shadows: Iterable[Shadow]) -> None:
        """Publish the deltas a transaction just committed (called under the lock: commit order is
        publish order, so the retained message is always the newest delta). Not running (a
        standby replica): the rows stay ``delta_pending`` for the lease holder's publisher."""
        if not self.running:
            return
        for shadow in shadows:
            inflight = self._inflight.get(shadow.device_id)
            if inflight is not None and inflight[0] == shadow.delta_seq:
                continue  # this very delta is on its way already
            if shadow.delta_pending:
                try:
                    self._send(
                        shadow.device_type,
                        shadow.device_id,
                        shadow.desired_version,
                        shadow.delta,
                        shadow.delta_seq,
                    )
                except TopicError:
                    log.warning("cannot publish the delta of %r (%s)", shadow.device_id, shadow.device_type)

    async def _publisher(self) -> None:
        """Clears acknowledged deltas (coalesced) and sends the pending ones nobody sent: the rows are
        scanned only at start, reconnect, ``wake()`` and every RETRY_S, never per message."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), RETRY_S)
            except TimeoutError:
                self._scan = True
            self._wake.clear()
            try:
                await asyncio.sleep(ACK_COALESCE_S)
                await self._clear_acked()
                if self._scan and self.connected.is_set():
                    self._scan = False
                    await self.publish_pending()
            except Exception:
                log.exception("publishing state deltas failed; retrying")
                self._scan = True
                await asyncio.sleep(1.0)

    # --- the event loop: consuming -----------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                await self.record(batch)
            except Exception:
                # The DB is away: nothing was acked, retry the batch in a moment (the broker also
                # redelivers it after a reconnect).
                log.exception("recording %d state messages failed; retrying", len(batch))
                await asyncio.sleep(1.0)
                for item in batch:
                    self._queue.put_nowait(item)
                continue
            self.metrics.batch.observe(time.perf_counter() - started)
            for item in batch:
                if item.qos > 0:
                    self.client.ack(item.mid, item.qos)

    def _refuse_report(self, device_type: str, device_id: str, rejected: Rejected, payload: bytes) -> None:
        self.metrics.messages.labels("reported", rejected.reason).inc()
        body = device_error(
            received_at_ms=int(time.time() * 1000),
            rejected=rejected,
            payload=payload,
            max_errors=self.max_errors,
            channel=Channel.STATE_REPORTED.value,
        )
        # Best effort, like the ingest's: a device that does not subscribe costs nothing.
        self.client.publish(topics.device_topic(device_type, device_id, Channel.ERRORS), body, qos=0)

    async def record(self, batch: Sequence[_Incoming]) -> None:
        """Validate a batch of reports and rule requests and apply them in one transaction."""
        reports: list[tuple[str, str, dict[str, Any]]] = []
        requests: list[wire.DesiredStateRequest] = []
        for item in batch:
            if item.topic == topics.DESIRED_STATE_REQUESTS:
                try:
                    requests.append(wire.DesiredStateRequest.model_validate_json(item.payload))
                except ValidationError as exc:
                    self.metrics.messages.labels("request", "invalid").inc()
                    log.warning("ignored an invalid desired-state request: %s", str(exc)[:200])
                continue
            try:
                parsed = topics.parse_device_topic(item.topic)
            except TopicError:
                continue
            admission = self.admissions.get(parsed.device_type)
            if admission is None:
                self._refuse_report(
                    parsed.device_type,
                    parsed.device_id,
                    Rejected.one("unknown_device_type", f"{parsed.device_type!r} has no configurable state"),
                    item.payload,
                )
                continue
            try:
                patch = admission.admit(item.payload)
            except Rejected as rejected:
                self._refuse_report(parsed.device_type, parsed.device_id, rejected, item.payload)
                continue
            reports.append((parsed.device_type, parsed.device_id, patch))
        if not reports and not requests:
            return
        at = utcnow()
        async with self.lock:
            shadows = await self._record(reports, requests, at)
            self.send_committed(shadows.values())

    async def _record(
        self,
        reports: Sequence[tuple[str, str, dict[str, Any]]],
        requests: Sequence[wire.DesiredStateRequest],
        at: datetime,
    ) -> dict[str, Shadow]:
        async with self.sessions() as session, session.begin():
            ids = [r[1] for r in reports] + [r.device_id for r in requests]
            types = await device_types(session, ids)
            shadows = await load(session, types, for_update=True)
            reported: dict[str, Shadow] = {}
            for device_type, device_id, patch in reports:
                if types.get(device_id) != device_type:
                    self.metrics.messages.labels("reported", "unknown_device").inc()
                    continue
                shadow = shadows.get(device_id)
                if shadow is None:
                    shadow = shadows[device_id] = Shadow(device_id, device_type)
                shadow.set_reported(patch, at=at)
                reported[device_id] = shadow
                self.metrics.messages.labels("reported", "ok").inc()
            for request in requests:
                if types.get(request.device_id) != request.device_type:
                    self.metrics.messages.labels("request", "unknown_device").inc()
                    continue
                shadow = shadows.get(request.device_id)
                if shadow is None:
                    shadow = shadows[request.device_id] = Shadow(request.device_id, request.device_type)
                if shadow.desired_request_id == request.id:
                    self.metrics.messages.labels("request", "duplicate").inc()
                    continue
                try:
                    patch = validate_patch(request.device_type, request.patch)
                    shadow.set_desired(patch, source=request.source, at=at, request_id=request.id)
                except (NoStateError, PatchError) as exc:
                    self.metrics.messages.labels("request", "invalid").inc()
                    log.warning("refused a desired-state request for %s: %s", request.device_id, exc)
                    continue
                self.metrics.messages.labels("request", "ok").inc()
            await save(session, shadows.values())
            if reported:
                for hook in self.report_hooks:
                    await hook(session, reported)
        return shadows

    # --- the API's entry points ----------------------------------------------------------------
    async def patch_desired(
        self, device_id: str, device_type: str, patch: Mapping[str, Any], *, if_match: int | None, source: str
    ) -> Shadow:
        """Apply a validated patch to one device; raise VersionMismatch if ``if_match`` is stale."""
        async with self.lock:
            async with self.sessions() as session, session.begin():
                shadow = (await load(session, [device_id], for_update=True)).get(device_id)
                if shadow is None:
                    shadow = Shadow(device_id, device_type)
                if if_match is not None and if_match != shadow.desired_version:
                    raise VersionMismatch(shadow.desired_version)
                changed = shadow.set_desired(patch, source=source, at=utcnow())
                await save(session, [shadow])
            if changed:
                self.send_committed([shadow])
        return shadow

    async def set_desired_many(
        self, device_ids: Sequence[str], patch: Mapping[str, Any], *, source: str
    ) -> DesiredBatch:
        """``set_desired_many`` in a transaction of its own, under the lock, deltas sent at once."""
        async with self.lock:
            async with self.sessions() as session, session.begin():
                result = await set_desired_many(session, device_ids, patch, source=source)
            self.send_committed(result.outbox)
        return result


class VersionMismatch(Exception):
    def __init__(self, current: int) -> None:
        super().__init__(f"the desired state is at version {current}")
        self.current = current


async def read(session: AsyncSession, device_id: str, device_type: str) -> Shadow:
    """One device's shadow (an empty one at version 0 if it never had a state)."""
    return (await load(session, [device_id])).get(device_id) or Shadow(device_id, device_type)
