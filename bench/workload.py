"""The benchmarks' shared workload: a fresh broker + InfluxDB, a backlog of readings, drain timing.

Every pipeline is measured the same way (the consumer's own ceiling): its MQTT
session is created first, the whole backlog is published into that persistent
session while the consumer is stopped, then the consumer starts and we time the
readings landing in InfluxDB, counted back from InfluxDB (zero loss = every
(device, seq) present). The publisher is therefore never the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import dynsec
from iotfleet.influx import InfluxClient, series_rows
from iotfleet.settings import InfluxSettings, Settings, load_settings
from iotfleet.stack import probes
from iotfleet.stack.supervisor import INFRA, Stack

BENCH_USER = "bench-publisher"
PROBE_DEVICE = "probe"
DEVICE_TYPE = "thermostat"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return "not installed"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": " ".join(platform.freedesktop_os_release().get(k, "") for k in ("NAME", "VERSION_ID")).strip()
        if hasattr(platform, "freedesktop_os_release")
        else platform.platform(),
        "python": platform.python_version(),
        "mosquitto": version([mosquitto, "-h"]),
        "influxd": version(["influxd", "version"]),
        "node": version(["node", "--version"]),
    }


@dataclass
class BenchStack:
    """mosquitto + influxd of the iotfleet stack on free ports in a temp state dir; services stopped."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="iotfleet-bench-")))
    settings: Settings = field(init=False)
    stack: Stack = field(init=False)
    bench_password: str = field(init=False, default="")

    def __post_init__(self) -> None:
        mqtt_port, influx_port, api_port, rpc_port, base = probes.free_ports(4, block=8)
        self.settings = load_settings(
            state_dir=self.root / "state",
            mqtt={"port": mqtt_port},
            influx={"url": f"http://127.0.0.1:{influx_port}", "database": "bench"},
            registry={"port": api_port},
            stack={"influx_rpc_port": rpc_port, "service_port_base": base},
        )
        self.stack = Stack(self.settings)

    def start(self, *, services: bool = False) -> BenchStack:
        """Start the stack; without ``services`` only the broker and InfluxDB stay up (comparisons)."""
        self.stack.up(foreground=False, on_progress=lambda m: print(f"  stack: {m}", flush=True))
        if services:
            return self
        # The comparisons run one consumer at a time: stop the stack's own services.
        rpc = self.stack._rpc()
        for info in rpc.supervisor.getAllProcessInfo():
            if info["name"] not in INFRA:
                rpc.supervisor.stopProcess(info["name"], True)
        self.bench_password = create_bench_account(self)
        return self

    def stop(self) -> None:
        self.stack.down(on_progress=lambda _m: None)

    @property
    def mqtt_host(self) -> str:
        return self.settings.mqtt.host

    @property
    def mqtt_port(self) -> int:
        return self.settings.mqtt.port

    @property
    def influx(self) -> InfluxSettings:
        return self.settings.influx

    def passwords(self) -> dict[str, str]:
        return dict(json.loads(self.stack.layout.secrets.read_text()))

    def service_env(self, account: str, **extra: str) -> dict[str, str]:
        """Environment of an iotfleet service process pointed at this stack."""
        env = dict(os.environ)
        env.update(
            {
                "IOTFLEET_STATE_DIR": str(self.stack.layout.root),
                "IOTFLEET_MQTT__HOST": self.mqtt_host,
                "IOTFLEET_MQTT__PORT": str(self.mqtt_port),
                "IOTFLEET_MQTT__USERNAME": account,
                "IOTFLEET_MQTT__PASSWORD": self.passwords()[account],
                "IOTFLEET_INFLUX__URL": self.influx.url,
                "IOTFLEET_INFLUX__DATABASE": self.influx.database,
                "IOTFLEET_LOG_LEVEL": "WARNING",
                **extra,
            }
        )
        return env


def dynsec_command(stack: BenchStack, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run dynsec admin commands (one control message) and return the responses."""
    responses: list[dict[str, Any]] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(dynsec.ADMIN_USER, stack.passwords()[dynsec.ADMIN_USER])

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        responses.extend(orjson.loads(message.payload).get("responses", []))
        done.set()

    def on_subscribe(*_args: object) -> None:
        client.publish(dynsec.CONTROL_TOPIC, orjson.dumps({"commands": commands}), qos=1)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_a: c.subscribe(dynsec.RESPONSE_TOPIC, qos=1)
    client.connect(stack.mqtt_host, stack.mqtt_port)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return responses


def create_bench_account(stack: BenchStack) -> str:
    """A publisher/subscriber account for the workload (devices/# both ways)."""
    password = os.urandom(12).hex()
    dynsec_command(
        stack,
        [
            {
                "command": "createRole",
                "rolename": "bench",
                "acls": [
                    dynsec.acl("publishClientSend", "devices/#"),
                    dynsec.acl("subscribePattern", "devices/#"),
                    dynsec.acl("publishClientReceive", "devices/#"),
                ],
            },
            {
                "command": "createClient",
                "username": BENCH_USER,
                "password": password,
                "roles": [{"rolename": "bench"}],
            },
        ],
    )
    return password


def reading_payloads(device_id: str, count: int, start_ms: int) -> Iterator[bytes]:
    """Valid thermostat readings with a unique device timestamp per seq (stored exactly once)."""
    for seq in range(count):
        yield orjson.dumps(
            {
                "ts": start_ms + seq,
                "seq": seq,
                "temperature_c": 20.0 + (seq % 50) / 10,
                "humidity_pct": 45.0,
                "setpoint_c": 21.0,
                "mode": "heat",
            }
        )


def _publish_slice(args: tuple[str, int, str, Sequence[str], int, int]) -> int:
    host, port, password, device_ids, per_device, start_ms = args
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(BENCH_USER, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    acked = 0
    total = len(device_ids) * per_device
    all_acked = threading.Event()

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1
        if acked == total:
            all_acked.set()

    client.on_publish = on_publish
    client.connect(host, port)
    client.loop_start()
    generators = [
        (f"devices/{DEVICE_TYPE}/{d}/telemetry", reading_payloads(d, per_device, start_ms))
        for d in device_ids
    ]
    # Interleave devices the way a fleet does, instead of device after device.
    for _ in range(per_device):
        for topic, payloads in generators:
            client.publish(topic, next(payloads), qos=1)
    all_acked.wait(600)
    client.disconnect()
    client.loop_stop()
    return acked


def publish_backlog(
    stack: BenchStack, devices: int, per_device: int, *, processes: int = 4, prefix: str = "b"
) -> tuple[int, float]:
    """Publish devices × per_device QoS 1 readings from several processes; return (acked, seconds)."""
    start_ms = int(time.time() * 1000) - devices * per_device - 60_000
    ids = [f"{prefix}{i:05d}" for i in range(devices)]
    slices = [ids[i::processes] for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        acked = sum(
            pool.map(
                _publish_slice,
                [
                    (stack.mqtt_host, stack.mqtt_port, stack.bench_password, s, per_device, start_ms)
                    for s in slices
                ],
            )
        )
    return acked, time.perf_counter() - started


async def _count(settings: InfluxSettings, measurement: str) -> int:
    async with InfluxClient(settings) as client:
        try:
            # The session probe's readings (device "probe") are not part of the workload.
            query = f'SELECT count("seq") FROM "{measurement}" WHERE "device_id" != \'{PROBE_DEVICE}\''
            rows = list(series_rows(await client.query(query)))
        except Exception:
            return 0
    return int(rows[0]["count"]) if rows else 0


def probe_until_stored(stack: BenchStack, timeout: float = 60.0) -> None:
    """Publish probe readings until one is stored: the consumer's session and subscription are live."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(BENCH_USER, stack.bench_password)
    client.connect(stack.mqtt_host, stack.mqtt_port)
    client.loop_start()
    topic = f"devices/{DEVICE_TYPE}/{PROBE_DEVICE}/telemetry"
    deadline = time.monotonic() + timeout
    seq = 0
    try:
        while time.monotonic() < deadline:
            payload = next(reading_payloads(PROBE_DEVICE, 1, int(time.time() * 1000)))
            client.publish(topic, payload.replace(b'"seq":0', f'"seq":{seq}'.encode()), qos=1)
            seq += 1
            time.sleep(0.5)
            if asyncio.run(_count_probe(stack.influx)) > 0:
                return
        raise TimeoutError(f"the consumer stored no probe reading within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


async def _count_probe(settings: InfluxSettings) -> int:
    async with InfluxClient(settings) as client:
        try:
            query = f'SELECT count("seq") FROM "{DEVICE_TYPE}" WHERE "device_id" = \'{PROBE_DEVICE}\''
            rows = list(series_rows(await client.query(query)))
        except Exception:
            return 0
    return int(rows[0]["count"]) if rows else 0


def precreate_session(
    stack: BenchStack,
    client_id: str,
    topic_filter: str,
    username: str = BENCH_USER,
    password: str | None = None,
) -> None:
    """Create a consumer's persistent MQTT 5 session and subscription, so a backlog queues for it.

    Whatever an earlier session of the same client id still holds (a stopped
    service's session collects every later workload) is discarded first, with a
    clean start: it is not this pipeline's backlog, and a subscriber resuming it
    would receive (and ``mosquitto_sub`` print) every queued reading.
    """
    end_session(stack, client_id, username, password)
    subprocess.run(
        [
            "mosquitto_sub",
            "-h", stack.mqtt_host,
            "-p", str(stack.mqtt_port),
            "-u", username,
            "-P", password or stack.bench_password,
            "-V", "mqttv5",
            "-i", client_id,
            "-c",
            "-x", "86400",
            "-q", "1",
            "-t", topic_filter,
            "-E",
        ],
        check=True,
        timeout=30,
        stdout=subprocess.DEVNULL,  # a benchmark prints progress and results, never payloads
    )  # fmt: skip


def end_session(
    stack: BenchStack, client_id: str, username: str = BENCH_USER, password: str | None = None
) -> None:
    """Discard a persistent session and its queue: connect with clean start (session expiry 0), leave."""
    subprocess.run(
        [
            "mosquitto_sub",
            "-h", stack.mqtt_host,
            "-p", str(stack.mqtt_port),
            "-u", username,
            "-P", password or stack.bench_password,
            "-V", "mqttv5",
            "-i", client_id,
            "-t", f"{client_id}/end-session",  # any topic: -E needs one subscription to exit on
            "-E",
        ],
        # The clean-start CONNECT is the point; the account may not be allowed that subscription
        # (a refusal is harmless here, and errors that matter surface in precreate_session).
        check=False,
        timeout=30,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stored_count(settings: InfluxSettings, measurement: str = DEVICE_TYPE) -> int:
    return asyncio.run(_count(settings, measurement))


def drop_measurement(settings: InfluxSettings, measurement: str = DEVICE_TYPE) -> None:
    httpx.post(
        f"{settings.url}/query",
        data={"q": f'DROP MEASUREMENT "{measurement}"', "db": settings.database},
        timeout=60,
    )


class ProcessSampler:
    """CPU (% of one core) and RSS of some processes and their children, sampled on a thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.5) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.cpu: dict[int, list[float]] = {}
        self.rss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        procs = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                procs.append(proc)
                procs.extend(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return procs

    def _run(self) -> None:
        procs = self._procs()
        for proc in procs:
            try:
                proc.cpu_percent(None)
            except psutil.NoSuchProcess:
                pass
        while not self._stop.wait(self.interval):
            for proc in procs:
                try:
                    self.cpu.setdefault(proc.pid, []).append(proc.cpu_percent(None))
                    self.rss[proc.pid] = max(self.rss.get(proc.pid, 0), proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        """Mean CPU % summed over the processes, and their summed peak RSS in MiB."""
        cpu = sum(sum(v) / len(v) for v in self.cpu.values() if v)
        return {"cpu_pct": round(cpu, 1), "rss_mib": round(sum(self.rss.values()) / 2**20, 1)}


@dataclass
class Drain:
    """How a backlog drained into InfluxDB."""

    expected: int
    stored: int
    seconds: float
    readings_per_s: float
    resources: dict[str, float]

    @property
    def lossless(self) -> bool:
        return self.stored == self.expected


def time_drain(
    settings: InfluxSettings, expected: int, sampler: ProcessSampler, *, timeout: float, poll: float = 0.1
) -> Drain:
    """Poll InfluxDB until ``expected`` points are stored (or no progress for ``timeout`` s).

    The rate is taken between the first stored point and the last, so a slow
    consumer start-up (Node-RED takes seconds) is not counted against it.
    """
    started = time.perf_counter()
    first_at: float | None = None
    first_count = 0
    last_progress = time.perf_counter()
    count = 0
    with sampler:
        while True:
            now_count = stored_count(settings)
            now = time.perf_counter()
            if now_count > count:
                last_progress = now
                if first_at is None:
                    first_at, first_count = now, now_count
            count = now_count
            if count >= expected or now - last_progress > timeout:
                break
            time.sleep(poll)
    end = time.perf_counter()
    if first_at is not None and count > first_count:
        span = end - first_at
        rate = (count - first_count) / span
    else:  # everything landed between two polls: fall back to the consumer's whole run
        span = max(end - started, 1e-6)
        rate = count / span
    return Drain(expected, count, round(span, 2), round(rate), sampler.summary())
