"""The same session as ``mqtt.py`` on paho-mqtt 2.x (``IOTFLEET_INGEST__TRANSPORT=paho``).

paho runs its network loop on its own thread; messages are handed to the asyncio
loop in chunks (one wake-up per chunk, not per message) and acks go back with
``client.ack(mid, qos)`` (``manual_ack=True``). paho cannot stop reading its
socket, so the buffer bound relies on the broker's receive-maximum window only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from iotfleet import tls_clients
from iotfleet.mqtt_client import SessionConfig, Sink, StateCallback
from iotfleet.settings import MqttSettings

log = logging.getLogger(__name__)


class PahoClient:
    def __init__(
        self,
        settings: MqttSettings,
        session: SessionConfig,
        sink: Sink,
        on_state: StateCallback | None = None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.sink = sink
        self.on_state = on_state or (lambda _up, _why: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, bytes, int]] = []
        self._epoch = 0
        self._connected = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=session.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(1, 5)
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        tls_clients.apply_to_paho(self._client, settings)  # the broker on another host
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    @property
    def connected(self) -> bool:
        return self._connected

    # --- paho thread -----------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._post_state(False, f"broker refused the connection: {reason}")
            return
        with self._lock:
            self._epoch = (self._epoch + 1) & 0x7FFF_FFFF
        if self.session.retire:
            client.unsubscribe(list(self.session.topic_filters))
            self._connected = True
            self._post_state(True, "")
            return
        options = SubscribeOptions(qos=self.session.qos)
        client.subscribe([(f, options) for f in self.session.topic_filters])

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if reasons and reasons[0].is_failure:
            self._post_state(False, f"broker refused the subscription: {reasons[0]}")
            return
        self._connected = True
        self._post_state(True, "")

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected = False
        self._post_state(False, f"disconnected: {reason}")

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            token = (self._epoch << 16) | (message.mid if message.qos else 0)
            self._inbox.append((message.topic, bytes(message.payload), token))
            wake = len(self._inbox) == 1
        if wake and self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _post_state(self, up: bool, why: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_state, up, why)

    # --- asyncio loop ----------------------------------------------------------------------

    def _drain(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        sink = self.sink
        for topic, payload, token in inbox:
            sink(topic, payload, token)

    def ack(self, tokens: list[int]) -> None:
        with self._lock:
            epoch_bits = self._epoch << 16
        for token in tokens:
            if token & ~0xFFFF == epoch_bits and token & 0xFFFF:
                self._client.ack(token & 0xFFFF, 1)

    def publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def pause_reading(self) -> None:
        pass  # see the module docstring

    def resume_reading(self) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.session.receive_maximum
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        await stop.wait()

    async def disconnect(self, *, end_session: bool = False) -> None:
        props = None
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        self._connected = False
