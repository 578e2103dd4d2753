"""The registry's dynamic-security admin client: JSON commands on ``$CONTROL/dynamic-security/v1``.

Commands go out in batches (``{"commands": [...]}``) and each control message is
answered by one message on the response topic, matched here by the
``correlationData`` we put on every command. Mosquitto 2.0's dynsec rewrites its
whole JSON file after every changing command, so the cost of a change grows with
the number of clients; batching saves the round trips, not the rewrites.

The MQTT link is a threaded paho client: it connects in the background and
reconnects with backoff, so the registry starts (degraded) before the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from iotfleet import dynsec, tls_clients
from iotfleet.reserved_names import is_reserved
from iotfleet.settings import MqttSettings

log = logging.getLogger("registry.broker")

MAX_CHUNK = 500
"""Most commands per control message."""
TARGET_MESSAGE_S = 1.0
"""How long one control message may keep the broker busy. Mosquitto 2.0's dynsec
rewrites its whole JSON file after every changing command, on the broker's only
thread: with 10,000 devices one rewrite takes ~0.1 s, so 500 commands in one
message would stall every client for a minute (keepalives expire, sessions
drop). The chunk size adapts to keep each message near this bound."""


class BrokerError(Exception):
    """The broker is unreachable or did not answer a control message in time."""


class DynsecCommandError(Exception):
    """A dynsec command was answered with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


class ForeignEntryError(Exception):
    """A command would change a broker entry the registry did not create (a platform account, another tool's)."""

    def __init__(self, device_ids: Sequence[str], detail: str) -> None:
        super().__init__(detail)
        self.device_ids = set(device_ids)


def refuse_reserved(commands: Sequence[dict[str, Any]]) -> None:
    """Raise ForeignEntryError if a command names a reserved account or role (the last wall, no round trip)."""
    for command in commands:
        for key in ("username", "rolename"):
            name = command.get(key)
            if isinstance(name, str) and is_reserved(name):
                raise ForeignEntryError(
                    [name], f"refused: {command.get('command')} on the platform's own broker entry {name!r}"
                )


@dataclass
class MqttLink:
    """A paho MQTT 5 client on its own thread, reconnecting forever with backoff."""

    settings: MqttSettings
    name: str
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    on_message: Callable[[mqtt.MQTTMessage], None] | None = None
    on_state: Callable[[bool], None] | None = None
    client: mqtt.Client = field(init=False)
    connected: threading.Event = field(init=False, default_factory=threading.Event)
    last_error: str | None = field(init=False, default="not connected yet")
    _stopping: bool = field(init=False, default=False)
    _subscribe_mid: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        client_id = f"iotfleet-registry-{self.name}-{secrets.token_hex(4)}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=True
        )
        if self.settings.username:
            password = self.settings.password.get_secret_value() if self.settings.password else None
            self.client.username_pw_set(self.settings.username, password)
        tls_clients.apply_to_paho(self.client, self.settings)  # the broker on another host
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        self._stopping = False  # restartable (presence runs again when the lease comes back)
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            self.last_error = f"CONNACK {reason}"
            log.warning("%s link refused by the broker: %s", self.name, reason)
            return
        self.last_error = None
        if not self.subscriptions:
            self._ready()
            return
        # "Connected" means the subscriptions are live: a message published between CONNACK and
        # SUBACK would be missed, so readiness waits for the SUBACK of the one SUBSCRIBE.
        _rc, self._subscribe_mid = self.client.subscribe(list(self.subscriptions))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self.last_error = f"SUBACK {', '.join(refused)}"
            log.warning("%s link: the broker refused a subscription: %s", self.name, self.last_error)
            return
        self._ready()

    def _ready(self) -> None:
        self.connected.set()
        log.info("%s link connected to %s:%s", self.name, self.settings.host, self.settings.port)
        if self.on_state:
            self.on_state(True)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.last_error = f"disconnected: {reason}"
        if was_connected and not self._stopping:
            log.warning("%s link lost (%s); reconnecting", self.name, reason)
            if self.on_state:
                self.on_state(False)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_message:
            try:
                self.on_message(message)
            except Exception:  # a bad message must not kill paho's network thread
                log.exception("%s link: error handling a message on %s", self.name, message.topic)


class BrokerAdmin:
    """Sends dynsec command batches and returns their responses, in order."""

    def __init__(self, settings: MqttSettings, *, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[list[dict[str, Any]]]]] = {}
        self._lock = asyncio.Lock()
        self.on_connected: Callable[[], None] | None = None
        self.link = MqttLink(
            settings,
            "admin",
            subscriptions=[(dynsec.RESPONSE_TOPIC, 1)],
            on_message=self._on_response,
            on_state=self._on_state,
        )
        self.commands_sent = 0
        self.last_batch_s = 0.0
        # Start small: a registry restarted next to a broker holding 10,000 devices
        # must not stall it with its first message; it doubles while messages are fast.
        self._chunk = 16

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """A platform notice (QoS 1) on this replica's admin link, e.g. ``iotfleet/rules/changed``
        from a standby replica, whose command tracker is not running."""
        self.link.client.publish(topic, payload, qos=1)

    def _on_state(self, up: bool) -> None:
        if up and self.on_connected:
            self.on_connected()

    def _on_response(self, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            first = responses[0].get("correlationData", "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return
        batch_id = str(first).split(":", 1)[0]
        entry = self._pending.pop(batch_id, None)
        if entry is None:
            return  # another admin client's answer (responses go to every subscriber)
        loop, future = entry
        loop.call_soon_threadsafe(_set_result, future, responses)

    async def wait_connected(self, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while not self.connected:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _send(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.connected:
            raise BrokerError(f"not connected to the MQTT broker ({self.link.last_error})")
        batch_id = secrets.token_hex(8)
        tagged = [{**cmd, "correlationData": f"{batch_id}:{i}"} for i, cmd in enumerate(commands)]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._pending[batch_id] = (loop, future)
        started = time.monotonic()
        info = self.link.client.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._pending.pop(batch_id, None)
            raise BrokerError(f"cannot publish to the broker: {mqtt.error_string(info.rc)}")
        try:
            responses = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self._pending.pop(batch_id, None)
            raise BrokerError(f"no dynsec answer within {self.timeout_s:.0f} s") from None
        self.commands_sent += len(commands)
        self.last_batch_s = time.monotonic() - started
        if len(responses) != len(commands):
            raise BrokerError(f"dynsec answered {len(responses)} of {len(commands)} commands")
        return responses

    async def execute(self, commands: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run commands in as few control messages as the broker bears; one response per command."""
        pending = list(commands)
        refuse_reserved(pending)
        out: list[dict[str, Any]] = []
        # One batch at a time: dynsec applies a message's commands in order, and
        # interleaving two requests' batches would make failures hard to undo.
        async with self._lock:
            start = 0
            while start < len(pending):
                batch = pending[start : start + self._chunk]
                started = time.monotonic()
                out.extend(await self._send(batch))
                start += len(batch)
                self._adapt(len(batch), time.monotonic() - started)
        return out

    def _adapt(self, size: int, elapsed: float) -> None:
        """Size the next message so that it keeps the broker busy about TARGET_MESSAGE_S."""
        if elapsed > TARGET_MESSAGE_S:
            self._chunk = max(1, int(size * TARGET_MESSAGE_S / elapsed))
        elif elapsed < TARGET_MESSAGE_S / 2 and size >= self._chunk:
            self._chunk = min(MAX_CHUNK, self._chunk * 2)

    async def run(self, commands: Iterable[dict[str, Any]], *, tolerate: Iterable[str] = ()) -> None:
        """Execute and raise DynsecCommandError for the first error not in ``tolerate``."""
        ok = set(tolerate)
        for response in await self.execute(commands):
            error = response.get("error")
            if error and error not in ok:
                raise DynsecCommandError(response.get("command", "?"), error)

    async def list_clients(self) -> list[dict[str, Any]]:
        [response] = await self.execute([{"command": "listClients", "verbose": True, "count": -1}])
        _raise_for(response)
        return list(response["data"]["clients"])

    async def foreign_entries(self, device_ids: Sequence[str], marker: str) -> dict[str, str]:
        """The ids among these held by a dynsec client without ``marker`` (not the registry's): id → what.

        Devices live in the broker agent's file; dynamic security is consulted first, so a
        client there under a device's id (a platform account, another tool's) would answer
        for it. One listClients, whatever the number of ids: dynsec holds only the
        platform's accounts and clients made by older registries.
        """
        wanted = set(device_ids)
        return {
            c["username"]: "client"
            for c in await self.list_clients()
            if c["username"] in wanted and c.get("textname") != marker
        }

    async def list_roles(self) -> list[dict[str, Any]]:
        [response] = await self.execute([{"command": "listRoles", "verbose": True, "count": -1}])
        _raise_for(response)
        return list(response["data"]["roles"])


def _set_result(future: asyncio.Future[list[dict[str, Any]]], value: list[dict[str, Any]]) -> None:
    if not future.done():
        future.set_result(value)


def _raise_for(response: dict[str, Any]) -> None:
    if response.get("error"):
        raise DynsecCommandError(response.get("command", "?"), response["error"])
