"""Ingest test support: publishers that speak for provisioned devices, the ingest as a real
subprocess, and counting what InfluxDB stored.

The registry (the real provisioner) is built in parallel, so tests provision
their own publishers through the dynsec admin topic: one role holding the
device ACLs of every device the publisher speaks for (``dynsec.device_acls``)
and one client, created in ONE batched control message (dynsec rewrites its
JSON file on every command batch).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from iotfleet import dynsec
from iotfleet.influx import quote_identifier, quote_string
from iotfleet.stack import probes
from iotfleet.topics import Channel, device_topic
from tests.harness import Broker, Influxd, env_for

NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason: accepted, but no subscription matched
BASE_TS_MS = int(time.time() * 1000) - 3_600_000  # an hour ago: inside max_past; ts = BASE + seq


def wait_for(check: Any, *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy; return it. Raise naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not true after {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)


def _admin_request(broker: Broker, commands: list[dict[str, Any]], timeout: float = 10.0) -> None:
    """Send one dynsec command batch as the admin and wait for its response."""
    done = threading.Event()
    answer: dict[str, Any] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        answer.update(json.loads(message.payload))
        done.set()

    def on_subscribe(c: mqtt.Client, _u: object, _m: int, _r: object, _p: object) -> None:
        c.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)

    def on_connect(c: mqtt.Client, _u: object, _f: object, _r: object, _p: object) -> None:
        c.subscribe(dynsec.RESPONSE_TOPIC, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError("no answer from dynsec")
    finally:
        client.disconnect()
        client.loop_stop()
    errors = [r for r in answer.get("responses", []) if r.get("error")]
    if errors:
        raise RuntimeError(f"dynsec refused: {errors}")


def provision_publisher(broker: Broker, device_type: str, device_ids: Iterable[str]) -> tuple[str, str]:
    """A broker account that may publish as each of these devices; returns (username, password)."""
    username = f"testpub-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    acls: list[dict[str, Any]] = []
    for device_id in device_ids:
        acls.extend(dynsec.device_acls(device_type, device_id))
    _admin_request(
        broker,
        [
            {"command": "createRole", "rolename": username, "acls": acls},
            {
                "command": "createClient",
                "username": username,
                "password": password,
                "roles": [{"rolename": username}],
            },
        ],
    )
    return username, password


@dataclass
class Publisher:
    """A QoS 1 MQTT 5 publisher; with ``persistent`` it resumes its session and resends after a reconnect."""

    broker: Broker
    username: str
    password: str
    persistent: bool = False
    client_id: str = field(default_factory=lambda: f"testpub-{secrets.token_hex(4)}")
    client: mqtt.Client = field(init=False)
    acked: int = field(default=0, init=False)
    refused: list[int] = field(default_factory=list, init=False)
    resend_unrouted: bool = False
    resent: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _unacked: dict[int, tuple[str, bytes | str]] = field(default_factory=dict, init=False)
    _to_resend: list[tuple[str, bytes | str]] = field(default_factory=list, init=False)
    _early_unrouted: set[int] = field(default_factory=set, init=False)
    _closed: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        if self.resend_unrouted:
            threading.Thread(target=self._resend_loop, daemon=True).start()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(self.username, self.password)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_publish = self._on_publish

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: Any, _p: object) -> None:
        with self._lock:
            sent = self._unacked.pop(mid, None)
            if reason.value == NO_MATCHING_SUBSCRIBERS and self.resend_unrouted and sent is None:
                self._early_unrouted.add(mid)
                return
            if reason.value == NO_MATCHING_SUBSCRIBERS and self.resend_unrouted and sent is not None:
                # Accepted but delivered to nobody (the ingest's shared subscription is not back yet
                # after a broker restart): a device that must not lose readings sends it again.
                self._to_resend.append(sent)
                self.resent += 1
                return
            self.acked += 1
            if reason.is_failure:
                self.refused.append(reason.value)

    def _resend_loop(self) -> None:
        while not self._closed.wait(0.1):
            with self._lock:
                batch, self._to_resend = self._to_resend, []
            for topic, payload in batch:
                self.publish(topic, payload)

    def connect(self) -> Publisher:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect(
            self.broker.host, self.broker.port, clean_start=not self.persistent, properties=props
        )
        self.client.loop_start()
        if not connected.wait(10):
            raise TimeoutError("publisher did not connect")
        return self

    def publish(self, topic: str, payload: bytes | str) -> None:
        # Not under self._lock: paho calls on_publish holding its own lock (lock-order deadlock).
        info = self.client.publish(topic, payload, qos=1)
        if self.resend_unrouted:
            with self._lock:
                if info.mid in self._early_unrouted:  # its PUBACK 0x10 beat us here
                    self._early_unrouted.discard(info.mid)
                    self._to_resend.append((topic, payload))
                    self.resent += 1
                else:
                    self._unacked[info.mid] = (topic, payload)

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        wait_for(lambda: self.acked >= count, timeout=timeout, what=f"{count} PUBACKs (have {self.acked})")

    def close(self) -> None:
        self._closed.set()
        self.client.disconnect()
        self.client.loop_stop()


def telemetry(device_type: str, device_id: str) -> str:
    return device_topic(device_type, device_id, Channel.TELEMETRY)


def thermostat_reading(device_index: int, seq: int) -> dict[str, Any]:
    return {
        "ts": BASE_TS_MS + seq,
        "seq": seq,
        "temperature_c": 15 + (seq % 100) / 10,
        "humidity_pct": 40.0 + device_index % 10,
        "setpoint_c": 21.0,
        "mode": "heat",
    }


class Subscriber:
    """An admin subscriber collecting messages (dead letters) for assertions."""

    def __init__(self, broker: Broker, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])
        self.client.on_connect = lambda c, *_a: c.subscribe(topic_filter, options=SubscribeOptions(qos=1))
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise TimeoutError("subscriber not ready")

    def json_messages(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t, json.loads(p)) for t, p in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def influx_query(influxd: Influxd, database: str, q: str) -> list[dict[str, Any]]:
    """InfluxQL → rows (with the series' tags); [] if the database or measurement does not exist yet."""
    response = httpx.post(f"{influxd.url}/query", data={"q": q, "db": database, "epoch": "ms"}, timeout=30)
    response.raise_for_status()
    rows: list[dict[str, Any]] = []
    for result in response.json().get("results", []):
        for series in result.get("series", []):
            for values in series.get("values", []):
                row = dict(zip(series["columns"], values, strict=True))
                row.update(series.get("tags", {}))
                rows.append(row)
    return rows


def stored_count(influxd: Influxd, database: str, measurement: str) -> int:
    try:
        rows = influx_query(influxd, database, f"SELECT count(seq) FROM {quote_identifier(measurement)}")
    except httpx.HTTPError:
        return 0
    return int(rows[0]["count"]) if rows else 0


def seqs_by_device(influxd: Influxd, database: str, measurement: str) -> dict[str, list[int]]:
    """Every stored seq per device (duplicates kept: exactly-once is the caller's check)."""
    rows = influx_query(
        influxd, database, f"SELECT seq FROM {quote_identifier(measurement)} GROUP BY device_id"
    )
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(row["device_id"], []).append(int(row["seq"]))
    return out


def device_rows(influxd: Influxd, database: str, measurement: str, device_id: str) -> list[dict[str, Any]]:
    return influx_query(
        influxd,
        database,
        f"SELECT * FROM {quote_identifier(measurement)} WHERE device_id = {quote_string(device_id)}",
    )


class IngestProcess:
    """``python -m telemetry_ingest.runner`` as a real subprocess (so it can be kill -9'd)."""

    def __init__(
        self,
        broker: Broker,
        influxd: Influxd,
        database: str,
        state_dir: Path,
        *,
        device_type: str = "thermostat",
        replica: str = "0",
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.health_port = probes.free_port()
        self.env = env_for(broker, influxd, database, state_dir)
        self.env.update(
            {
                "IOTFLEET_MQTT__USERNAME": "iotfleet-ingest",
                "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-ingest"],
                "IOTFLEET_INGEST__DEVICE_TYPE": device_type,
                "IOTFLEET_INGEST__REPLICA": replica,
                "IOTFLEET_HEALTH__PORT": str(self.health_port),
                **(extra_env or {}),
            }
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / f"ingest-{device_type}-{replica}.log"
        self.argv = [sys.executable, "-m", "telemetry_ingest.runner", *(args or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> IngestProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2)
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = response.json()
        body["http_status"] = response.status_code
        return body

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=2).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching these labels (0 if absent)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_healthy(self, timeout: float = 20) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ingest exited {self.proc.returncode}:\n{self.log_tail()}")
            body = self.health()
            return body if body and body.get("http_status") == 200 else None

        result: dict[str, Any] = wait_for(ok, timeout=timeout, what="ingest healthy")
        return result

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class StreamPublisher(threading.Thread):
    """Publishes ``per_device`` readings for each device (seq 0..n-1, ts = BASE + seq) at ``rate``/s.

    Runs in the background so a test can break things mid-stream; pacing keeps the
    stream going long enough for "mid-stream" to mean something.
    """

    def __init__(self, publisher: Publisher, device_ids: list[str], per_device: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.publisher = publisher
        self.device_ids = device_ids
        self.per_device = per_device
        self.rate = rate
        self.sent = 0
        self.topics = [telemetry("thermostat", d) for d in device_ids]

    @property
    def total(self) -> int:
        return len(self.device_ids) * self.per_device

    def run(self) -> None:
        started = time.monotonic()
        for seq in range(self.per_device):
            for index, topic in enumerate(self.topics):
                self.publisher.publish(topic, orjson.dumps(thermostat_reading(index, seq)))
                self.sent += 1
            ahead = started + self.sent / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing, not synchronisation

    def assert_stored_exactly_once(self, influxd: Influxd, database: str) -> None:
        """Every device's stored seqs are exactly 0..n-1: nothing lost, nothing twice."""
        stored = seqs_by_device(influxd, database, "thermostat")
        expected = list(range(self.per_device))
        problems = {}
        for device in self.device_ids:
            seqs = sorted(stored.get(device, []))
            if seqs != expected:
                missing = sorted(set(expected) - set(seqs))
                dups = len(seqs) - len(set(seqs))
                problems[device] = (
                    f"{len(seqs)} stored, {len(missing)} missing (first {missing[:5]}), {dups} dups"
                )
        assert not problems, problems
