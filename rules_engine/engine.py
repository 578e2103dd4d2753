"""The rules engine service: MQTT session in, evaluator, commands and alert events out.

Threads: paho's network loop runs the evaluation inline in ``on_message``
(readings are small and evaluation is microseconds; no queue hop keeps the
reading → command latency low), APScheduler runs the clock tick (absence,
presence ``for``) and the cron schedules, and a reload thread fetches rules and
devices. One lock serialises every touch of the evaluator, so a burst of
readings for the same device can never fire twice.

The MQTT session is persistent (fixed client id, clean_start=False, session
expiry), so readings published while the engine restarts are queued by the
broker and evaluated when it is back; the firing state is restored from the
state store, so nothing fires twice and active rules still clear.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import paho.mqtt.client as mqtt
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from iotfleet import topics
from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import TopicError
from iotfleet.lifecycle import ServiceLifecycle
from iotfleet.settings import Settings
from iotfleet.topics import Channel
from rules_engine import wire
from rules_engine.evaluator import Evaluator, Firing
from rules_engine.models import CommandAction, StoredRule, duration_ms, rule_definition
from rules_engine.sources import DeviceEntry, Directory, RuleSource, SourceError, parse_rules
from rules_engine.store import StateStore

log = logging.getLogger("rules-engine")


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle: paho leaves it on, and a command written right after a PUBACK would wait
    for the broker's delayed TCP ACK (up to 40 ms) — the latency this service exists to keep low."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter("iotfleet_rules_readings_total", "Readings evaluated", registry=registry)
        self.skipped = Counter(
            "iotfleet_rules_readings_skipped_total",
            "Telemetry not evaluated (invalid, unknown type, stale)",
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
        self.metrics = EngineMetrics(registry or CollectorRegistry())
        self.lock = threading.RLock()
        self.evaluator = Evaluator()
        self.directory = Directory()
        self.schedules: dict[str, StoredRule] = {}
        self.rules_loaded = False
        self.last_reload_error: str | None = None
        self._seen: dict[tuple[str, str], int] = {}
        self._reload_wanted = threading.Event()
        self._stopping = threading.Event()
        self._mid_lock = threading.Lock()
        self._pending_sent: dict[int, str] = {}
        self._early_acks: OrderedDict[int, ReasonCode] = OrderedDict()
        self._was_connected = False
        self._cached: bytes | None = None
        self._connect_lock = threading.Lock()
        self._connect_started = False
        self.subscribed = threading.Event()
        self._reload_thread = threading.Thread(target=self._reload_loop, name="rules-reload", daemon=True)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.client = self._make_client(self.settings.rules.client_id)
        # Commands and events go out on a second connection: on the first one, the PUBACKs they wait
        # for would queue behind every unread reading (one TCP stream), so under load a command
        # would wait for the whole backlog before its in-flight slot frees.
        self.out = self._make_client(f"{self.settings.rules.client_id}-out")
        self.out.on_connect = self._on_out_connect
        self.out.on_disconnect = None
        self.out.on_message = None
        self.out.on_subscribe = None

    # --- MQTT --------------------------------------------------------------------
    def _make_client(self, client_id: str) -> mqtt.Client:
        mqtt_settings = self.settings.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if mqtt_settings.username:
            password = mqtt_settings.password.get_secret_value() if mqtt_settings.password else None
            client.username_pw_set(mqtt_settings.username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(0)  # never drop a command while reconnecting
        # paho rescans its in-flight messages on every PUBACK (O(in-flight)): a modest window keeps an
        # alert storm linear; against a local broker, 100 in flight is far beyond what one engine sends.
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = lambda *_args: self.subscribed.set()
        client.on_socket_open = _no_delay
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.mqtt.session_expiry_s
        props.ReceiveMaximum = self.settings.rules.receive_maximum
        return props

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.lifecycle.degraded(f"broker refused the connection: {reason}")
            return
        qos1 = SubscribeOptions(qos=1)
        client.subscribe(
            [
                (topics.device_filter(Channel.TELEMETRY), qos1),
                (topics.device_filter(Channel.STATUS), qos1),
                (topics.RULES_CHANGED, qos1),
            ]
        )
        self.metrics.connected.set(1)
        self._was_connected = True
        self.lifecycle.recovered(
            f"connected to the broker {self.settings.mqtt.host}:{self.settings.mqtt.port}"
        )
        self._reload_wanted.set()  # changes published while we were away are not queued for us

    def _on_out_connect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.lifecycle.degraded(f"broker refused the publishing connection: {reason}")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self.metrics.connected.set(0)
        self.subscribed.clear()
        if not self._stopping.is_set() and self._was_connected:
            self._was_connected = False
            self.lifecycle.degraded(f"disconnected from the broker ({reason}); reconnecting")

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception:
            # paho re-raises callback errors and its network thread dies with them: one bad
            # message (or a bug) must cost that message, not the engine.
            self.metrics.skipped.labels("error").inc()
            log.exception("error handling a message on %s", msg.topic)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.RULES_CHANGED:
            self._reload_wanted.set()
            return
        try:
            parsed = topics.parse_device_topic(msg.topic)
        except TopicError:
            self.metrics.skipped.labels("bad_topic").inc()
            return
        if parsed.channel is Channel.TELEMETRY:
            self.on_telemetry(parsed.device_type, parsed.device_id, bytes(msg.payload))
        elif parsed.channel is Channel.STATUS and msg.payload in (
            topics.STATUS_ONLINE,
            topics.STATUS_OFFLINE,
        ):
            self.on_status(parsed.device_type, parsed.device_id, msg.payload == topics.STATUS_ONLINE)

    def _on_publish(
        self, client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        with self._mid_lock:
            command_id = self._pending_sent.pop(mid, None)
            if command_id is None:
                # The PUBACK beat send_command's bookkeeping (it publishes without holding the
                # lock: paho calls this holding its own lock, so the other order would deadlock).
                # Events' PUBACKs land here too: keep only the newest (far fewer than the 65,535
                # mids before one is reused), so a stale entry can never match a later command.
                self._early_acks[mid] = reason
                if len(self._early_acks) > 1000:
                    self._early_acks.popitem(last=False)
                return
        self._command_acked(client, command_id, reason)

    def _command_acked(self, client: mqtt.Client, command_id: str, reason: ReasonCode) -> None:
        if reason.is_failure:
            self.metrics.commands.labels("refused").inc()
            detail = f"broker refused the command: {reason}"
            client.publish(topics.COMMAND_EVENTS, wire.failed_event(command_id, detail), qos=1)
        else:
            client.publish(topics.COMMAND_EVENTS, wire.sent_event(command_id), qos=1)

    # --- events in ---------------------------------------------------------------
    def on_telemetry(self, device_type: str, device_id: str, payload: bytes) -> None:
        started = time.perf_counter()
        catalogue = DEVICE_TYPES.get(device_type)
        if catalogue is None:
            self.metrics.skipped.labels("unknown_type").inc()
            return
        try:
            readings = catalogue.parse_payload(payload)
        except ValueError:  # pydantic ValidationError is a ValueError; ingest dead-letters these
            self.metrics.skipped.labels("invalid").inc()
            return
        arrival = wire.now_ms()
        timed = sorted(((r.ts if r.ts is not None else arrival), r) for r in readings)
        with self.lock:
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

    def on_status(self, device_type: str, device_id: str, online: bool) -> None:
        if device_type not in DEVICE_TYPES:
            return
        with self.lock:
            self.directory.seen(device_type, device_id)
            firings = self.evaluator.on_presence(
                device_type, device_id, online, wire.now_ms(), self.directory.tags(device_id)
            )
            if firings:
                self._act(firings)

    def tick(self, now: int | None = None) -> None:
        """Clock-driven conditions (absence, presence for), then flush last-seen times."""
        with self.lock:
            firings = self.evaluator.on_tick(now if now is not None else wire.now_ms())
            if firings:
                self._act(firings)
            seen, self._seen = self._seen, {}
            self.metrics.devices.set(len(self.evaluator.devices))
        self.store.save_last_seen((t, d, ts) for (t, d), ts in seen.items())

    # --- actions out ---------------------------------------------------------------
    def _act(self, firings: Iterable[Firing]) -> None:
        """Publish the firings' commands and alert events, then persist the firing state (under the lock).

        Publish first, persist second: a crash in between re-fires after the
        restart (at least once) rather than forgetting a firing.
        """
        for firing in firings:
            self.metrics.firings.labels(firing.kind).inc()
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
                alert = rule.alert
                if alert is not None:
                    self._publish_event(
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
                        ),
                    )
                    self.metrics.alerts.labels("raised").inc()
            elif firing.kind == "clear":
                if rule is None or rule.alert is not None:
                    self._publish_event(
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
        self.store.save(self.evaluator.take_dirty())

    def _publish_event(self, topic: str, payload: bytes) -> None:
        self.out.publish(topic, payload, qos=1)

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
        command = wire.OutgoingCommand(
            device_type=entry.device_type,
            device_id=entry.device_id,
            name=action.command,
            args=dict(action.args),
            ttl_s=ttl_s,
            source=f"rule:{rule.name}",
            rule_id=rule.id,
        )
        # The registry learns of the command before the device can answer it.
        self.out.publish(topics.COMMAND_EVENTS, command.created_event(), qos=1)
        info = self.out.publish(command.topic, command.payload(), qos=1, properties=command.properties())
        with self._mid_lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._pending_sent[info.mid] = command.id
        if early is not None:
            self._command_acked(self.out, command.id, early)
        self.metrics.commands.labels("published").inc()

    # --- rules and schedules ----------------------------------------------------------
    def reload(self) -> bool:
        """Fetch rules and devices and apply them; False (and the old set kept) if the source failed."""
        try:
            rules = self.source.fetch_rules()
            devices = self.source.fetch_devices()
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
            self.store.save_rules(body)
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
        with self.lock:
            if devices is not None:
                known = {d.device_id for d in devices}
                heard = [e for e in self.directory.devices.values() if e.device_id not in known]
                self.directory.replace([*devices, *heard])
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
                self.run_schedule,
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

    def run_schedule(self, rule_id: str) -> None:
        with self.lock:
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
                    self.send_command(rule, action, entry)
                    sent += 1
        log.info("schedule %s ran: %d commands", rule.name, sent)

    def _reload_loop(self) -> None:
        poll = self.settings.rules.reload_poll_s
        while not self._stopping.is_set():
            self._reload_wanted.wait(
                timeout=poll if self.rules_loaded and not self.last_reload_error else 2.0
            )
            if self._stopping.is_set():
                return
            self._reload_wanted.clear()
            try:
                self.reload()
            except Exception:  # a bug in one reload must not end reloading forever
                log.exception("rule reload failed")

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        saved, last_seen = self.store.load()
        self.evaluator.restore(saved, last_seen)
        self._load_cache()
        self.scheduler.start()
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.settings.rules.tick_s,
            id="tick",
            coalesce=True,
            max_instances=1,
        )
        self._reload_wanted.set()
        self._reload_thread.start()
        if self.rules_loaded:
            self._connect()
        # else: the first successful reload connects. Until then, readings wait in the broker
        # (persistent session) rather than being evaluated against no rules at all.

    def _connect(self) -> None:
        with self._connect_lock:
            if self._connect_started:
                return
            self._connect_started = True
        mqtt_settings = self.settings.mqtt
        self.out.connect_async(mqtt_settings.host, mqtt_settings.port, keepalive=mqtt_settings.keepalive_s)
        self.out.loop_start()
        self.client.connect_async(
            mqtt_settings.host,
            mqtt_settings.port,
            keepalive=mqtt_settings.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping.set()
        self._reload_wanted.set()
        self.scheduler.shutdown(wait=True)
        self.tick()  # flush last-seen times
        # Let in-flight commands get their PUBACK (and the registry its "sent" event), bounded.
        deadline = time.monotonic() + 2.0
        self.client.disconnect()
        self.client.loop_stop()
        while self._pending_sent and self.out.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.out.disconnect()
        self.out.loop_stop()
        self._reload_thread.join(timeout=10)
        self.source.close()
        self.store.close()

    def health(self) -> dict[str, Any]:
        connected = self.client.is_connected() and self.out.is_connected()
        ok = connected and self.subscribed.is_set() and self.rules_loaded and self.last_reload_error is None
        return {
            "status": "ok" if ok else "degraded",
            "mqtt_connected": connected,
            "subscribed": self.subscribed.is_set(),
            "rules_loaded": self.rules_loaded,
            "condition_rules": len(self.evaluator.programs),
            "schedule_rules": len(self.schedules),
            "devices": len(self.evaluator.devices),
            "last_reload_error": self.last_reload_error,
        }
