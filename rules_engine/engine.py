"""The rules engine service: MQTT session in, evaluator, commands and alert events out.

One asyncio loop in one thread does the hot path end to end: the MQTT client
(iotfleet/mqtt_client.py) parses readings from the socket, the evaluator runs
every rule of the reading's type inline, and a firing's command is written to
the broker on a second connection before the next reading is read. No queue
and no thread hop between reading and command: with paho's network threads,
the GIL hand-overs put tens of milliseconds on the p99 (docs/benchmarks.md).
Because everything that touches the evaluator runs on that loop (readings,
presence, the APScheduler clock tick and cron schedules, rule reloads), a burst
of readings for one device can never fire twice and needs no lock.

Off the loop: fetching rules over HTTP (a worker thread; the result is applied
on the loop), flushing last-seen times and the rules cache to SQLite (one
store thread, so a 10,000-device flush never stalls a reading), and /healthz.

The MQTT session is persistent (fixed client id, clean start off, session
expiry), so readings published while the engine restarts are queued by the
broker and evaluated when it is back. A reading is acked once it was
evaluated, any firing state change it caused is in the state store and the
broker acked every command and event it caused: a crash before that
redelivers the reading instead of losing a command, and the stored state
keeps it from firing twice; active rules still clear after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import orjson
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from iotfleet import presence_event, topics
from iotfleet.admission import Admission, Limits, Rejected
from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import TopicError
from iotfleet.lifecycle import ServiceLifecycle
from iotfleet.mqtt_client import MqttClient, SessionConfig
from iotfleet.settings import Settings
from iotfleet.topics import Channel
from rules_engine import wire
from rules_engine.evaluator import Evaluator, Firing
from rules_engine.models import CommandAction, SetDesiredAction, StoredRule, duration_ms, rule_definition
from rules_engine.partitioned import PartitionOwner
from rules_engine.sources import DeviceEntry, Directory, RuleSource, SourceError, parse_rules
from rules_engine.store import StateStore

log = logging.getLogger("rules-engine")

T = TypeVar("T")

STOP_TIMEOUT_S = 15.0
#: Namespace of the deterministic ids of partitioned engines' commands and alert events.
FIRING_ID_NAMESPACE = uuid.UUID("5b0c8f1e-9c1a-4f43-9d55-2f1e0c7d6a19")
DRAIN_COMMANDS_S = 2.0


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter("iotfleet_rules_readings_total", "Readings evaluated", registry=registry)
        self.skipped = Counter(
            "iotfleet_rules_readings_skipped_total",
            "Telemetry not evaluated: the admission reason the ingest dead-letters it with (the same"
            " check), unknown_type, stale (older than the device's newest reading), error",
            ["reason"],
            registry=registry,
        )
        self.firings = Counter(
            "iotfleet_rules_firings_total", "Rule firings and clears", ["kind"], registry=registry
        )
        self.commands = Counter(
            "iotfleet_rules_commands_total", "Commands published by rules", ["result"], registry=registry
        )
        self.alerts = Counter(
            "iotfleet_rules_alert_events_total", "Alert events published", ["event"], registry=registry
        )
        self.reloads = Counter(
            "iotfleet_rules_reloads_total", "Rule reloads from the source", ["result"], registry=registry
        )
        self.rules = Gauge("iotfleet_rules_loaded", "Rules loaded", ["kind"], registry=registry)
        self.devices = Gauge("iotfleet_rules_devices", "Devices with evaluation state", registry=registry)
        self.connected = Gauge(
            "iotfleet_rules_mqtt_connected", "1 when the MQTT session is up", registry=registry
        )
        self.eval_seconds = Histogram(
            "iotfleet_rules_evaluation_seconds",
            "Time to evaluate one telemetry message and publish its actions",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=registry,
        )


def _by_time(item: tuple[int, Any]) -> int:
    return int(item[0])


class EngineNotRunningError(RuntimeError):
    """Raised by ``RulesEngine.call`` when the engine's loop is not running (not started, or stopped)."""


class RulesEngine:
    def __init__(
        self,
        settings: Settings,
        source: RuleSource,
        store: StateStore,
        *,
        lifecycle: ServiceLifecycle | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.store = store
        self.lifecycle = lifecycle or ServiceLifecycle("rules-engine")
        self.metrics = EngineMetrics(registry := registry or CollectorRegistry())
        self.evaluator = Evaluator()
        self.directory = Directory()
        # The ingest's admission check with the ingest's settings: a reading the ingest dead-letters
        # is never evaluated, never enters a device's state and is never persisted.
        self.limits = Limits.from_settings(settings.ingest)
        self._admissions = {name: Admission(t, self.limits) for name, t in DEVICE_TYPES.items()}
        self.admissions = self._admissions
        self.partitions: PartitionOwner | None = None
        """Set when this engine is one of several (IOTFLEET_RULES__PARTITIONS > 0)."""
        self._firing: Firing | None = None
        self._firing_seq = 0
        self.schedules: dict[str, StoredRule] = {}
        self.rules_loaded = False
        self.last_reload_error: str | None = None
        self.subscribed = threading.Event()
        """Set while the receiving session is connected and subscribed (read by health and tests)."""
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        rules, mqtt = settings.rules, settings.mqtt
        client_id = rules.client_id
        # Presence is the registry's (broker connection log, timeouts, messages), not the
        # device's own retained status, which a device can leave stale: one truth for the
        # dashboard, the API and the rules (iotfleet/presence_event.py).
        filters: tuple[str, ...] = (
            topics.device_filter(Channel.TELEMETRY),
            topics.presence_filter(),
            topics.RULES_CHANGED,
        )
        if rules.partitions > 0:
            self.partitions = PartitionOwner(self, registry)
            # Each engine its own persistent session with plain subscriptions (Mosquitto cannot
            # route a device to a fixed member of a shared subscription): it evaluates its
            # partitions' readings and buffers the others'.
            client_id = f"{rules.client_id}-{rules.replica}"[:64]
            types = self.partitions.device_types
            filters = (
                *(topics.device_filter(Channel.TELEMETRY, t) for t in types),
                *(topics.presence_filter(t) for t in types),
                topics.RULES_CHANGED,
            )
        self.inbound = MqttClient(
            mqtt,
            SessionConfig(
                client_id=client_id,
                topic_filters=filters,
                qos=1,
                receive_maximum=rules.receive_maximum,
            ),
            self._on_message,
            self._on_inbound_state,
        )
        # Commands and events leave on a second session: on the first one, the PUBACKs they wait
        # for would queue behind every unread reading (one TCP stream), so under load a command
        # would hold its window slot for the whole backlog.
        self.outbound = MqttClient(
            mqtt,
            SessionConfig(client_id=f"{client_id}-out"[:64], topic_filters=(), qos=1, receive_maximum=100),
            lambda _topic, _payload, _token: None,
            self._on_outbound_state,
        )
        self._seen: dict[tuple[str, str], int] = {}
        self._cached: bytes | None = None
        # Readings handled, in arrival order, waiting for their PUBACK to the broker; the second item
        # counts the publishes the reading caused that the broker has not acked yet (None: none).
        self._acks: deque[tuple[int, list[int] | None]] = deque()
        self._ack_flush_due = False
        self._hold: list[int] | None = None
        # While firings are acted on, their messages are collected here (then stored with the
        # firing state in one transaction, then sent); outbox rows whose PUBACK came wait in
        # _outbox_acked to be deleted by the store writer.
        self._collecting: list[tuple[str, bytes, bytes, Callable[[int], None] | None]] | None = None
        self._outbox_acked: list[int] = []
        self._handling = False
        self._connected_once = False
        self._inbound_down_logged = False
        self._outbound_down_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._stop: asyncio.Event | None = None
        self._reload_wanted: asyncio.Event | None = None
        self._sessions: list[asyncio.Task[None]] = []
        self._leases: asyncio.Task[None] | None = None
        # SQLite writes that need not hold up a reading (last-seen flush, rules cache) run here,
        # one at a time and in order.
        self._store_writer = ThreadPoolExecutor(1, thread_name_prefix="rules-store")

    # --- MQTT (all on the loop) --------------------------------------------------------
    def _on_inbound_state(self, up: bool, why: str) -> None:
        self.metrics.connected.set(1 if up and self.outbound.connected else 0)
        if up:
            self.subscribed.set()
            if self._inbound_down_logged or not self._connected_once:
                self.lifecycle.recovered(
                    f"connected to the broker {self.settings.mqtt.host}:{self.settings.mqtt.port}"
                )
            self._connected_once = True
            self._inbound_down_logged = False
            self._want_reload()  # changes published while we were away are not queued for us
            return
        self.subscribed.clear()
        self._acks.clear()  # messages of the lost connection: the broker redelivers them
        if self._stop is not None and self._stop.is_set():
            return
        if not self._inbound_down_logged:
            self._inbound_down_logged = True
            self.lifecycle.degraded(f"no broker session ({why or 'disconnected'}); reconnecting")

    def _on_outbound_state(self, up: bool, why: str) -> None:
        self.metrics.connected.set(1 if up and self.inbound.connected else 0)
        if up:
            if self._outbound_down_logged:
                self._outbound_down_logged = False
                self.lifecycle.recovered("publishing session")
        elif not self._outbound_down_logged and self._stop is not None and not self._stop.is_set():
            self._outbound_down_logged = True
            self.lifecycle.degraded(f"publishing session down ({why or 'disconnected'}); reconnecting")

    def _on_message(self, topic: str, payload: bytes, token: int) -> None:
        self._hold = None
        self._handling = True
        try:
            self._handle(topic, payload)
        except Exception:
            # One bad message (or a bug) must cost that message, not the engine.
            self.metrics.skipped.labels("error").inc()
            log.exception("error handling a message on %s", topic)
        finally:
            self._handling = False
        # Acked once handled (firing state stored) and once the broker acked every command and
        # event it caused: a crash before that redelivers the reading rather than losing a
        # command. One write per socket read: the flush runs after the whole read is handled.
        self._acks.append((token, self._hold))
        if not self._ack_flush_due and self._loop is not None:
            self._ack_flush_due = True
            self._loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_flush_due = False
        acks = self._acks
        ready = []
        # In order (MQTT 4.6): a reading whose commands are not acked yet holds back later ones.
        while acks and (acks[0][1] is None or acks[0][1][0] == 0):
            ready.append(acks.popleft()[0])
        if ready:
            self.inbound.ack(ready)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        properties: bytes = b"",
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        """Publish on the outbound session; while a reading is handled, its ack waits for this one's.

        While firings are acted on, the message is only collected: :meth:`_act` stores it in the
        outbox with the firing state, then sends it.
        """
        if self._collecting is not None:
            self._collecting.append((topic, payload, properties, on_ack))
            return
        if not self._handling:
            self.outbound.publish(topic, payload, properties=properties, on_ack=on_ack)
            return
        hold = self._hold
        if hold is None:
            hold = self._hold = [0]
        hold[0] += 1

        def acked(reason: int) -> None:
            hold[0] -= 1
            if on_ack is not None:
                on_ack(reason)
            if hold[0] == 0:
                self._flush_acks()

        self.outbound.publish(topic, payload, properties=properties, on_ack=acked)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == topics.RULES_CHANGED:
            self._want_reload()
            return
        if topic.startswith(topics.PRESENCE_ROOT + "/"):
            self._on_presence(topic, payload)
            return
        try:
            parsed = topics.parse_device_topic(topic)
        except TopicError:
            self.metrics.skipped.labels("bad_topic").inc()
            return
        if parsed.channel is Channel.TELEMETRY:
            partitions = self.partitions
            if partitions is not None:
                # Every reading is kept raw for a takeover (its own too: a partition lost while its
                # write was pending is replayed from here when taken back); another engine's
                # device's is acked at once, not parsed.
                partitions.buffer_reading(parsed.device_type, parsed.device_id, payload)
                if not partitions.owns(parsed.device_type, parsed.device_id):
                    return
            self.on_telemetry(parsed.device_type, parsed.device_id, payload)
        # A device's own status (a subscription of engines before 2026-12) is only its hint: ignored.

    def _on_presence(self, topic: str, payload: bytes) -> None:
        try:
            device_type, device_id = topics.parse_presence_topic(topic)
        except TopicError:
            self.metrics.skipped.labels("bad_topic").inc()
            return
        event = presence_event.parse(payload)
        if event is None:  # a deleted device's cleared entry, or not ours
            return
        # The registry's time of the transition: a retained replay after an engine restart keeps
        # the real "offline since" for `presence … for` conditions.
        if self.partitions is not None and not self.partitions.owns(device_type, device_id):
            self.partitions.remember_presence(device_type, device_id, event.online, event.at_ms)
            return
        self.on_status(device_type, device_id, event.online, since_ms=event.at_ms)

    # --- events in -----------------------------------------------------------------------
    def on_telemetry(self, device_type: str, device_id: str, payload: bytes) -> None:
        started = time.perf_counter()
        admission = self._admissions.get(device_type)
        if admission is None:
            self.metrics.skipped.labels("unknown_type").inc()
            return
        arrival = wire.now_ms()
        try:
            readings = admission.admit(payload, arrival)
        except Rejected as rejected:  # the ingest dead-letters it: counted, never acted on
            self.metrics.skipped.labels(rejected.reason).inc()
            return
        # Sorted by time only: two readings of one ts must not be compared (models have no order).
        timed = sorted([((r.ts if r.ts is not None else arrival), r) for r in readings], key=_by_time)
        self.directory.seen(device_type, device_id)
        tags = self.directory.tags(device_id)
        firings: list[Firing] = []
        ignored_before = self.evaluator.ignored_readings
        for ts, reading in timed:
            firings += self.evaluator.on_reading(device_type, device_id, ts, reading.measurements(), tags)
        stale = self.evaluator.ignored_readings - ignored_before
        self._seen[(device_type, device_id)] = timed[-1][0]
        if firings:
            self._act(firings)
        self.metrics.readings.inc(len(timed) - stale)
        if stale:
            self.metrics.skipped.labels("stale").inc(stale)
        self.metrics.eval_seconds.observe(time.perf_counter() - started)

    def on_status(self, device_type: str, device_id: str, online: bool, since_ms: int | None = None) -> None:
        """A presence transition (from the registry's ``iotfleet/presence/…``) that happened at ``since_ms``."""
        if device_type not in DEVICE_TYPES:
            return
        self.directory.seen(device_type, device_id)
        firings = self.evaluator.on_presence(
            device_type, device_id, online, wire.now_ms(), self.directory.tags(device_id), since=since_ms
        )
        if firings:
            self._act(firings)

    def tick(self, now: int | None = None) -> None:
        """Clock-driven conditions (absence, presence for), then flush last-seen times (off the loop)."""
        firings = self.evaluator.on_tick(now if now is not None else wire.now_ms())
        if firings:
            self._act(firings)
        seen, self._seen = self._seen, {}
        self.metrics.devices.set(len(self.evaluator.devices))
        if self.partitions is not None:
            self.partitions.tick()
            if seen:
                self.partitions.save_seen(seen)
        elif seen:
            self._store_writer.submit(self.store.save_last_seen, [(t, d, ts) for (t, d), ts in seen.items()])

    # --- actions out -----------------------------------------------------------------------
    def _act(self, firings: Sequence[Firing]) -> None:
        """Store the firings' state with their commands and alert events, then publish those.

        A transactional outbox: the firing state and the messages it sends are written in one
        SQLite transaction (inline, no fsync: the reading is acked right after, so its firing
        must be on disk by then), then sent; each outbox row is deleted once the broker acked
        it, and rows left by a crash are sent again at start. So a kill -9 at any point neither
        loses a firing's command or alert event nor fires it a second time (a message may be
        sent twice, with the same command id / event, if the crash fell between its PUBACK and
        the row's deletion).
        """
        if self.partitions is not None:
            self.partitions.persist(firings, self._collected)
            return
        batch = self._collected(firings)
        seen: dict[tuple[str, str], int] = {}
        for firing in firings:
            device = self.evaluator.devices.get((firing.device_type, firing.device_id))
            if device is not None and device.last_ts is not None:
                seen[(firing.device_type, firing.device_id)] = device.last_ts
        ids = self.store.save(
            self.evaluator.take_dirty(),
            [(t, p, props) for t, p, props, _ in batch],
            [(t, d, ts) for (t, d), ts in seen.items()],
        )
        for row_id, (topic, payload, properties, on_ack) in zip(ids, batch, strict=True):
            self._publish(
                topic, payload, properties=properties, on_ack=self._forget_when_acked(row_id, on_ack)
            )

    act = _act

    def _collected(
        self, firings: Sequence[Firing]
    ) -> list[tuple[str, bytes, bytes, Callable[[int], None] | None]]:
        """The messages the firings send, collected (not sent)."""
        self._collecting = []
        try:
            self._collect(firings)
        finally:
            batch, self._collecting = self._collecting, None
            self._firing = None
        return batch

    def hold_current_reading(self) -> list[int] | None:
        """While a reading is handled: one more thing its ack waits for (see :meth:`release_hold`)."""
        if not self._handling:
            return None
        hold = self._hold
        if hold is None:
            hold = self._hold = [0]
        hold[0] += 1
        return hold

    def release_hold(self, hold: list[int] | None) -> None:
        if hold is not None:
            hold[0] -= 1
            if hold[0] == 0:
                self._flush_acks()

    def publish_held(
        self,
        hold: list[int] | None,
        topic: str,
        payload: bytes,
        properties: bytes,
        on_ack: Callable[[int], None] | None,
    ) -> None:
        """Publish now; the reading that ``hold`` belongs to is acked only after this PUBACK."""
        if hold is None:
            self.outbound.publish(topic, payload, properties=properties, on_ack=on_ack)
            return
        hold[0] += 1

        def acked(reason: int) -> None:
            if on_ack is not None:
                on_ack(reason)
            self.release_hold(hold)

        self.outbound.publish(topic, payload, properties=properties, on_ack=acked)

    def _firing_id(self, kind: str) -> str | None:
        """Partitioned engines: an id from the transition, so whichever engine sends it (again) uses
        the same one; None: a random id, as a single engine does."""
        firing = self._firing
        if self.partitions is None or firing is None:
            return None
        self._firing_seq += 1
        name = f"{firing.rule_id}/{firing.device_id}/{firing.kind}/{firing.at_ms}/{kind}/{self._firing_seq}"
        return str(uuid.uuid5(FIRING_ID_NAMESPACE, name))

    def _forget_when_acked(self, row_id: int, on_ack: Callable[[int], None] | None) -> Callable[[int], None]:
        def acked(reason: int) -> None:
            # Deleted within milliseconds, off the loop: the PUBACKs of one read burst share one
            # DELETE, and a crash re-sends only what was acked in that instant.
            if not self._outbox_acked and self._loop is not None:
                self._loop.call_soon(self._forget_acked_outbox)
            self._outbox_acked.append(row_id)
            if on_ack is not None:
                on_ack(reason)

        return acked

    def _send_outbox_left(self) -> None:
        """Send again what a crash left in the outbox (before any new reading is evaluated)."""
        left = self.store.load_outbox()
        if left:
            log.info("sending %d command(s)/event(s) left in the outbox by the last run", len(left))
        for row_id, (topic, payload, properties) in left:
            self._publish(topic, payload, properties=properties, on_ack=self._forget_when_acked(row_id, None))

    forget_when_acked = _forget_when_acked

    def _forget_acked_outbox(self) -> None:
        acked, self._outbox_acked = self._outbox_acked, []
        if acked and self.partitions is not None:
            self.partitions.forget_outbox(acked)
        elif acked:
            self._store_writer.submit(self.store.forget_outbox, acked)

    def _collect(self, firings: Iterable[Firing]) -> None:
        for firing in firings:
            self.metrics.firings.labels(firing.kind).inc()
            self._firing, self._firing_seq = firing, 0
            program = self.evaluator.programs.get(firing.rule_id)
            rule = program.rule if program is not None else None
            log.info(
                "rule %s %s device %s at %d%s",
                firing.rule_name,
                "fired for" if firing.kind == "fire" else "cleared for",
                firing.device_id,
                firing.at_ms,
                f" ({firing.reason})" if firing.reason else "",
            )
            if firing.kind == "fire" and rule is not None:
                for action in rule.then:
                    if isinstance(action, CommandAction):
                        self._send_all(rule, action, firing.device_id)
                    elif isinstance(action, SetDesiredAction):
                        for entry in self.directory.resolve(
                            action.target, rule.scope.device_type, firing.device_id
                        ):
                            self.set_desired(rule, action, entry)
                alert = rule.alert
                if alert is not None:
                    self._publish(
                        topics.ALERT_EVENTS,
                        wire.alert_raised_event(
                            rule_id=rule.id,
                            rule_name=rule.name,
                            device_type=firing.device_type,
                            device_id=firing.device_id,
                            severity=alert.severity,
                            message=alert.message,
                            at=firing.at_ms,
                            values=dict(firing.values),
                            notify=alert.notify,
                            event_id=self._firing_id("alert"),
                        ),
                    )
                    self.metrics.alerts.labels("raised").inc()
            elif firing.kind == "clear":
                if rule is None or rule.alert is not None:
                    self._publish(
                        topics.ALERT_EVENTS,
                        wire.alert_cleared_event(
                            rule_id=firing.rule_id,
                            device_id=firing.device_id,
                            at=firing.at_ms,
                            reason=firing.reason or "cleared",
                        ),
                    )
                    self.metrics.alerts.labels("cleared").inc()
                if rule is not None:
                    for command in rule.on_clear:
                        self._send_all(rule, command, firing.device_id)

    def _send_all(self, rule: StoredRule, action: CommandAction, source_device: str | None) -> None:
        for entry in self.directory.resolve(action.target, rule.scope.device_type, source_device):
            self.send_command(rule, action, entry)

    def send_command(self, rule: StoredRule, action: CommandAction, entry: DeviceEntry) -> None:
        catalogue = DEVICE_TYPES.get(entry.device_type)
        if catalogue is None or action.command not in catalogue.commands:
            self.metrics.commands.labels("not_applicable").inc()
            return
        try:
            catalogue.validate_command(action.command, action.args)
        except ValidationError:
            self.metrics.commands.labels("invalid").inc()
            return
        ttl_s = max(1, duration_ms(action.ttl) // 1000) if action.ttl else self.settings.rules.command_ttl_s
        firing_id = self._firing_id(f"command:{entry.device_id}")
        command = wire.OutgoingCommand(
            device_type=entry.device_type,
            device_id=entry.device_id,
            name=action.command,
            args=dict(action.args),
            ttl_s=ttl_s,
            source=f"rule:{rule.name}",
            rule_id=rule.id,
        )
        if firing_id is not None:  # frozen: a copy with the transition's id
            command = dataclasses.replace(command, id=firing_id)
        # The registry learns of the command before the device can answer it (one session: in order).
        self._publish(topics.COMMAND_EVENTS, command.created_event())
        self._publish(
            command.topic,
            command.payload(),
            properties=command.property_block(),
            on_ack=lambda reason: self._command_acked(command.id, reason),
        )
        self.metrics.commands.labels("published").inc()

    def set_desired(self, rule: StoredRule, action: SetDesiredAction, entry: DeviceEntry) -> None:
        """Ask the registry to merge the action's patch into the device's desired state.

        The registry owns the shadow (versions, delta, the retained message to the device), so the
        engine publishes a request on ``iotfleet/state/desired`` (QoS 1) that the registry consumes
        on its persistent session: a registry restart loses none, and while a reading is handled its
        ack waits for this PUBACK (an engine crash re-fires rather than forgets). A request applied
        twice changes nothing the second time (merge patch; same id skipped).
        """
        catalogue = DEVICE_TYPES.get(entry.device_type)
        if catalogue is None or catalogue.state is None:
            self.metrics.commands.labels("not_applicable").inc()
            return
        try:
            catalogue.state.model_validate(action.set_desired)
        except ValidationError:
            self.metrics.commands.labels("invalid").inc()
            return
        self._publish(
            topics.DESIRED_STATE_REQUESTS,
            wire.desired_state_request(
                device_type=entry.device_type,
                device_id=entry.device_id,
                patch=dict(action.set_desired),
                source=f"rule:{rule.name}",
                rule_id=rule.id,
            ),
        )
        self.metrics.commands.labels("set_desired").inc()

    def _command_acked(self, command_id: str, reason: int) -> None:
        if reason >= 0x80:
            self.metrics.commands.labels("refused").inc()
            detail = f"broker refused the command (reason 0x{reason:02x})"
            self._publish(topics.COMMAND_EVENTS, wire.failed_event(command_id, detail))
        else:
            self._publish(topics.COMMAND_EVENTS, wire.sent_event(command_id))

    # --- rules and schedules ------------------------------------------------------------------
    def _want_reload(self) -> None:
        if self._reload_wanted is not None:
            self._reload_wanted.set()

    async def reload(self) -> bool:
        """Fetch rules and devices (in a worker thread) and apply them; False (the old set kept) if
        the source failed."""
        try:
            rules, devices = await asyncio.to_thread(self._fetch)
        except SourceError as exc:
            self.metrics.reloads.labels("failed").inc()
            if self.last_reload_error is None:
                self.lifecycle.degraded(f"cannot load rules: {exc}; retrying")
            self.last_reload_error = str(exc)
            return False
        self.apply(rules, devices)
        self._cache(rules, devices)
        self._connect()
        self.metrics.reloads.labels("ok").inc()
        if self.last_reload_error is not None:
            self.lifecycle.recovered("rules source reachable again")
        self.last_reload_error = None
        return True

    def _fetch(self) -> tuple[list[StoredRule], list[DeviceEntry] | None]:
        return self.source.fetch_rules(), self.source.fetch_devices()

    def _cache(self, rules: list[StoredRule], devices: list[DeviceEntry] | None) -> None:
        body = orjson.dumps(
            {
                "rules": [{**rule_definition(r), "id": r.id, "version": r.version} for r in rules],
                "devices": None
                if devices is None
                else [{"type": d.device_type, "id": d.device_id, "tags": dict(d.tags)} for d in devices],
            }
        )
        if body != self._cached:
            self._store_writer.submit(self.store.save_rules, body)
            self._cached = body

    def _load_cache(self) -> None:
        body = self.store.load_rules()
        if body is None:
            return
        self._cached = body
        data = orjson.loads(body)
        devices = data.get("devices")
        self.apply(
            parse_rules(data.get("rules", [])),
            None
            if devices is None
            else [DeviceEntry(d["type"], d["id"], d.get("tags") or {}) for d in devices],
        )
        log.info("rules restored from the state store until the source answers")

    def apply(self, rules: list[StoredRule], devices: list[DeviceEntry] | None) -> None:
        conditions = [r for r in rules if r.when is not None]
        schedules = {r.id: r for r in rules if r.schedule is not None and r.enabled}
        if devices is not None:
            known = {d.device_id for d in devices}
            heard = [e for e in self.directory.devices.values() if e.device_id not in known]
            self.directory.replace([*devices, *heard])
        if self.partitions is not None:
            self.partitions.warn_long_windows(conditions)
        cleared = self.evaluator.set_rules(conditions, now=wire.now_ms())
        if cleared:
            self._act(cleared)
        changed = self._apply_schedules(schedules)
        first = not self.rules_loaded
        self.rules_loaded = True
        enabled = sum(1 for r in conditions if r.enabled)
        self.metrics.rules.labels("condition").set(enabled)
        self.metrics.rules.labels("schedule").set(len(schedules))
        if first or changed or cleared:
            log.info(
                "rules loaded: %d condition, %d schedule, %d devices known",
                enabled,
                len(schedules),
                len(self.directory.devices),
            )

    def _apply_schedules(self, wanted: dict[str, StoredRule]) -> bool:
        changed = False
        for rule_id, old in list(self.schedules.items()):
            new = wanted.get(rule_id)
            if new is None or new != old:
                self.scheduler.remove_job(f"schedule:{rule_id}")
                del self.schedules[rule_id]
                changed = True
        for rule_id, rule in wanted.items():
            if rule_id in self.schedules:
                continue
            assert rule.schedule is not None
            trigger = CronTrigger.from_crontab(rule.schedule.cron, timezone=ZoneInfo(rule.schedule.tz))
            self.scheduler.add_job(
                self._scheduled,
                trigger,
                args=[rule_id],
                id=f"schedule:{rule_id}",
                coalesce=True,
                misfire_grace_time=30,
                max_instances=1,
            )
            self.schedules[rule_id] = rule
            changed = True
        return changed

    async def _scheduled(self, rule_id: str) -> None:
        # A coroutine job: APScheduler's asyncio executor runs it on the loop (a plain function
        # would go to a thread pool, off the loop that owns the evaluator and the sessions).
        self.run_schedule(rule_id)

    async def _ticked(self) -> None:
        self.tick()

    def run_schedule(self, rule_id: str) -> None:
        rule = self.schedules.get(rule_id)
        if rule is None:
            return
        sent = 0
        for action in rule.commands:
            if action.target is not None:
                targets = self.directory.resolve(action.target, rule.scope.device_type, None)
            else:
                scope = rule.scope
                targets = self.directory.of_type(scope.device_type, scope.device_ids, scope.tags)
            for entry in targets:
                if self.partitions is not None and not self.partitions.owns(
                    entry.device_type, entry.device_id
                ):
                    continue  # each engine runs the schedule for its own partitions' devices
                self.send_command(rule, action, entry)
                sent += 1
        for change in rule.desired_changes:
            if change.target is not None:
                targets = self.directory.resolve(change.target, rule.scope.device_type, None)
            else:
                scope = rule.scope
                targets = self.directory.of_type(scope.device_type, scope.device_ids, scope.tags)
            for entry in targets:
                if self.partitions is not None and not self.partitions.owns(
                    entry.device_type, entry.device_id
                ):
                    continue
                self.set_desired(rule, change, entry)
                sent += 1
        log.info("schedule %s ran: %d commands and desired-state changes", rule.name, sent)

    async def _reload_loop(self, wanted: asyncio.Event, stop: asyncio.Event) -> None:
        poll = self.settings.rules.reload_poll_s
        while not stop.is_set():
            timeout = poll if self.rules_loaded and not self.last_reload_error else 2.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wanted.wait(), timeout)
            if stop.is_set():
                return
            wanted.clear()
            try:
                await self.reload()
            except Exception:  # a bug in one reload must not end reloading forever
                log.exception("rule reload failed")

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on its own thread; returns once its loop is up (rules may still load)."""
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name="rules-engine", daemon=True
        )
        self._thread.start()
        if not self._running.wait(STOP_TIMEOUT_S) and self._thread.is_alive():
            raise EngineNotRunningError("the engine's loop did not start")

    def stop(self) -> None:
        """Stop and wait: in-flight commands get their PUBACK (bounded), state is flushed."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._running.is_set():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("the engine did not stop within %.0f s", STOP_TIMEOUT_S)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's loop and return its result (for embedding and tests:
        everything that touches the evaluator and the sessions runs there)."""
        loop = self._loop
        if loop is None or not self._running.is_set():
            raise EngineNotRunningError("the engine is not running")

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(STOP_TIMEOUT_S)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        wanted = self._reload_wanted = asyncio.Event()
        try:
            # Last-seen times past the admission window cannot come from an admitted reading (a
            # store written before admission existed): forgotten, or that device stays blind.
            if self.partitions is None:
                self.store.forget_last_seen_after(wire.now_ms() + self.limits.max_future_ms)
                saved, last_seen = self.store.load()
                self.evaluator.restore(saved, last_seen)
                self._send_outbox_left()  # queued on the outbound session, written once it connects
            else:
                # Firing state is per partition in the shared store, loaded when a lease is taken.
                self._leases = asyncio.create_task(self.partitions.run(stop))
            self._load_cache()
            self.scheduler.start()
            self.scheduler.add_job(
                self._ticked,
                "interval",
                seconds=self.settings.rules.tick_s,
                id="tick",
                coalesce=True,
                max_instances=1,
            )
            if self.rules_loaded:
                self._connect()
            # else: the first successful reload connects. Until then, readings wait in the broker
            # (persistent session) rather than being evaluated against no rules at all.
            wanted.set()
            reloading = asyncio.create_task(self._reload_loop(wanted, stop))
            self._running.set()
            await stop.wait()
            await self._shutdown(reloading)
        finally:
            self._running.clear()
            self._store_writer.shutdown(wait=True)
            self.source.close()
            self.store.close()

    def _connect(self) -> None:
        if self._sessions or self._stop is None:
            return
        stop = self._stop
        self._sessions = [
            asyncio.create_task(self.outbound.run(stop)),
            asyncio.create_task(self.inbound.run(stop)),
        ]

    async def _shutdown(self, reloading: asyncio.Task[None]) -> None:
        self.scheduler.shutdown(wait=False)
        self.inbound.pause_reading()  # no new readings: what was handled gets its commands out
        self.tick()  # flush last-seen times
        if self.partitions is not None:
            await self.partitions.drain_writes(DRAIN_COMMANDS_S)
        # Let in-flight commands and events get their PUBACK (and the registry its "sent" event),
        # then ack the readings they came from.
        if self.outbound.connected and not await self.outbound.flush(DRAIN_COMMANDS_S):
            log.warning("%d commands/events not acked by the broker at stop", self.outbound.unacked)
        self._flush_acks()
        self._forget_acked_outbox()  # what is left is sent again at the next start
        if self.partitions is not None:
            if self._leases is not None:
                self._leases.cancel()
                await asyncio.gather(self._leases, return_exceptions=True)
            await self.partitions.shutdown()  # leases released: a peer takes them at once
        await self.inbound.disconnect()  # the session (and anything unacked) stays for the next start
        await self.outbound.disconnect()
        for task in (*self._sessions, reloading):
            task.cancel()
        await asyncio.gather(*self._sessions, reloading, return_exceptions=True)

    def health(self) -> dict[str, Any]:
        connected = self.inbound.connected and self.outbound.connected
        ok = connected and self.subscribed.is_set() and self.rules_loaded and self.last_reload_error is None
        extra: dict[str, Any] = {}
        if self.partitions is not None:
            ok = ok and self.partitions.ready
            extra["partitions"] = self.partitions.health()
        return {
            **extra,
            "status": "ok" if ok else "degraded",
            "mqtt_connected": connected,
            "subscribed": self.subscribed.is_set(),
            "rules_loaded": self.rules_loaded,
            "condition_rules": len(self.evaluator.programs),
            "schedule_rules": len(self.schedules),
            "devices": len(self.evaluator.devices),
            "last_reload_error": self.last_reload_error,
        }
