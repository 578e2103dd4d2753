"""Rules tests support: a simulated thermostat that obeys commands, an event listener, an engine.

The thermostat is a real MQTT 5 device session (its own dynsec account, a
persistent session so commands queue while it is offline). It records every
command with its MQTT 5 properties, acks it on the response topic, and a
``set_mode cool`` makes its temperature fall on the next readings.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry

from iotfleet import dynsec, topics
from iotfleet.settings import RulesSettings, Settings
from iotfleet.stack import probes
from iotfleet.topics import Channel
from rules_engine.engine import RulesEngine
from rules_engine.sources import FileSource, RuleSource
from rules_engine.store import StateStore
from tests.harness import Broker


def wait(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    probes.wait_until(lambda: bool(check()), timeout=timeout, what=what)


@dataclass
class ReceivedCommand:
    payload: dict[str, Any]
    correlation: bytes | None
    response_topic: str | None
    expiry: int | None
    received: float


class SimThermostat:
    """A thermostat device over MQTT 5: readings out, commands in, acks back."""

    def __init__(
        self,
        broker: Broker,
        device_id: str,
        password: str,
        *,
        temperature: float = 21.0,
        auto_ack: bool = True,
        persistent: bool = True,
        device_type: str = "thermostat",
    ) -> None:
        self.device_id = device_id
        self.device_type = device_type
        self.temperature = temperature
        self.mode = "auto"
        self.auto_ack = auto_ack
        self.persistent = persistent
        self.commands: list[ReceivedCommand] = []
        self.seq = 0
        self.host, self.port = broker.host, broker.port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.will_set(self.topic(Channel.STATUS), topics.STATUS_OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.lock = threading.Lock()

    def topic(self, channel: Channel) -> str:
        return topics.device_topic(self.device_type, self.device_id, channel)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe(self.topic(Channel.COMMANDS), qos=1)
        client.publish(self.topic(Channel.STATUS), topics.STATUS_ONLINE, qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        payload = orjson.loads(msg.payload)
        command = ReceivedCommand(
            payload=payload,
            correlation=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
            expiry=getattr(props, "MessageExpiryInterval", None),
            received=time.monotonic(),
        )
        with self.lock:
            self.commands.append(command)
            if payload.get("name") == "set_mode":
                self.mode = payload["args"]["mode"]
        if self.auto_ack and command.response_topic:
            client.publish(
                command.response_topic,
                orjson.dumps({"id": payload["id"], "status": "succeeded", "detail": "done"}),
                qos=1,
            )

    def connect(self) -> SimThermostat:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        self.subscribed.clear()
        self.client.connect(
            self.host, self.port, keepalive=30, clean_start=not self.persistent, properties=props
        )
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError(f"{self.device_id}: no SUBACK")
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def reading(self, temperature: float | None = None, ts: int | None = None) -> bytes:
        self.seq += 1
        body: dict[str, Any] = {
            "seq": self.seq,
            "temperature_c": self.temperature if temperature is None else temperature,
            "humidity_pct": 40.0,
            "setpoint_c": 21.0,
            "mode": self.mode,
        }
        if ts is not None:
            body["ts"] = ts
        return orjson.dumps(body)

    def publish_raw(self, body: dict[str, Any]) -> None:
        info = self.client.publish(self.topic(Channel.TELEMETRY), orjson.dumps(body), qos=1)
        info.wait_for_publish(5)

    def publish(self, temperature: float | None = None, ts: int | None = None) -> None:
        info = self.client.publish(self.topic(Channel.TELEMETRY), self.reading(temperature, ts), qos=1)
        info.wait_for_publish(5)

    def step(self) -> None:
        """Physics of a toy room: heats by 1 °C per reading, cools by 1.5 °C per reading in cool mode."""
        self.temperature += -1.5 if self.mode == "cool" else 1.0
        self.publish()


class Listener:
    """An admin session recording the platform's events (commands, alerts) as parsed JSON."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"listener-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(f, 1) for f in filters])
        self.client.loop_start()
        if not done.wait(10):
            raise TimeoutError("listener: no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {"raw": msg.payload.decode(errors="replace")}
        with self.lock:
            self.messages.append((msg.topic, body))

    def events(self, topic: str, event: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [b for t, b in self.messages if t == topic and (event is None or b.get("event") == event)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_rules(path: Path, rules: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rules))
    return path


def engine_settings(broker: Broker, state_dir: Path, **rules: Any) -> Settings:
    return Settings(
        state_dir=state_dir,
        mqtt=broker.settings_for("iotfleet-rules"),
        rules=RulesSettings(client_id=f"rules-{secrets.token_hex(4)}", **rules),
    )


def start_engine(
    settings: Settings, source: RuleSource | None = None, *, require_source: bool = True
) -> RulesEngine:
    """An engine in this process, connected and with its rules loaded (from the source, or its cache)."""
    if source is None:
        assert settings.rules.rules_file is not None
        source = FileSource(settings.rules.rules_file)
    store = StateStore(settings.rules.state_file or settings.state_dir / "rules-engine.sqlite")
    engine = RulesEngine(settings, source, store, registry=CollectorRegistry())
    engine.start()
    if require_source:
        wait(lambda: engine.health()["status"] == "ok", "engine connected with rules loaded")
    else:
        wait(lambda: engine.subscribed.is_set() and engine.rules_loaded, "engine connected with cached rules")
    return engine


class RegistryServer:
    """The registry app served by uvicorn on a free port in a background thread (real HTTP).

    The rules engine fetches rules over HTTP from another thread, so the ASGI
    in-process transport of the registry tests will not do. ``stop``/``start``
    again on the same database file is a registry restart.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = settings.registry.port
        self.server: Any = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RegistryServer:
        import uvicorn

        from device_registry.main import create_app

        config = uvicorn.Config(
            create_app(self.settings), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="registry", daemon=True)
        self.thread.start()
        wait(lambda: self.server.started, "registry serving", timeout=30)
        return self

    def tracker(self) -> Any:
        app = self.server.config.loaded_app
        while not hasattr(app, "state") and hasattr(app, "app"):
            app = app.app
        return getattr(app.state, "command_tracker", None)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.server = self.thread = None
