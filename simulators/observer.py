"""The platform-side observer: counts what the platform saw of the fleet, and sends test commands.

A device's own credentials cannot read dead letters or other devices' status,
so the observer uses a platform account over MQTT: on a stack from ``iotfleet
up`` the registry's service account from ``<state_dir>/secrets.json`` (it may
subscribe to ``devices/#`` and ``deadletter/#`` and publish commands), or
whatever ``--observer-user``/``IOTFLEET_MQTT__USERNAME`` names. It is one
connection, so the mature aiomqtt client is used here.

It records: dead letters of the fleet's devices (with their reasons), status
transitions (LWT ``offline`` included), acks, and the round trip of commands
(publish → ack with the same correlation id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotfleet import topics
from iotfleet.errors import TopicError
from iotfleet.topics import Channel

log = logging.getLogger(__name__)


@dataclass
class ObserverCredentials:
    host: str
    port: int
    username: str
    password: str


@dataclass
class ObserverStats:
    dead_letters: int = 0
    dead_letter_payloads: set[int] = field(default_factory=set)  # hashes: a resent/duplicated bad reading
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    dead_letter_fields: Counter[str] = field(default_factory=Counter)
    dead_letter_devices: Counter[str] = field(default_factory=Counter)
    dead_letter_samples: list[dict[str, Any]] = field(default_factory=list)
    status_online: int = 0
    status_offline: int = 0
    offline_devices: Counter[str] = field(default_factory=Counter)
    acks: int = 0
    acks_by_status: Counter[str] = field(default_factory=Counter)
    ack_correlations: dict[str, str] = field(default_factory=dict)  # command id → correlation data seen
    commands_sent: int = 0
    commands_refused: int = 0
    commands_seen: int = 0
    rtt_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dead_letters": self.dead_letters,
            "dead_letters_distinct": len(self.dead_letter_payloads),
            "dead_letter_reasons": dict(self.dead_letter_reasons.most_common(20)),
            "dead_letter_fields": dict(self.dead_letter_fields),
            "dead_letter_devices": len(self.dead_letter_devices),
            "status_online": self.status_online,
            "status_offline": self.status_offline,
            "devices_seen_offline": len(self.offline_devices),
            "acks": self.acks,
            "acks_by_status": dict(self.acks_by_status),
            "commands_sent": self.commands_sent,
            "commands_refused": self.commands_refused,
            "commands_seen": self.commands_seen,
        }


_NUMBERS = re.compile(r"-?\d+(?:[.:T-]\d+)*Z?")


def _reason_key(error: Any) -> tuple[str, str]:
    if not isinstance(error, dict):
        return "?", str(error)[:80]
    fld = str(error.get("field") or "payload")
    message = str(error.get("message") or "")
    # Values inside messages differ per reading (numbers, times): fold them so reasons group.
    reason = _NUMBERS.sub("N", message.split(",", maxsplit=1)[0])[:80]
    return fld, f"{fld}: {reason}"


class Observer:
    def __init__(self, creds: ObserverCredentials, devices: dict[str, str]) -> None:
        self.creds = creds
        self.devices = devices  # id → type, only these are counted
        self.stats = ObserverStats()
        self.ready = asyncio.Event()
        self.error: str | None = None
        self._client: aiomqtt.Client | None = None
        self._sent_at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run())
        waiter = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait(
            {waiter, self._task}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            raise RuntimeError(self.error or "observer did not connect in time")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def _run(self) -> None:
        c = self.creds
        try:
            async with aiomqtt.Client(
                c.host,
                c.port,
                username=c.username,
                password=c.password,
                protocol=aiomqtt.ProtocolVersion.V5,
                identifier=f"iotfleet-sim-observer-{uuid.uuid4().hex[:8]}",
                max_queued_incoming_messages=0,
            ) as client:
                self._client = client
                # paho leaves Nagle on: with delayed ACKs a command round trip then reads ~40 ms, not ~1 ms.
                sock = client._client.socket()
                if isinstance(sock, socket.socket):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for topic_filter in (
                    topics.deadletter_filter(),
                    topics.device_filter(Channel.STATUS),
                    topics.device_filter(Channel.ACKS),
                    topics.device_filter(Channel.COMMANDS),
                ):
                    result = await client.subscribe(topic_filter, qos=1)
                    codes = [getattr(r, "value", r) for r in (result or [])]
                    if any(isinstance(v, int) and v >= 0x80 for v in codes):
                        self.error = f"observer account {c.username!r} may not subscribe to {topic_filter}"
                        log.warning(self.error)
                self.ready.set()
                async for message in client.messages:
                    self._handle(str(message.topic), message.payload, bool(message.retain))
        except aiomqtt.MqttError as exc:
            self.error = f"observer MQTT connection failed: {exc}"
            log.warning(self.error)

    def _handle(self, topic: str, payload: Any, retained: bool) -> None:
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        stats = self.stats
        if topic.startswith(topics.DEADLETTER_ROOT + "/"):
            parts = topic.split("/")
            if len(parts) != 3 or parts[2] not in self.devices or retained:
                return
            stats.dead_letters += 1
            stats.dead_letter_devices[parts[2]] += 1
            try:
                letter = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return
            if isinstance(letter, dict):
                stats.dead_letter_payloads.add(hash((parts[2], str(letter.get("payload")))))
            for error in letter.get("errors", []) if isinstance(letter, dict) else []:
                fld, reason = _reason_key(error)
                stats.dead_letter_fields[fld] += 1
                stats.dead_letter_reasons[reason] += 1
            if len(stats.dead_letter_samples) < 20:
                stats.dead_letter_samples.append(letter)
            return
        try:
            parsed = topics.parse_device_topic(topic)
        except TopicError:
            return
        if parsed.device_id not in self.devices:
            return
        if parsed.channel == Channel.STATUS:
            if retained:
                return  # a leftover from before this run
            if raw == topics.STATUS_OFFLINE:
                stats.status_offline += 1
                stats.offline_devices[parsed.device_id] += 1
            elif raw == topics.STATUS_ONLINE:
                stats.status_online += 1
        elif parsed.channel == Channel.ACKS:
            now = time.monotonic()
            try:
                ack = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return
            stats.acks += 1
            stats.acks_by_status[str(ack.get("status"))] += 1
            command_id = str(ack.get("id"))
            sent = self._sent_at.pop(command_id, None)
            if sent is not None:
                stats.rtt_ms.append((now - sent) * 1000)
        elif parsed.channel == Channel.COMMANDS and not retained:
            # Commands from the rules engine or the registry: time their round trip too.
            stats.commands_seen += 1
            try:
                command = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return
            if isinstance(command, dict) and "id" in command:
                self._sent_at.setdefault(str(command["id"]), time.monotonic())
                if len(self._sent_at) > 100_000:  # unanswered ones must not grow forever
                    self._sent_at.pop(next(iter(self._sent_at)))

    async def send_command(
        self, device_id: str, name: str, args: dict[str, Any], *, ttl_s: int = 60
    ) -> str | None:
        """Publish a command like the platform does (QoS 1, response topic, correlation data, expiry)."""
        client = self._client
        if client is None:
            return None
        device_type = self.devices[device_id]
        command_id = str(uuid.uuid4())
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = topics.device_topic(device_type, device_id, Channel.ACKS)
        props.CorrelationData = command_id.encode()
        props.MessageExpiryInterval = ttl_s
        body = orjson.dumps({"id": command_id, "name": name, "args": args, "ts": int(time.time() * 1000)})
        self._sent_at[command_id] = time.monotonic()
        try:
            await client.publish(
                topics.device_topic(device_type, device_id, Channel.COMMANDS),
                body,
                qos=1,
                properties=props,
            )
        except aiomqtt.MqttCodeError as exc:
            self._sent_at.pop(command_id, None)
            self.stats.commands_refused += 1
            if self.stats.commands_refused == 1:
                log.warning("observer may not publish commands: %s", exc)
            return None
        self.stats.commands_sent += 1
        return command_id


def random_command(device_type: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A plausible operator command for the type (what a demo or a load test sends)."""
    if device_type == "thermostat":
        if rng.random() < 0.7:
            return "set_setpoint", {"setpoint_c": rng.choice((18.0, 19.5, 21.0, 22.5, 24.0))}
        return "set_mode", {"mode": rng.choice(("heat", "cool", "auto", "off"))}
    if device_type == "air_quality":
        return "set_ventilation", {"level_pct": float(rng.choice((0, 25, 50, 75, 100)))}
    if device_type == "smart_plug":
        return "set_relay", {"on": rng.random() < 0.6}
    if device_type == "gps_tracker":
        return "set_report_interval", {"seconds": rng.choice((5, 10, 30, 60))}
    return "reboot", {}


async def command_load(
    observer: Observer, rate_per_s: float, stop: asyncio.Event, rng: random.Random
) -> None:
    """Send commands to random fleet devices at ``rate_per_s`` until ``stop`` is set."""
    ids = list(observer.devices)
    if not ids or rate_per_s <= 0:
        return
    period = 1.0 / rate_per_s
    while not stop.is_set():
        device_id = rng.choice(ids)
        name, args = random_command(observer.devices[device_id], rng)
        await observer.send_command(device_id, name, args)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period * rng.uniform(0.5, 1.5))
