"""Simulator test support: a broker seeded with devices, a fleet in the test's loop, a watcher.

The watcher is an aiomqtt client on the admin account (which may subscribe to
``#``): it records every message the platform would see, so a test asserts
fault effects at the broker — invalid JSON, retained LWT ``offline``, the same
``seq`` twice, an ack carrying the command's correlation id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotfleet import dynsec, topics
from iotfleet.topics import Channel
from simulators.fleet import DeviceCredentials
from simulators.provisioning import spread
from tests.devices import provision, seed_broker
from tests.harness import Broker


def fleet_ids(prefix: str, counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(t, f"{prefix}-{t.replace('_', '-')}-{i}") for t, n in counts.items() for i in range(n)]


def credentials(devices: list[tuple[str, str]], passwords: dict[str, str]) -> list[DeviceCredentials]:
    return [DeviceCredentials(i, t, i, passwords[i], i) for t, i in devices]


@contextmanager
def seeded_broker(state_dir: Path, devices: list[tuple[str, str]]) -> Iterator[tuple[Broker, dict[str, str]]]:
    """A broker of the test's own with ``devices`` in its dynsec file before it starts (fast for 1,000s)."""
    broker = Broker(state_dir)
    passwords = seed_broker(broker, devices)
    broker.start()
    try:
        yield broker, passwords
    finally:
        broker.stop()


def provisioned(broker: Broker, prefix: str, counts: dict[str, int] | int) -> list[DeviceCredentials]:
    """A few devices on the shared broker, through the dynsec admin topic."""
    wanted = spread(counts) if isinstance(counts, int) else counts
    devices = fleet_ids(prefix, wanted)
    return credentials(devices, provision(broker, devices))


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float
    correlation: bytes | None = None

    def json(self) -> Any:
        return orjson.loads(self.payload)


@dataclass
class Watcher:
    """Records every message under the given filters (admin account) in arrival order."""

    broker: Broker
    filters: tuple[str, ...] = ("devices/#", "deadletter/#")
    messages: list[Seen] = field(default_factory=list)
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, aiomqtt.MqttError):
            pass

    async def _run(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=dynsec.ADMIN_USER,
            password=self.broker.passwords[dynsec.ADMIN_USER],
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"watcher-{uuid.uuid4().hex[:8]}",
        ) as client:
            self._client = client
            for topic_filter in self.filters:
                await client.subscribe(topic_filter, qos=1)
            ready.set()
            async for message in client.messages:
                props = message.properties
                correlation = getattr(props, "CorrelationData", None) if props is not None else None
                payload = (
                    message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                )
                self.messages.append(
                    Seen(str(message.topic), payload, bool(message.retain), time.monotonic(), correlation)
                )

    def on(self, device: DeviceCredentials, channel: Channel) -> list[Seen]:
        topic = topics.device_topic(device.type, device.id, channel)
        return [m for m in self.messages if m.topic == topic]

    async def wait(self, check: Callable[[], Any], what: str, within_s: float = 15.0) -> Any:
        deadline = time.monotonic() + within_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)


async def send_command(
    broker: Broker, device: DeviceCredentials, name: str, args: dict[str, Any], command_id: str | None = None
) -> str:
    """Publish a command as the registry would (QoS 1, response topic, correlation data, expiry)."""
    command_id = command_id or str(uuid.uuid4())
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = topics.device_topic(device.type, device.id, Channel.ACKS)
    props.CorrelationData = command_id.encode()
    props.MessageExpiryInterval = 60
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="iotfleet-registry",
        password=broker.passwords["iotfleet-registry"],
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.publish(
            topics.device_topic(device.type, device.id, Channel.COMMANDS),
            orjson.dumps({"id": command_id, "name": name, "args": args, "ts": int(time.time() * 1000)}),
            qos=1,
            properties=props,
        )
    return command_id
