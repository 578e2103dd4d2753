"""Benchmark: bulk provisioning through the registry API, and presence under telemetry load.

Starts its own mosquitto (dynsec) and a real registry process (uvicorn, SQLite
in a temp dir), provisions ``--devices`` devices with one ``POST
/api/v1/devices/bulk``, checks a sample of them can connect, then floods
telemetry from ``--publishers`` of those devices for ``--flood-s`` seconds and
reads the registry's presence counters: how many messages the registry saw
versus sent, and how long its batched last-seen DB writes took.

    .venv/bin/python bench/provisioning.py --devices 10000 --write-docs

Writes the "Registry: bulk provisioning" section of docs/benchmarks.md with
``--write-docs`` (only that section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import replace_section  # noqa: E402
from iotfleet.stack import probes  # noqa: E402
from tests.harness import Broker  # noqa: E402

SECTION = "## Registry: bulk provisioning"


def start_registry(broker: Broker, state_dir: Path, admin_key: str) -> tuple[subprocess.Popen[bytes], str]:
    port = probes.free_port()
    env = dict(os.environ)
    env.update(
        {
            "IOTFLEET_STATE_DIR": str(state_dir),
            "IOTFLEET_MQTT__HOST": broker.host,
            "IOTFLEET_MQTT__PORT": str(broker.port),
            "IOTFLEET_MQTT__USERNAME": "iotfleet-registry",
            "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-registry"],
            "IOTFLEET_REGISTRY__PORT": str(port),
            "IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY": admin_key,
        }
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    log = (state_dir / "registry.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_registry.main"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    probes.wait_until(lambda: probes.http_ok(f"{url}/healthz"), timeout=60, what="registry")
    return proc, url


def device_connects(broker: Broker, creds: dict[str, str]) -> bool:
    """CONNECT with the device's credentials and its pinned client id."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["client_id"], protocol=mqtt.MQTTv5)
    client.username_pw_set(creds["username"], creds["password"])
    outcome: list[bool] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(not reason.is_failure)
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    return bool(outcome and outcome[0])


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def flood(broker: Broker, devices: list[dict[str, object]], seconds: float) -> int:
    """Each device publishes QoS 0 telemetry as fast as paho goes; returns messages sent."""
    sent = [0] * len(devices)
    stop = threading.Event()

    def run(i: int, dev: dict[str, object]) -> None:
        creds = dev["credentials"]
        assert isinstance(creds, dict)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["client_id"], protocol=mqtt.MQTTv5)
        client.username_pw_set(creds["username"], creds["password"])
        client.max_queued_messages_set(0)
        client.connect(broker.host, broker.port)
        client.loop_start()
        topic = dev["topics"]["telemetry"]  # type: ignore[index]
        payload = json.dumps({"temperature_c": 21.5, "humidity_pct": 40.0}).encode()
        while not stop.is_set():
            for _ in range(200):
                client.publish(topic, payload, qos=0)
            sent[i] += 200
            time.sleep(0)
        client.disconnect()
        client.loop_stop()

    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(sent)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--flood-s", type=float, default=10.0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    # SIGTERM runs the finally below (stops the broker and registry we started).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="iotfleet-bench-prov-"))
    broker = Broker(work / "mosquitto")
    admin_key = "ifk_bench-" + secrets.token_urlsafe(16)
    proc: subprocess.Popen[bytes] | None = None
    results: dict[str, object] = {"devices": args.devices}
    try:
        broker.start()
        proc, url = start_registry(broker, work / "registry", admin_key)
        headers = {"Authorization": f"Bearer {admin_key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=3600) as http:
            body = {"devices": [{"type": "thermostat", "tags": {"bench": "1"}} for _ in range(args.devices)]}
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            resp = http.post("/api/v1/devices/bulk", json=body)
            elapsed = time.perf_counter() - started
            # The broker's dynsec work is CPU-bound on one thread: other load on the
            # machine slows it down directly, so the load is part of the figure.
            results["load_avg"] = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
            resp.raise_for_status()
            devices = resp.json()["devices"]
            assert len(devices) == args.devices
            results["bulk_s"] = round(elapsed, 1)
            results["devices_per_s"] = round(args.devices / elapsed, 1)
            print(f"bulk: {args.devices} devices in {elapsed:.1f} s = {args.devices / elapsed:.1f} devices/s")
            dynsec_file = work / "mosquitto" / "dynamic-security.json"
            results["dynsec_file_mb"] = round(dynsec_file.stat().st_size / 1e6, 1)

            # A single create once the broker holds them all: what every later change costs.
            started = time.perf_counter()
            http.post("/api/v1/devices", json={"type": "thermostat"}).raise_for_status()
            results["single_create_after_s"] = round(time.perf_counter() - started, 3)

            sample = [devices[0], devices[len(devices) // 2], devices[-1]]
            for dev in sample:
                creds = dev["credentials"]
                assert device_connects(broker, creds), f"{creds['username']} cannot connect"
            results["sample_connect"] = "ok"

            before = http.get("/metrics").text
            registry_process = psutil.Process(proc.pid)
            registry_process.cpu_percent()
            sent = flood(broker, devices[: args.publishers], args.flood_s)
            results["registry_cpu_pct"] = round(registry_process.cpu_percent())
            time.sleep(2.5)  # let the last flush run (flush interval 1 s)
            after = http.get("/metrics").text
            seen = metric(after, "registry_presence_messages_total") - metric(
                before, "registry_presence_messages_total"
            )
            flushes = metric(after, "registry_presence_flush_seconds_count") - metric(
                before, "registry_presence_flush_seconds_count"
            )
            flush_sum = metric(after, "registry_presence_flush_seconds_sum") - metric(
                before, "registry_presence_flush_seconds_sum"
            )
            results["flood_sent_per_s"] = round(sent / args.flood_s)
            results["flood_seen_per_s"] = round(seen / args.flood_s)
            results["flush_mean_ms"] = round(1000 * flush_sum / max(flushes, 1), 1)
            results["publisher_last_seen"] = http.get(f"/api/v1/devices/{devices[0]['id']}").json()[
                "last_seen"
            ]
            health = http.get("/healthz").json()
            results["healthz"] = health["status"]
            print(json.dumps(results, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.write_docs:
        write_docs(results, args)


def write_docs(results: dict[str, object], args: argparse.Namespace) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    mem_gib = psutil.virtual_memory().total / 2**30
    mosquitto = subprocess.run(
        ["mosquitto", "-h"], check=False, capture_output=True, text=True
    ).stdout.splitlines()[0]
    text = f"""{SECTION}

Measured {time.strftime("%Y-%m-%d")} on {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB,
{platform.platform()}, Python {platform.python_version()}, {mosquitto}, registry DB SQLite.

Command: `.venv/bin/python bench/provisioning.py --devices {args.devices} --publishers {args.publishers}
--flood-s {args.flood_s:g} --write-docs`

| what | result |
|---|---|
| one `POST /api/v1/devices/bulk` of {args.devices:,} devices | {results["bulk_s"]} s = **{results["devices_per_s"]} devices/s** |
| machine load average (1 min) before → after the bulk | {results["load_avg"]} |
| dynsec file after it | {results["dynsec_file_mb"]} MB |
| one more `POST /api/v1/devices` afterwards | {results["single_create_after_s"]} s |
| telemetry flood: {args.publishers} devices publishing QoS 0 as fast as paho goes | {results["flood_sent_per_s"]:,} msg/s handed to paho |
| received by the registry's presence (the broker drops QoS 0 it cannot deliver) | **{results["flood_seen_per_s"]:,} msg/s** |
| mean batched last-seen DB flush | {results["flush_mean_ms"]} ms (once per second) |
| registry process CPU during the flood | {results["registry_cpu_pct"]} % of one core |

Why bulk provisioning is this slow: Mosquitto 2.0.11's dynamic-security plugin
rewrites its whole JSON file after *every* changing command (two per device:
createRole + createClient), even inside one batched control message, so the
cost of provisioning device n grows with n (quadratic in total) and the broker
is blocked during each rewrite. Batching removes the round trips, not the
rewrites; the registry sizes each control message to keep the broker busy
at most ~1 s (at 10,000 devices that is a handful of commands per message),
so other clients' keepalives never expire. The broker's work is single-threaded
and CPU-bound: other load on the machine slows it down directly. Provision
large fleets ahead of time, not during peak telemetry. Presence is not a bottleneck: the registry
takes telemetry at QoS 0 on a shared subscription, counts it in memory and
writes last-seen once per second in one executemany.
"""
    replace_section(SECTION.removeprefix("## "), text.removeprefix(SECTION))
    print(f"wrote docs/benchmarks.md ({SECTION})")


if __name__ == "__main__":
    main()
