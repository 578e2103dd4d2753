"""The broker's device plugin (mosquitto/plugin/iotfleet_devices.c) against a real Mosquitto.

What a device may do is decided by the plugin from the agent's devices file: client id = username =
device id, its password, and exactly its own type's and id's topics (PUBACK/SUBACK 135 for anything
else, other types included); a changed file (atomic rename) or SIGHUP kicks removed, rotated and
retyped devices within a second; unknown usernames are left to the next plugin (here: refused).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from iotfleet import broker_files
from iotfleet.stack import configs, probes
from tests.harness import ServerProcess, _require

pytestmark = pytest.mark.integration


def _line(device_id: str, device_type: str, password: str) -> str:
    return f"{device_id} {device_type} {broker_files.hash_password(password)}\n"


@dataclass
class PluginBroker:
    port: int
    devices_file: Path
    server: ServerProcess
    lines: dict[str, str] = field(default_factory=dict)

    def write(self) -> None:
        broker_files.write_atomic(self.devices_file, "".join(self.lines.values()))


RATE_BYTES = 1_000
BURST_BYTES = 20_000


@pytest.fixture
def plugin_broker(tmp_path: Path) -> Iterator[PluginBroker]:
    port = probes.free_port()
    devices_file = tmp_path / "devices"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"plugin {configs.devices_plugin_path()}\nplugin_opt_devices_file {devices_file}\n"
        f"plugin_opt_rate_bytes {RATE_BYTES}\nplugin_opt_burst_bytes {BURST_BYTES}\n"
        # A log file is flushed per line (stdout is not); as root, keep root to write it.
        f"log_dest file {tmp_path / 'broker.log'}\nlog_type all\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    server = ServerProcess("mosquitto", [_require("mosquitto"), "-c", str(conf)], tmp_path / "mosquitto.log")
    broker = PluginBroker(port, devices_file, server)
    broker.lines = {
        "th-1": _line("th-1", "thermostat", "pw-1"),
        "th-2": _line("th-2", "thermostat", "pw-2"),
        "plug-1": _line("plug-1", "smart_plug", "pw-3"),
    }
    broker.write()
    server.spawn_and_wait(lambda: probes.port_in_use("127.0.0.1", port), "mosquitto with the device plugin")
    try:
        yield broker
    finally:
        server.stop()


class Device:
    """A paho MQTT 5 client recording CONNACK, PUBACK and SUBACK reason codes and its disconnection."""

    def __init__(self, port: int, client_id: str, username: str, password: str) -> None:
        self.connack: ReasonCode | None = None
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(
            mid, [r.value for r in rcs]
        )
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.connect_async("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        probes.wait_until(self.answered.is_set, timeout=10, what=f"CONNACK for {client_id}")

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        else:
            self.client.disconnect()
        self.answered.set()

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        info = self.client.publish(topic, payload, qos=1)
        probes.wait_until(lambda: info.mid in self.pubacks, timeout=10, what=f"PUBACK on {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        probes.wait_until(lambda: mid in self.subacks, timeout=10, what=f"SUBACK for {topic}")
        return self.subacks[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_after_reload(port: int, device_id: str, password: str) -> Device:
    """Connect once the broker has taken the new file (it handles SIGHUP in its own loop, not at once)."""
    deadline = time.monotonic() + 5
    while True:
        device = Device(port, device_id, device_id, password)
        if device.connected.is_set() or time.monotonic() > deadline:
            return device
        device.close()
        time.sleep(0.05)


def test_a_device_uses_exactly_its_own_topics(plugin_broker: PluginBroker) -> None:
    device = Device(plugin_broker.port, "th-1", "th-1", "pw-1")
    try:
        assert device.connected.is_set()
        for channel in ("telemetry", "status", "acks"):
            assert device.publish(f"devices/thermostat/th-1/{channel}") < 0x80
        assert device.publish("devices/thermostat/th-1/commands") == 135  # platform → device only
        assert device.publish("devices/thermostat/th-2/telemetry") == 135  # another device
        assert device.publish("devices/smart_plug/th-1/telemetry") == 135  # its own id, another type
        assert device.publish("devices/thermostat/th-1/telemetry/x") == 135
        assert device.publish("deadletter/thermostat/th-1") == 135
        assert device.subscribe("devices/thermostat/th-1/commands") == 1
        assert device.subscribe("devices/thermostat/th-2/commands") == 135
        assert device.subscribe("devices/smart_plug/th-1/commands") == 135
        assert device.subscribe("devices/thermostat/+/commands") == 135
        assert device.subscribe("devices/#") == 135
        assert device.subscribe("devices/thermostat/th-1/telemetry") == 135
    finally:
        device.close()


@pytest.mark.parametrize(
    ("client_id", "username", "password"),
    [
        ("th-1", "th-1", "wrong"),  # wrong password
        ("th-2", "th-1", "pw-1"),  # right credentials, another device's client id: no session take-over
        ("th-1", "th-1", ""),  # empty password
        ("nobody", "nobody", "x"),  # unknown username: deferred, and nothing else accepts it
    ],
)
def test_connect_refused(plugin_broker: PluginBroker, client_id: str, username: str, password: str) -> None:
    device = Device(plugin_broker.port, client_id, username, password)
    try:
        assert device.connack is not None and device.connack.value == 135
    finally:
        device.close()


@pytest.mark.parametrize("change", ["delete", "rotate", "retype"])
@pytest.mark.parametrize("how", ["rename", "sighup"])
def test_a_changed_device_is_kicked_within_a_second(
    plugin_broker: PluginBroker, change: str, how: str
) -> None:
    device = Device(plugin_broker.port, "th-2", "th-2", "pw-2")
    bystander = Device(plugin_broker.port, "th-1", "th-1", "pw-1")
    try:
        assert device.connected.is_set() and bystander.connected.is_set()
        if change == "delete":
            del plugin_broker.lines["th-2"]
        elif change == "rotate":
            plugin_broker.lines["th-2"] = _line("th-2", "thermostat", "pw-2-new")
        else:
            plugin_broker.lines["th-2"] = _line("th-2", "smart_plug", "pw-2")
        started = time.monotonic()
        plugin_broker.write()
        if how == "sighup":
            os.kill(plugin_broker.server.pid, signal.SIGHUP)
        probes.wait_until(device.disconnected.is_set, timeout=3, what="the changed device kicked")
        assert time.monotonic() - started < 1.5  # ≤ 1 s file check + scheduling on a busy machine
        assert not bystander.disconnected.is_set()
        again = Device(plugin_broker.port, "th-2", "th-2", "pw-2")
        try:
            if change == "retype":  # same password, now a smart plug: connects, thermostat topics refused
                assert again.connected.is_set()
                assert again.publish("devices/thermostat/th-2/telemetry") == 135
                assert again.publish("devices/smart_plug/th-2/telemetry") < 0x80
            else:
                assert again.connack is not None and again.connack.value == 135
        finally:
            again.close()
    finally:
        device.close()
        bystander.close()


def test_a_new_device_connects_after_the_file_changes(plugin_broker: PluginBroker) -> None:
    plugin_broker.lines["th-new"] = _line("th-new", "thermostat", "pw-new")
    plugin_broker.write()
    os.kill(plugin_broker.server.pid, signal.SIGHUP)
    device = connect_after_reload(plugin_broker.port, "th-new", "pw-new")
    try:
        assert device.connected.is_set()
        assert device.publish("devices/thermostat/th-new/telemetry") < 0x80
    finally:
        device.close()


def test_malformed_lines_are_skipped_not_fatal(plugin_broker: PluginBroker) -> None:
    plugin_broker.lines["junk"] = "junk line without a hash\n"
    plugin_broker.lines["bad-b64"] = "bad-b64 thermostat $6$!!!!$????\n"
    plugin_broker.lines["th-3"] = _line("th-3", "thermostat", "pw-4")
    plugin_broker.write()
    os.kill(plugin_broker.server.pid, signal.SIGHUP)
    late = connect_after_reload(plugin_broker.port, "th-3", "pw-4")  # the line after the bad ones was loaded
    device = Device(plugin_broker.port, "th-1", "th-1", "pw-1")
    try:
        assert late.connected.is_set() and device.connected.is_set()
        assert plugin_broker.server.alive()
    finally:
        late.close()
        device.close()


def test_a_flooding_device_is_held_to_its_byte_budget(plugin_broker: PluginBroker) -> None:
    """Past its burst, a device's publishes are refused (PUBACK 135); another device is unaffected."""
    flooder = Device(plugin_broker.port, "th-1", "th-1", "pw-1")
    other = Device(plugin_broker.port, "th-2", "th-2", "pw-2")
    try:
        chunk = b"x" * 4_000
        topic = "devices/thermostat/th-1/telemetry"
        codes = [flooder.publish(topic, chunk) for _ in range(10)]
        accepted = sum(code < 0x80 for code in codes)
        # The burst (20,000 B) takes 5 chunks, plus what the 1,000 B/s rate refilled meanwhile.
        assert 5 <= accepted <= 7, codes
        assert codes[-1] == 135
        assert other.publish("devices/thermostat/th-2/telemetry", chunk) < 0x80
        # The budget refills at its rate: 4,000 B take 4 s; a small reading fits again far sooner.
        deadline = time.monotonic() + 5
        while flooder.publish(topic, b"{}") == 135:
            assert time.monotonic() < deadline, "budget never refilled"
            time.sleep(0.1)
    finally:
        flooder.close()
        other.close()
