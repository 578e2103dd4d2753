"""Simulator fleet benchmark: scale (10,000 devices, one process, --verify) and publish capacity.

Writes the "Simulator fleet: scale and publish capacity" section of
docs/benchmarks.md (and nothing else) plus bench/results/simulator.json.

1. Scale: a broker seeded with N devices, InfluxDB and the four ingest
   services; ``python -m simulators`` (the real CLI, ONE process) runs N
   devices publishing every 10 s for 5 minutes at QoS 1 with ``--verify``.
   Reported: peak connected, RSS of the simulator process per device
   (whole-process RSS / devices: the interpreter's baseline is included),
   readings published / broker-acked / stored, missing and duplicate seq.
2. Capacity: the same CLI, one process, against the broker alone (no
   subscriber, so the simulator and not the ingest is the limit), devices
   publishing faster than one process can: the achieved broker-acked QoS 1
   readings/s. Also with batches of 10 readings per message.
3. The naive design for comparison: one aiomqtt client per device, each
   publishing QoS 1 as fast as it can, in one process.

Usage: ``python bench/simulator.py`` (≈ 9 minutes) or ``--quick`` (≈ 1 minute,
1,000 devices for 60 s; does not update docs unless --write-docs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import psutil  # noqa: E402

from bench.report import replace_section  # noqa: E402
from simulators.fleet import DeviceCredentials  # noqa: E402
from simulators.provisioning import save_credentials, spread  # noqa: E402
from simulators.worker import raise_fd_limit  # noqa: E402
from tests.devices import seed_broker  # noqa: E402
from tests.harness import Broker, Influxd  # noqa: E402
from tests.ingest_support import IngestProcess  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "Simulator fleet: scale and publish capacity"
RESULTS = ROOT / "bench" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_cli(args: list[str], env: dict[str, str], report: Path) -> dict[str, Any]:
    """The real CLI as a child process (its own RSS), progress lines passed through."""
    argv = [sys.executable, "-m", "simulators", *args, "--report", str(report)]
    shown = [
        "***"
        if prev == "--observer-password"
        else "--observer-password=***"
        if a.startswith("--observer-password=")
        else a
        for prev, a in zip(["", *argv], argv, strict=False)
    ]
    log("$ " + " ".join(a if len(a) < 60 else a[:57] + "..." for a in shown[1:]))
    proc = subprocess.run(argv, cwd=ROOT, env=env, check=False)
    if not report.exists():
        raise RuntimeError(f"simulator exited {proc.returncode} without a report")
    data: dict[str, Any] = json.loads(report.read_text())
    data["exit_code"] = proc.returncode
    return data


def seeded(state: Path, devices: list[tuple[str, str]]) -> tuple[Broker, list[DeviceCredentials]]:
    broker = Broker(state)
    passwords = seed_broker(broker, devices)
    broker.start()
    return broker, [DeviceCredentials(i, t, i, passwords[i], i) for t, i in devices]


def scale(work: Path, devices_n: int, duration: str) -> dict[str, Any]:
    devices = [
        (t, f"scale-{t.replace('_', '-')}-{i:05d}") for t, n in spread(devices_n).items() for i in range(n)
    ]
    broker, creds = seeded(work / "mosquitto", devices)
    influxd = Influxd(work / "influxd").start()
    ingests: list[IngestProcess] = []
    try:
        save_credentials(work / "scale-credentials.json", creds)
        for device_type in spread(4):
            ingest = IngestProcess(
                broker, influxd, "bench_sim", work / f"ingest-{device_type}", device_type=device_type
            )
            ingests.append(ingest.start())
        for ingest in ingests:
            ingest.wait_healthy(timeout=60)
        env = _env(broker, influxd, "bench_sim", work)
        report = run_cli(
            [
                "--devices",
                str(devices_n),
                "--duration",
                duration,
                "--interval",
                "10s",
                "--ramp-up",
                "1000",
                "--qos",
                "1",
                "--credentials",
                str(work / "scale-credentials.json"),
                "--observer-user",
                "iotfleet-registry",
                f"--observer-password={broker.passwords['iotfleet-registry']}",  # may start with "-"
                "--verify",
                "--verify-source",
                "influx",
                "--verify-timeout",
                "120s",
                "--state-dir",
                str(work / "state"),
            ],
            env,
            work / "scale-report.json",
        )
        report["broker_rss_bytes"] = (
            psutil.Process(broker.process.pid).memory_info().rss if broker.process else 0
        )
        return report
    finally:
        for ingest in ingests:
            ingest.terminate()
        influxd.stop()
        broker.stop()


def capacity(work: Path, devices_n: int, interval: str, batch: int, seconds: int) -> dict[str, Any]:
    devices = [
        (t, f"cap-{t.replace('_', '-')}-{i:05d}") for t, n in spread(devices_n).items() for i in range(n)
    ]
    broker, creds = seeded(work / f"mosquitto-cap-{batch}", devices)
    try:
        save_credentials(work / "cap-credentials.json", creds)
        env = _env(broker, None, "none", work)
        load_before = os.getloadavg()[0]
        result = run_cli(
            [
                "--devices",
                str(devices_n),
                "--duration",
                f"{seconds}s",
                "--interval",
                interval,
                "--jitter",
                "0",
                "--batch",
                str(batch),
                "--ramp-up",
                "5000",
                "--qos",
                "1",
                # No subscriber here on purpose: PUBACK 0x10 is the broker's answer, not a reason to resend.
                "--no-resend-unrouted",
                "--credentials",
                str(work / "cap-credentials.json"),
                "--no-observer",
                "--state-dir",
                str(work / "state"),
            ],
            env,
            work / f"capacity-{batch}.json",
        )
        # Other work on the machine takes CPU from the simulator and the broker: say how much.
        result["load_average"] = round(max(load_before, os.getloadavg()[0]), 1)
        return result
    finally:
        broker.stop()


async def _naive(broker: Broker, creds: list[DeviceCredentials], seconds: float) -> dict[str, Any]:
    """One aiomqtt client per device, each publishing QoS 1 back to back (awaiting each PUBACK)."""
    acked = 0
    stop = asyncio.Event()
    connected = 0

    async def device(c: DeviceCredentials) -> None:
        nonlocal acked, connected
        topic = f"devices/{c.type}/{c.id}/telemetry"
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username=c.username,
            password=c.password,
            identifier=c.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            connected += 1
            seq = 0
            while not stop.is_set():
                await client.publish(topic, b'{"seq":%d,"power_w":1.0}' % seq, qos=1)
                seq += 1
                acked += 1

    tasks = [asyncio.create_task(device(c)) for c in creds]
    await asyncio.sleep(3.0)  # connect
    start_acked, started = acked, time.monotonic()
    await asyncio.sleep(seconds)
    rate = (acked - start_acked) / (time.monotonic() - started)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"clients": len(creds), "connected": connected, "acked_per_s": round(rate)}


def naive(work: Path, devices_n: int, seconds: float) -> dict[str, Any]:
    devices = [("smart_plug", f"naive-{i:05d}") for i in range(devices_n)]
    broker, creds = seeded(work / "mosquitto-naive", devices)
    try:
        rss0 = psutil.Process().memory_info().rss
        load_before = os.getloadavg()[0]
        result = asyncio.run(_naive(broker, creds, seconds))
        result["load_average"] = round(max(load_before, os.getloadavg()[0]), 1)
        result["rss_growth_per_client_bytes"] = round((psutil.Process().memory_info().rss - rss0) / devices_n)
        return result
    finally:
        broker.stop()


def _env(broker: Broker, influxd: Influxd | None, database: str, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "IOTFLEET_STATE_DIR": str(work / "state"),
            "IOTFLEET_MQTT__HOST": broker.host,
            "IOTFLEET_MQTT__PORT": str(broker.port),
            "IOTFLEET_INFLUX__DATABASE": database,
        }
    )
    if influxd is not None:
        env["IOTFLEET_INFLUX__URL"] = influxd.url
    return env


def render(results: dict[str, Any], command: str) -> str:
    s = results["scale"]
    v = s.get("verify", {})
    pub = s["published"]
    caps = results["capacity"]
    naive_result = results["naive"]
    m = results["machine"]
    lines = [
        f"Measured {results['date']} on {m['cpus']} cores, {m['memory_gib']} GiB, Python {m['python']},"
        f" {m['mosquitto']}. Command: `{command}` (≈ {results['wall_s'] / 60:.0f} min).",
        "",
        "**Design.** Each simulated device is one MQTT connection driven by a lean asyncio MQTT 5"
        " client of our own (`simulators/mqtt.py`: an `asyncio.Protocol` per connection, no task,"
        " no queue, no lock and no timer handle per device: a fleet-wide timing wheel drives the"
        " publishes; counters shared per process). A fleet of one aiomqtt client per device is"
        " measured alongside for comparison.",
        "",
        "**Scale** — one simulator process, every device publishing one reading every 10 s (QoS 1)"
        " through mosquitto to the four ingest services and InfluxDB, then `--verify` reads every"
        " stored `seq` back:",
        "",
        "| devices | duration | connected | RSS of the simulator process | per device |"
        " published | broker-acked | stored | missing | duplicate seq |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['devices']:,} | {s['duration_s']:,.0f} s | {s['connections']['connects'] - s['connections']['reconnects']:,}"
        f" | {s['resources']['rss_bytes'] / 2**20:,.0f} MiB | {s['resources']['rss_per_device_bytes'] / 1024:.1f} KiB"
        f" | {pub['readings']:,} | {pub['broker_acked']:,} | {v.get('stored', 0):,} | {v.get('missing', '?')}"
        f" | {v.get('duplicates', '?')} |",
        "",
        f"Connect failures: {s['connections']['connect_failures']}; verification source: {v.get('source', '?')}"
        f" (waited {v.get('waited_s', 0)} s for the ingest to flush). RSS per device is the whole"
        " process (interpreter, libraries, observer) divided by the devices: the budget is 20 KB.",
        "",
        "**Publish capacity** — one simulator process against the broker alone (no subscriber: the"
        " simulator, not the ingest, is the limit), devices offered more than one process can send;"
        " achieved rate over the whole run including ramp-up and drain:",
        "",
        "| design | devices | interval | readings per message | QoS | offered readings/s |"
        " achieved readings/s (broker-acked, whole run) | peak readings/s (1 s window) | machine load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cap in caps:
        cpub = cap["published"]
        cset = cap["settings"]
        offered = cap["devices"] * cset["batch"] / cset["interval_s"]
        lines.append(
            f"| iotfleet simulator (lean client) | {cap['devices']:,} | {cset['interval_s'] * 1000:.0f} ms"
            f" | {cset['batch']} | 1 | {offered:,.0f} | {cpub['broker_acked'] / cap['duration_s']:,.0f}"
            f" | {cpub['peak_rate_per_s']:,.0f} | {cap.get('load_average', '?')} |"
        )
    lines.append(
        f"| one aiomqtt client per device | {naive_result['clients']:,} | back to back | 1 | 1 | –"
        f" | {naive_result['acked_per_s']:,} | – | {naive_result.get('load_average', '?')} |"
    )
    lines += [
        "",
        f"The naive fleet also costs {naive_result['rss_growth_per_client_bytes'] / 1024:.1f} KiB per client."
        " Beyond one process, `--processes N` splits the fleet over N worker processes (one per core)."
        " Where the one-minute load average exceeds the 2 cores, other work shared the machine and the"
        " figures are lower bounds. What one reading costs here is mostly the `send()` system call on"
        " the device's own socket (~30 µs on this VM); batching several readings per message"
        " amortises it.",
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    try:
        mosquitto = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        mosquitto = "mosquitto"
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "mosquitto": mosquitto.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10_000, help="scale run: devices (default 10,000)")
    parser.add_argument("--duration", default="5m", help="scale run: duration (default 5m)")
    parser.add_argument("--quick", action="store_true", help="1,000 devices for 60 s; docs untouched")
    parser.add_argument(
        "--write-docs", action="store_true", help="update docs/benchmarks.md even with --quick"
    )
    parser.add_argument(
        "--reuse-scale",
        action="store_true",
        help="re-measure capacity only; take the scale run from bench/results/simulator.json",
    )
    args = parser.parse_args()
    if args.quick:
        args.devices, args.duration = 1_000, "60s"
    raise_fd_limit(args.devices + 4_096)
    command = "python bench/simulator.py" + (" --quick" if args.quick else "")
    started = time.monotonic()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="iotfleet-bench-sim-") as tmp:
        work = Path(tmp)
        previous = RESULTS / "simulator.json"
        if args.reuse_scale and previous.exists():
            results["scale"] = json.loads(previous.read_text())["scale"]
            log(f"scale: reusing the {results['scale']['devices']:,}-device run from {previous}")
        else:
            log(f"scale: {args.devices:,} devices, every 10 s, {args.duration}, one process, --verify")
            results["scale"] = scale(work, args.devices, args.duration)
        results["capacity"] = []
        for interval, batch, offered in (
            ("200ms", 1, "25,000"),
            ("100ms", 1, "50,000"),
            ("100ms", 10, "500,000"),
        ):
            log(
                f"capacity: 5,000 devices every {interval}, {batch} reading(s) per message ({offered} readings/s offered)"
            )
            results["capacity"].append(capacity(work, 5_000, interval, batch, 30))
        log("naive: 1,000 aiomqtt clients, QoS 1 back to back")
        results["naive"] = naive(work, 1_000, 10.0)
    results["wall_s"] = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulator.json").write_text(json.dumps(results, indent=2))
    body = render(results, command)
    print(body)
    if not args.quick or args.write_docs:
        replace_section(SECTION, body)
        log(f"wrote the '{SECTION}' section of {DOC}")
    verify = results["scale"].get("verify", {})
    return 0 if verify.get("missing") == 0 and verify.get("duplicates") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
