"""The pipelines compared by the suite, each measured on the same BenchStack and workload."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx

from bench.workload import (
    BENCH_USER,
    DEVICE_TYPE,
    BenchStack,
    Drain,
    ProcessSampler,
    drop_measurement,
    end_session,
    precreate_session,
    probe_until_stored,
    publish_backlog,
    reading_payloads,
    stored_count,
    time_drain,
)
from iotfleet.influx import InfluxClient
from iotfleet.stack import probes

NODE_RED_HOME = Path(
    os.environ.get("IOTFLEET_BENCH_NODE_RED", Path.home() / ".cache" / "iotfleet-bench" / "node-red")
)
TELEMETRY_FILTER = f"devices/{DEVICE_TYPE}/+/telemetry"


# --- the machine's limits -------------------------------------------------------


def broker_passthrough(
    stack: BenchStack, qos: int, messages: int, *, drained: bool = False, publishers: int = 4
) -> dict[str, Any]:
    """Mosquitto delivering to one subscriber, C clients on both ends (mosquitto_pub -l / mosquitto_sub).

    Live: the subscriber's persistent session exists first (no subscribe race),
    then publishers and subscriber run together; timed until it received all.
    Drained (QoS 1): the backlog is queued in the subscriber's offline session
    first, then the subscriber alone is timed — the broker's delivery ceiling
    under the same conditions as the pipelines' drains.
    """
    auth = ["-h", stack.mqtt_host, "-p", str(stack.mqtt_port), "-u", BENCH_USER, "-P", stack.bench_password]
    client_id = f"passthrough-q{qos}-{time.monotonic_ns()}"
    topic = f"devices/{DEVICE_TYPE}/+/telemetry"
    subscribe = ["mosquitto_sub", *auth, "-i", client_id, "-c", "-q", str(qos), "-t", topic]
    subprocess.run([*subscribe, "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    payload = next(reading_payloads("x", 1, int(time.time() * 1000))).decode()
    per_publisher = messages // publishers
    total = per_publisher * publishers
    with tempfile.NamedTemporaryFile("w", suffix=".lines", delete=False) as lines:
        lines.write((payload + "\n") * per_publisher)

    def publish() -> list[subprocess.Popen[bytes]]:
        return [
            subprocess.Popen(
                [
                    "mosquitto_pub",
                    *auth,
                    "-q",
                    str(qos),
                    "-M",
                    "1000",
                    "-l",
                    "-t",
                    f"devices/{DEVICE_TYPE}/pt{i}/telemetry",
                ],
                stdin=open(lines.name, "rb"),
            )
            for i in range(publishers)
        ]

    senders: list[subprocess.Popen[bytes]] = []
    if drained:
        for sender in publish():
            sender.wait(timeout=300)
    started = time.perf_counter()
    receiver = subprocess.Popen([*subscribe, "-C", str(total)], stdout=subprocess.DEVNULL)
    if not drained:
        senders = publish()
    with ProcessSampler([receiver.pid, *[s.pid for s in senders]]) as sampler:
        try:
            receiver.wait(timeout=300)
        finally:
            for sender in senders:
                sender.wait(timeout=60)
    seconds = time.perf_counter() - started
    os.unlink(lines.name)
    # The persistent session would otherwise queue every later workload (broker memory and CPU).
    end_session(stack, client_id)
    return {
        "messages": total,
        "seconds": round(seconds, 2),
        "msg_per_s": round(total / seconds),
        **sampler.summary(),
    }


def influx_raw_write(stack: BenchStack, points: int, batch: int = 10_000, writers: int = 2) -> dict[str, Any]:
    """InfluxDB's own ceiling: large line-protocol batches from concurrent writers, no MQTT."""
    drop_measurement(stack.influx)
    base_ms = int(time.time() * 1000) - points - 60_000
    bodies = []
    for start in range(0, points, batch):
        lines = [
            f"{DEVICE_TYPE},device_id=raw{(i % 1000):05d} temperature_c={20 + i % 50 / 10},humidity_pct=45,"
            f'setpoint_c=21,mode="heat",seq={i}i {base_ms + i}'
            for i in range(start, min(start + batch, points))
        ]
        bodies.append("\n".join(lines).encode())

    async def write_all() -> float:
        async with InfluxClient(stack.influx, max_connections=writers) as client:
            queue = list(bodies)
            started = time.perf_counter()

            async def writer() -> None:
                while queue:
                    await client.write(queue.pop())

            await asyncio.gather(*(writer() for _ in range(writers)))
            return time.perf_counter() - started

    influxd_pid = [p.pid for p in stack.stack.status() if p.name == "influxd"]
    with ProcessSampler(influxd_pid) as sampler:
        seconds = asyncio.run(write_all())
    stored = stored_count(stack.influx)
    drop_measurement(stack.influx)
    return {
        "points": points,
        "stored": stored,
        "seconds": round(seconds, 2),
        "points_per_s": round(points / seconds),
        **sampler.summary(),
    }


# --- consumers of the backlog ----------------------------------------------------


def _prepare_backlog(stack: BenchStack, devices: int, per_device: int, start_consumer_session: Any) -> int:
    """Create the consumer's session (start it, see it store a probe, stop it), then fill the backlog."""
    # Each pipeline starts from an empty measurement: Node-RED writes seq as a
    # float where the others write an integer, and InfluxDB refuses a type change.
    drop_measurement(stack.influx)
    start_consumer_session()
    drop_measurement(stack.influx)
    acked, seconds = publish_backlog(stack, devices, per_device)
    print(f"    backlog: {acked} readings published (QoS 1, acked) in {seconds:.1f} s", flush=True)
    return acked


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _child_log(stack: BenchStack, name: str) -> IO[bytes]:
    """A consumer's output goes to the stack's logs, not the benchmark's console (progress and results only)."""
    stack.stack.layout.logs.mkdir(parents=True, exist_ok=True)
    return (stack.stack.layout.logs / f"{name}.log").open("ab")


def _result(name: str, drain: Drain, **extra: Any) -> dict[str, Any]:
    return {
        "pipeline": name,
        "readings": drain.expected,
        "stored": drain.stored,
        "lossless": drain.lossless,
        "seconds": drain.seconds,
        "readings_per_s": drain.readings_per_s,
        **drain.resources,
        **extra,
    }


NAIVE_SUBSCRIBER = r"""
import sys, orjson, httpx, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, user, pw, url, db = sys.argv[1:7]
http = httpx.Client(base_url=url)
def on_message(c, u, m):
    r = orjson.loads(m.payload)
    dev = m.topic.split("/")[2]
    line = (f"thermostat,device_id={dev} temperature_c={r['temperature_c']},humidity_pct={r['humidity_pct']},"
            f"setpoint_c={r['setpoint_c']},mode=\"{r['mode']}\",seq={r['seq']}i {r['ts']}")
    http.post("/write", params={"db": db, "precision": "ms"}, content=line)
def on_connect(c, u, f, rc, p):
    c.subscribe("devices/thermostat/+/telemetry", qos=1)
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-bench", clean_session=False)
c.username_pw_set(user, pw)
c.on_message, c.on_connect = on_message, on_connect
c.connect(host, int(port))
c.loop_forever()
"""


def naive_python(stack: BenchStack, devices: int, per_device: int) -> dict[str, Any]:
    """The floor: a paho subscriber writing each reading with its own HTTP request."""
    args = [
        stack.mqtt_host,
        str(stack.mqtt_port),
        BENCH_USER,
        stack.bench_password,
        stack.influx.url,
        stack.influx.database,
    ]
    argv = [sys.executable, "-c", NAIVE_SUBSCRIBER, *args]

    log = _child_log(stack, "naive-python")

    def create_session() -> None:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            probe_until_stored(stack)
        finally:
            _stop(proc)

    expected = _prepare_backlog(stack, devices, per_device, create_session)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        drain = time_drain(stack.influx, expected, ProcessSampler([proc.pid]), timeout=20)
    finally:
        _stop(proc)
    return _result("naive Python (paho + one HTTP write per reading)", drain)


def node_red_available() -> bool:
    return (NODE_RED_HOME / "node_modules" / ".bin" / "node-red").exists()


def install_node_red() -> None:
    """Node-RED 4 and node-red-contrib-influxdb, outside the repository (never by the tests)."""
    if node_red_available():
        return
    NODE_RED_HOME.mkdir(parents=True, exist_ok=True)
    print(f"    installing node-red@4 + node-red-contrib-influxdb into {NODE_RED_HOME} (npm)", flush=True)
    subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "node-red@4",
            "node-red-contrib-influxdb@0.7",
        ],
        cwd=NODE_RED_HOME,
        check=True,
        timeout=600,
    )


def _node_red_flow(stack: BenchStack, batched: bool) -> list[dict[str, Any]]:
    """The flow users build: mqtt in → json → (shape the point) → influxdb batch.

    ``batched`` adds a join node (1,000 messages or 200 ms) before the write:
    Node-RED's best flow; without it each reading is one HTTP write.
    """
    to_point = (
        "const d = msg.topic.split('/')[2]; const r = msg.payload;"
        "msg.payload = [{measurement: 'thermostat', tags: {device_id: d},"
        " fields: {temperature_c: r.temperature_c, humidity_pct: r.humidity_pct, setpoint_c: r.setpoint_c,"
        " mode: r.mode, seq: r.seq}, timestamp: new Date(r.ts)}]; return msg;"
    )
    nodes: list[dict[str, Any]] = [
        {"id": "f1a0000000000001", "type": "tab", "label": "bench"},
        {
            "id": "c0a0000000000002",
            "type": "mqtt-broker",
            "broker": stack.mqtt_host,
            "port": str(stack.mqtt_port),
            "clientid": "node-red-bench",
            "protocolVersion": "5",
            "cleansession": False,
            "sessionExpiry": "3600",
            "keepalive": "60",
        },
        {
            "id": "c0a0000000000003",
            "type": "influxdb",
            "hostname": "127.0.0.1",
            "port": str(stack.influx.url.rsplit(":", 1)[1]),
            "database": stack.influx.database,
            "influxdbVersion": "1.x",
            "name": "bench",
            "usetls": False,
        },
        {
            "id": "n0a0000000000004",
            "type": "mqtt in",
            "z": "f1a0000000000001",
            "topic": TELEMETRY_FILTER,
            "qos": "1",
            "datatype": "json",
            "broker": "c0a0000000000002",
            "nl": False,
            "rap": False,
            "inputs": 0,
            "wires": [["n0a0000000000005"]],
        },
        {
            "id": "n0a0000000000005",
            "type": "function",
            "z": "f1a0000000000001",
            "func": to_point,
            "outputs": 1,
            "wires": [["n0a0000000000007" if batched else "n0a0000000000006"]],
        },
        {
            "id": "n0a0000000000006",
            "type": "influxdb batch",
            "z": "f1a0000000000001",
            "influxdb": "c0a0000000000003",
            "precision": "ms",
            "retentionPolicy": "",
            "wires": [],
        },
    ]
    if batched:
        nodes += [
            {
                "id": "n0a0000000000007",
                "type": "join",
                "z": "f1a0000000000001",
                "mode": "custom",
                "build": "array",
                "property": "payload",
                "propertyType": "msg",
                "count": "1000",
                "timeout": "0.2",
                "joiner": "\\n",
                "joinerType": "str",
                "accumulate": False,
                "wires": [["n0a0000000000008"]],
            },
            {
                "id": "n0a0000000000008",
                "type": "function",
                "z": "f1a0000000000001",
                "func": "msg.payload = msg.payload.flat(); return msg;",
                "outputs": 1,
                "wires": [["n0a0000000000006"]],
            },
        ]
    return nodes


def node_red(stack: BenchStack, devices: int, per_device: int, *, batched: bool) -> dict[str, Any]:
    """Node-RED 4 draining the backlog with the usual flow (or its batched best flow)."""
    install_node_red()
    user_dir = Path(tempfile.mkdtemp(prefix="nodered-bench-"))
    port = probes.free_port()
    flows = _node_red_flow(stack, batched)
    (user_dir / "flows.json").write_text(json.dumps(flows))
    # Node-RED finds extra nodes (node-red-contrib-influxdb) in the user dir's node_modules.
    (user_dir / "node_modules").symlink_to(NODE_RED_HOME / "node_modules")
    # With credentialSecret false Node-RED reads credentials, unencrypted, from here.
    (user_dir / "flows_cred.json").write_text(
        json.dumps({"c0a0000000000002": {"user": BENCH_USER, "password": stack.bench_password}})
    )
    (user_dir / "settings.js").write_text(
        f"module.exports = {{uiPort: {port}, uiHost: '127.0.0.1', flowFile: 'flows.json', credentialSecret: false,"
        " logging: {console: {level: 'info'}}, editorTheme: {tours: false}, telemetry: {enabled: false}};"
    )
    argv = [
        str(NODE_RED_HOME / "node_modules" / ".bin" / "node-red"),
        "--userDir",
        str(user_dir),
        "--settings",
        str(user_dir / "settings.js"),
    ]

    log = (stack.stack.layout.logs / "node-red.log").open("ab")

    def create_session() -> None:
        # First prove the flow works end to end (a probe reading gets stored), then
        # (re)create its session with the same client id, so the backlog queues for it.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            probe_until_stored(stack)
        finally:
            _stop(proc)
        precreate_session(stack, "node-red-bench", TELEMETRY_FILTER)

    expected = _prepare_backlog(stack, devices, per_device, create_session)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        drain = time_drain(stack.influx, expected, ProcessSampler([proc.pid]), timeout=30)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(user_dir, ignore_errors=True)
    name = (
        "Node-RED 4: mqtt in → json → join(1000) → influxdb batch"
        if batched
        else "Node-RED 4: mqtt in → json → influxdb batch"
    )
    return _result(name, drain)


def iotfleet_ingest(stack: BenchStack, devices: int, per_device: int, *, replicas: int) -> dict[str, Any]:
    """iotfleet's ingest (validation, batching, manual acks after InfluxDB accepted), 1 or 2 replicas."""
    script = Path(sys.executable).parent / "iotfleet-ingest"

    def start(index: int) -> subprocess.Popen[bytes]:
        env = stack.service_env(
            "iotfleet-ingest",
            IOTFLEET_INGEST__DEVICE_TYPE=DEVICE_TYPE,
            IOTFLEET_HEALTH__PORT=str(probes.free_port()),
            IOTFLEET_INGEST__REPLICA=str(index),
        )
        log = _child_log(stack, f"bench-ingest-{index}")
        return subprocess.Popen(
            [str(script), "--type", DEVICE_TYPE], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def create_sessions() -> None:
        procs = [start(i) for i in range(replicas)]
        try:
            probe_until_stored(stack)
        finally:
            for proc in procs:
                _stop(proc)
        # Every replica's session must exist before the backlog is published, or
        # the broker would hand the whole backlog to the first one.
        for index in range(replicas):
            precreate_session(
                stack,
                f"ingest-{DEVICE_TYPE}-{index}",
                f"$share/ingest-{DEVICE_TYPE}/{TELEMETRY_FILTER}",
                "iotfleet-ingest",
                stack.passwords()["iotfleet-ingest"],
            )

    expected = _prepare_backlog(stack, devices, per_device, create_sessions)
    procs = [start(i) for i in range(replicas)]
    try:
        drain = time_drain(stack.influx, expected, ProcessSampler([p.pid for p in procs]), timeout=30)
    finally:
        for proc in procs:
            _stop(proc)
    return _result(
        f"iotfleet ingest ({replicas} replica{'s' if replicas > 1 else ''})", drain, replicas=replicas
    )


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 300
    except httpx.HTTPError:
        return False
