"""Jobs test support: devices that record every command they get (id, when) and answer it.

A ``JobDevice`` is a real MQTT 5 device session with the credentials the registry
provisioned, persistent (commands queue at the broker while it is offline), that
answers each command on its response topic with ``answer`` (or not at all).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotfleet import topics
from iotfleet.topics import Channel
from tests.harness import Broker


class JobDevice:
    def __init__(
        self, broker: Broker, device_id: str, password: str, *, answer: str | None = "succeeded"
    ) -> None:
        self.device_id = device_id
        self.answer = answer
        self.received: list[tuple[str, float]] = []  # (command id, monotonic time), in arrival order
        self.lock = threading.Lock()
        self.host, self.port = broker.host, broker.port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topics.device_topic("thermostat", self.device_id, Channel.COMMANDS), qos=1)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        command_id = str(orjson.loads(msg.payload)["id"])
        with self.lock:
            self.received.append((command_id, time.monotonic()))
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        if self.answer is not None and response_topic:
            client.publish(response_topic, orjson.dumps({"id": command_id, "status": self.answer}), qos=1)

    def times(self, command_ids: set[str]) -> list[float]:
        with self.lock:
            return [at for command_id, at in self.received if command_id in command_ids]

    def ids(self, command_ids: set[str]) -> list[str]:
        with self.lock:
            return [command_id for command_id, _at in self.received if command_id in command_ids]

    def connect(self) -> JobDevice:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.subscribed.clear()
        self.client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError(f"{self.device_id}: no SUBACK")
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class StateDevice:
    """A device that converges: applies each retained ``state/delta`` it gets and reports the result.

    Clean session: a device that was offline gets its retained delta when it subscribes again.
    ``versions`` holds the desired version of every delta received (a repeat of the same version
    is a republish, harmless; another version would be a second change).
    """

    def __init__(self, broker: Broker, device_id: str, password: str) -> None:
        self.device_id = device_id
        self.obey = True  # False: takes deltas and never reports
        self.state: dict[str, Any] = {}
        self.versions: list[int] = []
        self.lock = threading.Lock()
        self.host, self.port = broker.host, broker.port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topics.device_topic("thermostat", self.device_id, Channel.STATE_DELTA), qos=1)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # the retained delta was cleared: in sync
        body = orjson.loads(msg.payload)
        with self.lock:
            self.versions.append(int(body["version"]))
            self.state.update(body["state"])
        if not self.obey:
            return
        topic = topics.device_topic("thermostat", self.device_id, Channel.STATE_REPORTED)
        client.publish(topic, orjson.dumps(body["state"]), qos=1)

    def connect(self) -> StateDevice:
        self.subscribed.clear()
        self.client.connect(self.host, self.port, keepalive=30, clean_start=True)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError(f"{self.device_id}: no SUBACK")
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
