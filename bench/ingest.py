"""Ingest benchmark: end-to-end rate and latency, published (QoS 1) -> stored and queryable.

Starts its own mosquitto and influxd (tests/harness.py: free ports, temp dirs),
provisions 1,000 devices, runs the ingest as real subprocesses (1 or more
replicas) and measures:

* ``drained``: the consumer's ceiling. The ingest sessions are created, the
  ingest is stopped, all readings are published into the persistent sessions,
  then the ingest starts and drains the backlog. Rate = readings / (time from
  the first to the last stored reading); zero loss is checked per device.
* ``live``: publishers and ingest run together; ``--rate`` paces the publishers
  (0 = as fast as they go). Rate = readings / (first publish -> last stored).
  Latency publish -> queryable is sampled on probe devices: a poller queries
  InfluxDB every 10 ms for their new readings; a reading's latency is the poll
  time it first appears at minus its ``ts`` (set to the publish time).

Publishers are separate processes with a small asyncio MQTT client (the codec of
iotfleet/mqtt_client.py), so they cost the 2 cores little.

    .venv/bin/python -m bench.ingest --mode drained --replicas 1
    .venv/bin/python -m bench.ingest --mode live --rate 5000 --readings 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from iotfleet import mqtt_client as codec
from iotfleet.stack import probes
from iotfleet.topics import Channel, device_topic
from tests.harness import Broker, Influxd, env_for
from tests.ingest_support import provision_publisher, wait_for

DEVICE_TYPE = "thermostat"
DATABASE = "bench"


# --- publisher processes -------------------------------------------------------------------


class _PubProtocol(asyncio.Protocol):
    def __init__(self, window: int) -> None:
        self.rest = b""
        self.acked = 0
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.free = asyncio.Semaphore(window)
        self.transport: asyncio.Transport | None = None
        self.expected = -1
        self.all_acked = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        data = self.rest + data
        pos = 0
        while len(data) - pos >= 2:
            parsed = codec._read_varint(data, pos + 1)
            if parsed is None:
                break
            length, start = parsed
            if start + length > len(data):
                break
            kind = data[pos] & 0xF0
            if kind == codec.PUBACK:
                reason = data[start + 2] if length > 2 else 0
                if reason >= 0x80:
                    raise RuntimeError(f"publish refused: 0x{reason:02x}")
                self.acked += 1
                self.free.release()
                if self.acked == self.expected:
                    self.all_acked.set()
            elif kind == codec.CONNACK and not self.connack.done():
                self.connack.set_result(data[start + 1])
            pos = start + length
        self.rest = data[pos:]


@dataclass(frozen=True)
class PublisherJob:
    host: str
    port: int
    username: str
    password: str
    device_ids: list[str]
    per_device: int
    rate: float  # this process's share; 0: unpaced
    window: int = 1000  # QoS 1 messages in flight


async def _publish(job: PublisherJob) -> dict[str, float]:
    host, port, username, password = job.host, job.port, job.username, job.password
    device_ids, per_device, rate, window = job.device_ids, job.per_device, job.rate, job.window
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: _PubProtocol(window), host, port)
    assert proto.transport is not None
    proto.transport.write(
        codec.connect_packet(
            f"bench-{username}",
            username=username,
            password=password,
            keepalive_s=60,
            session_expiry_s=0,
            receive_maximum=100,
        )
    )
    if await proto.connack:
        raise RuntimeError("publisher refused")
    topics = [device_topic(DEVICE_TYPE, d, Channel.TELEMETRY) for d in device_ids]
    total = len(topics) * per_device
    started = time.time()
    sent = 0
    packet_id = 0
    last_ts = [0] * len(topics)
    for seq in range(per_device):
        for index, topic in enumerate(topics):
            await proto.free.acquire()
            now_ms = int(time.time() * 1000)
            ts = max(now_ms, last_ts[index] + 1)  # unique per device: one point each
            last_ts[index] = ts
            payload = orjson.dumps(
                {
                    "ts": ts,
                    "seq": seq,
                    "temperature_c": 20.0 + (seq % 50) / 10,
                    "humidity_pct": 45.5,
                    "setpoint_c": 21.0,
                    "mode": "heat",
                }
            )
            packet_id = packet_id % 0xFFFF + 1
            proto.transport.write(codec.publish_packet(topic, payload, qos=1, packet_id=packet_id))
            sent += 1
            if rate and sent % 20 == 0:
                ahead = started + sent / rate - time.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
    proto.expected = total
    if proto.acked < total:
        await proto.all_acked.wait()
    finished = time.time()
    proto.transport.write(b"\xe0\x00")
    proto.transport.close()
    return {"started": started, "finished": finished, "published": total}


def _publisher_main(job: PublisherJob, out: Any) -> None:
    out.put(asyncio.run(_publish(job)))


def publish_all(
    broker: Broker, accounts: list[tuple[str, str, list[str]]], per_device: int, rate: float
) -> list[dict[str, float]]:
    """One process per account; ``rate`` is the total rate (0: unpaced)."""
    queue: multiprocessing.Queue[dict[str, float]] = multiprocessing.Queue()
    share = rate / len(accounts) if rate else 0
    procs = [
        multiprocessing.Process(
            target=_publisher_main,
            args=(PublisherJob(broker.host, broker.port, user, pw, devices, per_device, share), queue),
        )
        for user, pw, devices in accounts
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return results


# --- ingest processes ----------------------------------------------------------------------


class Ingest:
    def __init__(self, broker: Broker, influxd: Influxd, state: Path, replica: str, transport: str) -> None:
        self.env = env_for(broker, influxd, DATABASE, state)
        self.health_port = probes.free_port()
        self.env.update(
            {
                "IOTFLEET_MQTT__USERNAME": "iotfleet-ingest",
                "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-ingest"],
                "IOTFLEET_INGEST__DEVICE_TYPE": DEVICE_TYPE,
                "IOTFLEET_INGEST__REPLICA": replica,
                "IOTFLEET_INGEST__TRANSPORT": transport,
                "IOTFLEET_HEALTH__PORT": str(self.health_port),
            }
        )
        self.log = state / f"ingest-{replica}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile = os.environ.get("BENCH_PYSPY")
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self, profile: bool = False) -> Ingest:
        argv = [sys.executable, "-m", "telemetry_ingest.runner"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if profile:
            self.attach_profiler("drained")
        return self

    def attach_profiler(self, tag: str) -> None:
        """py-spy on the measured process only (BENCH_PYSPY=prefix); it writes when the process exits."""
        if not self.profile or self.proc is None:
            return
        self.spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(self.proc.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "-o",
                f"{self.profile}-{tag}-{self.env['IOTFLEET_INGEST__REPLICA']}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        if self.spy is not None:
            self.spy.wait(timeout=60)
            self.spy = None

    def stored(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("iotfleet_ingest_stored_readings_total{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


# --- measuring -----------------------------------------------------------------------------


def query(influxd: Influxd, q: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{influxd.url}/query", data={"q": q, "db": DATABASE, "epoch": "ms"}, timeout=30)
    rows: list[dict[str, Any]] = []
    for result in response.json().get("results", []):
        for series in result.get("series", []):
            for values in series.get("values", []):
                row = dict(zip(series["columns"], values, strict=True))
                row.update(series.get("tags", {}))
                rows.append(row)
    return rows


def stored_count(influxd: Influxd) -> int:
    rows = query(influxd, f'SELECT count("seq") FROM "{DEVICE_TYPE}"')
    return int(rows[0]["count"]) if rows else 0


def check_complete(influxd: Influxd, device_ids: list[str], per_device: int) -> dict[str, int]:
    rows = query(
        influxd, f'SELECT count("seq"), min("seq"), max("seq") FROM "{DEVICE_TYPE}" GROUP BY device_id'
    )
    found = {r["device_id"]: r for r in rows}
    bad = {
        d: int(found.get(d, {}).get("count", 0))
        for d in device_ids
        if not (
            d in found
            and found[d]["count"] == per_device
            and found[d]["min"] == 0
            and found[d]["max"] == per_device - 1
        )
    }
    return bad


class LatencyProbe:
    """Polls probe devices' new readings; latency = first poll that sees a reading - its ts."""

    def __init__(self, influxd: Influxd, probe_ids: list[str]) -> None:
        self.influxd = influxd
        self.regex = "|".join(probe_ids)
        self.samples: list[float] = []
        self.seen: dict[str, int] = {}
        self.since_ms = int(time.time() * 1000) - 1000
        self.stop = False

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop:
                q = (
                    f'SELECT "seq" FROM "{DEVICE_TYPE}" WHERE device_id =~ /^({self.regex})$/ '
                    f"AND time > {self.since_ms}ms GROUP BY device_id"
                )
                response = http.post(
                    f"{self.influxd.url}/query", data={"q": q, "db": DATABASE, "epoch": "ms"}
                )
                # After the answer: an upper bound of when the readings became queryable.
                polled = time.time() * 1000
                for result in response.json().get("results", []):
                    for series in result.get("series", []):
                        device = series["tags"]["device_id"]
                        for ts, seq in series["values"]:
                            if seq > self.seen.get(device, -1):
                                self.samples.append(polled - ts)
                                self.seen[device] = seq
                newest = min(self.seen.values()) if len(self.seen) == len(self.regex.split("|")) else None
                if newest is not None:
                    self.since_ms = max(self.since_ms, int(polled) - 5000)
                time.sleep(0.01)

    def percentiles(self) -> dict[str, float]:
        if not self.samples:
            return {}
        ordered = sorted(self.samples)
        return {
            "samples": len(ordered),
            "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max_ms": ordered[-1],
            "mean_ms": statistics.fmean(ordered),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import threading

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = Broker(work / "mosquitto")
    influxd = Influxd(work / "influxd")
    broker.start()
    influxd.start()
    ingests: list[Ingest] = []
    try:
        device_ids = [f"bench-{i:04d}" for i in range(args.devices)]
        per_device = args.readings // args.devices
        total = per_device * args.devices
        chunk = (len(device_ids) + args.publishers - 1) // args.publishers
        accounts = []
        for start in range(0, len(device_ids), chunk):
            slice_ = device_ids[start : start + chunk]
            user, pw = provision_publisher(broker, DEVICE_TYPE, slice_)
            accounts.append((user, pw, slice_))
        ingests = [
            Ingest(broker, influxd, work / "ingest", str(r), args.transport) for r in range(args.replicas)
        ]
        (work / "ingest").mkdir(exist_ok=True)
        for ingest in ingests:
            ingest.start()
        wait_for(lambda: all(i.healthy() for i in ingests), timeout=30, what="ingest healthy")
        result: dict[str, Any] = {
            "load_average_1m_at_start": os.getloadavg()[0],
            "mode": args.mode,
            "replicas": args.replicas,
            "transport": args.transport,
            "readings": total,
            "devices": args.devices,
            "publishers": len(accounts),
            "rate_target": args.rate,
        }
        if args.mode == "drained":
            for ingest in ingests:  # sessions exist now; stop consuming
                ingest.stop()
            pubs = publish_all(broker, accounts, per_device, 0)
            result["publish_rate"] = total / (
                max(p["finished"] for p in pubs) - min(p["started"] for p in pubs)
            )
            started = time.time()
            for ingest in ingests:
                ingest.start(profile=True)
            first = None
            while True:
                count = stored_count(influxd)
                if count and first is None:
                    first = time.time()
                if count >= total:
                    break
                if time.time() - started > 600:
                    raise TimeoutError(f"only {count} of {total} stored")
                time.sleep(0.05)
            done = time.time()
            assert first is not None
            result["seconds_start_to_all_stored"] = done - started
            result["rate"] = total / (done - first)
        else:
            probe = LatencyProbe(influxd, device_ids[:: max(1, args.devices // 20)])
            poller = threading.Thread(target=probe.run, daemon=True)
            poller.start()
            for ingest in ingests:
                ingest.attach_profiler("live")
            pubs = publish_all(broker, accounts, per_device, args.rate)
            t0 = min(p["started"] for p in pubs)
            result["publish_rate"] = total / (max(p["finished"] for p in pubs) - t0)
            wait_for(lambda: stored_count(influxd) >= total, timeout=600, what="all stored", interval=0.05)
            done = time.time()
            result["rate"] = total / (done - t0)
            time.sleep(0.3)
            probe.stop = True
            poller.join(timeout=5)
            result["latency"] = probe.percentiles()
        missing = check_complete(influxd, device_ids, per_device)
        result["devices_incomplete"] = len(missing)
        result["stored"] = stored_count(influxd)
        result["per_replica_stored"] = [i.stored() for i in ingests]
        result["machine"] = (
            f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
        )
        # The 2 cores are shared with the broker, InfluxDB, the publishers — and whatever else runs.
        result["load_average_1m_at_end"] = os.getloadavg()[0]
        return result
    finally:
        for ingest in ingests:
            ingest.stop()
        broker.stop()
        influxd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("drained", "live"), default="drained")
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes")
    parser.add_argument("--rate", type=float, default=0, help="live: total publish rate (0: unpaced)")
    parser.add_argument("--transport", choices=("fast", "paho"), default="fast")
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
