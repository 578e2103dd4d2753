"""Fleet benchmark: N simulated devices on one box, end to end, on a freshly started stack.

    python -m bench.fleet --devices 100000 --duration 600 --interval 30 --write-docs

One run, in order, against ``iotfleet up`` on free ports in a temp state dir
(broker, InfluxDB, registry, the four ingest services, the rules engine):

1. provision N devices through the public ``POST /api/v1/devices/bulk``
   (as many calls as the batch limit needs), timed;
2. rules bound to all of them (scope: the fleet's tag, every device type) that
   are evaluated on every reading and do not fire, plus one probe rule;
3. ``iotfleet simulate`` (the real CLI, a child process, one worker per core,
   connections spread over loopback source addresses) runs the fleet for the
   duration with ``--verify``; the benchmark follows its ``--stats-file``:
   time until all are connected, a line every ``--report-every`` seconds;
4. the operator side while the fleet runs: p50/p99 of the API calls the
   dashboard makes (device list, search, filters, fleet summary, a device
   page, alerts, rules) and the registry's RSS;
5. the rules engine: reading → command latency of probe readings while the
   engine evaluates ≥ ``--rules-rate`` readings/s (the fleet, topped up by a
   paced publisher) with rules bound to every device;
6. presence: 10 % of the devices drop at once (LWT) and come back; how long the
   fleet summary's online count takes to show it, both ways;
7. connect storm: the broker is restarted under the connected fleet; time until
   every device is back and readings flow, and ``--verify`` at the end proves
   every acknowledged reading stored (0 missing, 0 duplicate seq);
8. RSS of the broker, every service and the simulator (per device).

``--registered M`` (M ≥ N) provisions M devices and connects N of them: the
operator side, the rules (bound to all M) and provisioning are then measured at
M while the broker holds N connections, for machines whose open-files hard limit
keeps one broker below M (see "Connections held on one box"). ``--drop K`` sets
how many devices drop at once for the presence step (default 10 %).

Writes the section "Fleet at scale: N devices" of docs/benchmarks.md with
``--write-docs`` (each size its own section) and bench/results/fleet-N.json.
Prints progress and results only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.report import replace_section
from bench.workload import BenchStack, machine
from iotfleet import topics
from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.stack.supervisor import FLEET_FDS, broker_fd_limit
from iotfleet.topics import Channel
from simulators import provisioning
from simulators.faults import FaultSpec, assign_faults
from simulators.fleet import DeviceCredentials

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLEET_TAG = ("fleet", "bench")  # every device of the run carries it; the rules are scoped by it
PROBES = 10  # thermostats whose hot readings fire the probe rule
LOADERS = 10  # thermostats that top the reading rate up to --rules-rate


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 1)}


# --- the stack and its processes ----------------------------------------------------------


@dataclass
class Memory:
    """Peak RSS per stack part (by supervisor name), sampled by the monitor."""

    peak: dict[str, int] = field(default_factory=dict)
    steady: dict[str, int] = field(default_factory=dict)

    def sample(self, stack: BenchStack) -> dict[str, int]:
        now: dict[str, int] = {}
        try:
            infos = stack.stack._rpc().supervisor.getAllProcessInfo()
        except (OSError, ConnectionError):
            return now
        for info in infos:
            pid = info.get("pid") or 0
            if not pid:
                continue
            try:
                now[info["name"]] = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        for name, rss in now.items():
            self.peak[name] = max(self.peak.get(name, 0), rss)
        return now


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def metric(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- provisioning and rules --------------------------------------------------------------


def provision(
    api: str, key: str, devices: int
) -> tuple[list[DeviceCredentials], list[DeviceCredentials], float]:
    """The fleet (spread over every type) and the probe/load thermostats, through the public bulk API."""
    provisioner = provisioning.RegistryProvisioner(api, key, timeout_s=3_600)
    counts = provisioning.spread(devices)
    started = time.perf_counter()
    fleet = provisioner.provision(
        counts,
        run_id="fleet",
        on_progress=lambda done, total: log(f"  provisioned {done:,}/{total:,}"),
    )
    took = time.perf_counter() - started
    extra = provisioner.provision({"thermostat": PROBES + LOADERS}, run_id="probe")
    # The provisioner tags every device simulator=iotfleet; the rules are scoped by it.
    return fleet, extra, took


def bench_rules() -> list[dict[str, Any]]:
    """Per type: a windowed mean and a threshold that never fire (state for every device); the probe."""
    never = {
        "thermostat": ("temperature_c", 59),
        "air_quality": ("co2_ppm", 4_900),
        "smart_plug": ("voltage_v", 259),
        "gps_tracker": ("speed_kmh", 299),
    }
    rules: list[dict[str, Any]] = []
    for device_type in DEVICE_TYPES:
        fld, high = never.get(device_type, ("", 0))
        if not fld:
            continue
        scope = {"device_type": device_type, "tags": {"simulator": "iotfleet"}}
        rules.append(
            {
                "name": f"fleet-bench-{device_type}-mean",
                "scope": scope,
                "when": {"field": fld, "agg": "mean", "window": "1m", "op": ">", "value": high},
                "then": [{"alert": {"severity": "minor", "message": "bench: never"}}],
            }
        )
        rules.append(
            {
                "name": f"fleet-bench-{device_type}-high",
                "scope": scope,
                "when": {"field": fld, "op": ">", "value": high},
                "then": [{"alert": {"severity": "minor", "message": "bench: never"}}],
            }
        )
    rules.append(
        {
            "name": "fleet-bench-probe",
            "scope": {"device_type": "thermostat", "tags": {"simulator": "iotfleet"}},
            "when": {"field": "temperature_c", "op": ">", "value": 40},
            "then": [{"command": "set_mode", "args": {"mode": "cool"}}],
        }
    )
    return rules


def create_rules(http: httpx.Client) -> int:
    rules = bench_rules()
    for rule in rules:
        response = http.post("/api/v1/rules", json=rule)
        if response.status_code != 201:
            raise RuntimeError(f"rule {rule['name']}: {response.status_code} {response.text[:300]}")
    return len(rules)


# --- the simulator child -----------------------------------------------------------------


class Simulator:
    """``python -m simulators`` as a child process; its stats file is the benchmark's view of the fleet."""

    def __init__(self, stack: BenchStack, work: Path, argv: list[str]) -> None:
        self.stats_path = work / "fleet-stats.jsonl"
        self.report_path = work / "fleet-report.json"
        self.log_path = work / "simulator.log"
        s = stack.settings
        env = dict(os.environ)
        env.update(
            {
                "IOTFLEET_INFLUX__URL": s.influx.url,
                "IOTFLEET_INFLUX__DATABASE": s.influx.database,
                "IOTFLEET_LOG_LEVEL": "WARNING",
            }
        )
        self.argv = [
            sys.executable,
            "-m",
            "simulators",
            "--state-dir",
            str(stack.stack.layout.root),
            "--mqtt-port",
            str(s.mqtt.port),
            "--api-port",
            str(s.registry.port),
            "--influx-port",
            str(httpx.URL(s.influx.url).port),
            "--stats-file",
            str(self.stats_path),
            "--report",
            str(self.report_path),
            "--quiet",
            *argv,
        ]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.started = time.time()

    def stats(self) -> dict[str, Any]:
        """The last line of the stats file (one per second)."""
        try:
            with self.stats_path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 65_536))
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return {}
        for line in reversed(lines):
            try:
                data: dict[str, Any] = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            return data
        return {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)  # clean stop: drain, offline, report
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- measurements ------------------------------------------------------------------------


def wait_for(check: Any, timeout: float, poll: float = 0.5) -> float | None:
    """Seconds until ``check()`` is true, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(poll)
    return None


def operator_side(
    http: httpx.Client, fleet: list[DeviceCredentials], requests: int, budget_s: float
) -> dict[str, Any]:
    """p50/p99 of what the dashboard asks for, each call repeated ``requests`` times (within the budget)."""
    device = fleet[len(fleet) // 2]
    page1 = http.get("/api/v1/devices", params={"limit": 100}).json()
    cursor = page1.get("next_cursor")
    base = f"/api/v1/devices/{device.id}"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("device list, first page (100)", "/api/v1/devices", {"limit": 100}),
        ("device list, next page", "/api/v1/devices", {"limit": 100, "cursor": cursor}),
        ("search by id/name substring", "/api/v1/devices", {"q": device.id[-9:], "limit": 100}),
        ("filter type + online", "/api/v1/devices", {"type": "thermostat", "online": "true", "limit": 100}),
        ("filter by tag", "/api/v1/devices", {"tag": "simulator=iotfleet", "limit": 100}),
        ("fleet summary", "/api/v1/fleet/summary", {}),
        ("device", base, {}),
        ("device latest values", f"{base}/telemetry/latest", {}),
        ("device dead letters", f"{base}/deadletters", {}),
        ("device commands", f"{base}/commands", {"limit": 20}),
        ("active alerts", "/api/v1/alerts", {"status": "active", "limit": 5}),
        ("rules", "/api/v1/rules", {"limit": 1000}),
        ("dashboard page /devices (HTML)", "/devices", {}),
    ]
    out: dict[str, Any] = {}
    deadline = time.monotonic() + budget_s
    per_call_s = budget_s / len(calls)
    for label, path, raw_params in calls:
        params = {k: v for k, v in raw_params.items() if v is not None}
        times: list[float] = []
        statuses: set[int] = set()
        stop_at = min(deadline, time.monotonic() + per_call_s)
        for _ in range(requests):
            started = time.perf_counter()
            response = http.get(path, params=params)
            times.append((time.perf_counter() - started) * 1000)
            statuses.add(response.status_code)
            if time.monotonic() > stop_at and len(times) >= 20:
                break
        out[label] = {**percentiles(times), "status": sorted(statuses)}
        log(f"  {label}: p50 {out[label]['p50']} ms, p99 {out[label]['p99']} ms ({len(times)} requests)")
    return out


class _Device:
    """A paho client with a device's own credentials (it may only use its own topics)."""

    def __init__(self, host: str, port: int, creds: DeviceCredentials, on_command: Any = None) -> None:
        self.creds = creds
        self.topic = topics.device_topic(creds.type, creds.id, Channel.TELEMETRY)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=creds.client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(creds.username, creds.password)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        ready = threading.Event()
        command_topic = topics.device_topic(creds.type, creds.id, Channel.COMMANDS)
        if on_command is not None:
            self.client.on_message = lambda _c, _u, msg: on_command(creds.id, msg.payload)
            self.client.on_subscribe = lambda *_a: ready.set()
            self.client.on_connect = lambda c, *_a: c.subscribe(command_topic, qos=1)
        else:
            self.client.on_connect = lambda *_a: ready.set()
        self.client.connect(host, port)
        self.client.loop_start()
        if not ready.wait(15):
            raise TimeoutError(f"{creds.id}: not connected/subscribed")

    def publish(self, payload: bytes) -> None:
        self.client.publish(self.topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


NORMAL = orjson.dumps({"temperature_c": 21.0, "humidity_pct": 45.0, "setpoint_c": 21.0, "mode": "auto"})
HOT = orjson.dumps({"temperature_c": 45.0, "humidity_pct": 45.0, "setpoint_c": 21.0, "mode": "auto"})


def rules_latency(  # noqa: PLR0917 (one argument per input)
    stack: BenchStack,
    extra: list[DeviceCredentials],
    fleet_rate: float,
    target_rate: float,
    seconds: float,
    probes_per_s: float,
) -> dict[str, Any]:
    """Probe readings → the engine's command, while it evaluates ≥ target_rate readings/s."""
    host, port = stack.mqtt_host, stack.mqtt_port
    pending: dict[str, float] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def on_command(device_id: str, payload: bytes) -> None:
        received = time.perf_counter()
        if orjson.loads(payload).get("args") != {"mode": "cool"}:
            return
        with lock:
            sent = pending.pop(device_id, None)
            if sent is not None:
                latencies.append((received - sent) * 1000)

    probes = [_Device(host, port, c, on_command) for c in extra[:PROBES]]
    loaders = [_Device(host, port, c) for c in extra[PROBES : PROBES + LOADERS]]
    top_up = max(0.0, target_rate - fleet_rate - 2 * probes_per_s)
    engine_metrics = f"http://127.0.0.1:{stack.settings.stack.service_port_base}/metrics"
    evaluated_before = metric(engine_metrics, "iotfleet_rules_readings_total")
    # The probe rule fires on the edge: each probe is a normal reading (clears) then a hot one.
    for device in probes:
        device.publish(NORMAL)
    started = time.perf_counter()
    sent_probes = 0
    owed = 0.0
    tick = 0.01
    loader_index = 0
    probe_index = 0
    next_probe = started
    while (elapsed := time.perf_counter() - started) < seconds:
        owed += top_up * tick
        while owed >= 1:
            owed -= 1
            loaders[loader_index % len(loaders)].publish(NORMAL)
            loader_index += 1
        now = time.perf_counter()
        if now >= next_probe:
            next_probe += 1 / probes_per_s
            device = probes[probe_index % len(probes)]
            probe_index += 1
            with lock:
                busy = device.creds.id in pending
                if not busy:
                    pending[device.creds.id] = time.perf_counter()
            if not busy:
                device.publish(HOT)
                sent_probes += 1
                device.publish(NORMAL)  # back to normal: the next probe of this device fires again
        delay = started + (int(elapsed / tick) + 1) * tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    took = time.perf_counter() - started
    load_avg = os.getloadavg()[0]
    wait_for(lambda: not pending, 10, 0.05)
    evaluated = metric(engine_metrics, "iotfleet_rules_readings_total") - evaluated_before
    for device in probes + loaders:
        device.close()
    return {
        "seconds": round(took, 1),
        "evaluated_per_s": round(evaluated / took),
        "fleet_rate_per_s": round(fleet_rate),
        "top_up_per_s": round(top_up),
        "probes": {"sent": sent_probes, "answered": len(latencies)},
        "load_avg": round(load_avg, 1),
        "latency_ms": percentiles(latencies),
    }


def online_count(http: httpx.Client) -> int:
    try:
        return int(http.get("/api/v1/fleet/summary").json()["totals"]["online"])
    except (httpx.HTTPError, KeyError, ValueError):
        return -1


# --- the run -----------------------------------------------------------------------------


@dataclass
class Timeline:
    """When, in seconds after the simulator started, the disturbances happen."""

    disconnect_at: float
    offline_s: float
    restart_at: float


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "broker_fd_limit": broker_fd_limit(),
        "devices": args.devices,
        "registered": args.registered,
        "duration_s": args.duration,
        "interval_s": args.interval,
    }
    stack = BenchStack()
    memory = Memory()
    simulator: Simulator | None = None
    try:
        log(f"starting the stack in {stack.root}")
        stack.start(services=True)
        api = f"http://{stack.settings.registry.host}:{stack.settings.registry.port}"
        key = provisioning.read_api_key(stack.stack.layout.root)
        assert key, "the stack wrote no admin API key"
        http = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=60)

        log(f"provisioning {args.registered:,} devices through POST /api/v1/devices/bulk")
        registered, extra, took = provision(api, key, args.registered)
        fleet = provisioning.select(registered, provisioning.spread(args.devices))  # the connected ones
        result["provisioning"] = {
            "devices": len(registered),
            "seconds": round(took, 1),
            "per_s": round(len(registered) / took),
        }
        log(f"provisioned {len(registered):,} in {took:.1f} s ({len(registered) / took:,.0f} devices/s)")
        credentials = stack.root / "fleet-credentials.json"
        provisioning.save_credentials(credentials, fleet)
        result["rules"] = create_rules(http)
        log(f"{result['rules']} rules bound to every device (scope: tag simulator=iotfleet)")

        timeline = Timeline(
            disconnect_at=round(args.duration * 0.45),
            offline_s=max(10.0, round(args.duration * 0.1)),
            restart_at=round(args.duration * 0.7),
        )
        drop_fraction = min(1.0, args.drop / args.devices) if args.drop else 0.1
        disconnect = FaultSpec(
            kind="disconnect",
            fraction=drop_fraction,
            at_s=timeline.disconnect_at,
            offline_s=timeline.offline_s,
        )
        dropped = len(assign_faults([(c.id, c.type) for c in fleet], [disconnect], 0))
        argv = [
            "--credentials", str(credentials),
            "--devices", str(args.devices),
            "--duration", f"{args.duration}s",
            "--interval", f"{args.interval}s",
            "--ramp-up", str(args.ramp_up),
            "--fault", f"disconnect:{drop_fraction:g},at_s={timeline.disconnect_at},offline_s={timeline.offline_s}",
            "--verify", "--verify-source", "influx", "--verify-timeout", f"{args.verify_timeout}s",
        ]  # fmt: skip
        if args.processes:
            argv += ["--processes", str(args.processes)]
        simulator = Simulator(stack, stack.root, argv)
        log(f"$ python -m simulators {' '.join(argv)}")
        simulator.start()
        monitor = Monitor(simulator, stack, memory, args.report_every)
        monitor.start()

        connected_s = wait_for(lambda: simulator.stats().get("connected", 0) >= args.devices, args.duration)
        result["all_connected_s"] = round(connected_s, 1) if connected_s is not None else None
        log(f"all {args.devices:,} connected after {connected_s or float('nan'):.1f} s")
        time.sleep(min(args.interval, 10))  # let the fleet report once before measuring the operator side
        memory.steady = memory.sample(stack)

        # The measurements must be done before the mass disconnect (fixed in the simulator's flags).
        def left() -> float:
            return timeline.disconnect_at - (time.time() - simulator.started) - 4

        log("operator side: the dashboard's API calls")
        result["operator"] = operator_side(http, fleet, args.requests, max(10.0, left() * 0.4))
        rss_registry = memory.sample(stack).get("registry", 0)
        result["registry_rss_mib"] = round(rss_registry / 2**20)
        fleet_rate = args.devices / args.interval
        rules_s = max(5.0, min(left(), 60.0))
        log(f"rules: reading → command latency at ≥ {args.rules_rate:,} readings/s for {rules_s:.0f} s")
        result["rules_latency"] = rules_latency(stack, extra, fleet_rate, args.rules_rate, rules_s, 5.0)
        lat = result["rules_latency"]["latency_ms"]
        log(
            f"  p50 {lat['p50']} ms, p99 {lat['p99']} ms over {lat['n']} probes;"
            f" engine evaluated {result['rules_latency']['evaluated_per_s']:,}/s"
        )

        # Presence through a mass disconnect (the simulator drops 10 % at disconnect_at).
        if left() < -2:
            raise RuntimeError("the measurements overran the mass disconnect: use a longer --duration")
        wait_for(lambda: time.time() - simulator.started >= timeline.disconnect_at - 3, args.duration, 0.2)
        before = online_count(http)
        log(f"presence: {dropped:,} devices drop at once; online now {before:,}")
        # The moments the fleet itself reports (its stats file, once a second): all dropped, all back.
        wait_for(lambda: simulator.stats().get("disconnects_injected", 0) >= dropped, 60, 0.1)
        drop_at = time.monotonic()
        # Exact means: the online count equals the devices connected (the probe devices of the
        # rules step are gone by now, and may still be counted in ``before`` if presence lags).
        seen_low = wait_for(lambda: online_count(http) == args.devices - dropped, 60, 0.25)
        low_s = (time.monotonic() - drop_at) if seen_low is not None else None
        wait_for(lambda: simulator.stats().get("connected", 0) >= args.devices, 120, 0.1)
        back_at = time.monotonic()
        seen_back = wait_for(lambda: online_count(http) == args.devices, 60, 0.25)
        back_s = (time.monotonic() - back_at) if seen_back is not None else None
        result["presence"] = {
            "online_before": before,
            "dropped": dropped,
            "seconds_to_show_drop": round(low_s, 1) if low_s is not None else None,
            "seconds_to_show_return": round(back_s, 1) if back_s is not None else None,
        }
        log(f"  online count showed the drop after {low_s} s and the return after {back_s} s")

        # Connect storm: restart the broker under the connected fleet.
        wait_for(lambda: time.time() - simulator.started >= timeline.restart_at, args.duration, 0.2)
        at_restart = simulator.stats()
        log(f"connect storm: restarting the broker with {at_restart.get('connected', 0):,} devices connected")
        rpc = stack.stack._rpc()
        down_at = time.monotonic()
        rpc.supervisor.stopProcess("mosquitto", True)
        rpc.supervisor.startProcess("mosquitto", True)
        up_at = time.monotonic()
        acked_before = simulator.stats().get("readings_acked", 0)
        reconnects_before = at_restart.get("reconnects", 0)

        def all_back() -> bool:
            # Every device reconnected (the stats line may still show the moment before the restart).
            stats = simulator.stats()
            return stats.get("connected", 0) >= args.devices and stats.get(
                "reconnects", 0
            ) - reconnects_before >= at_restart.get("connected", 0)

        back = wait_for(all_back, args.duration + 60, 0.25)
        back_s = time.monotonic() - up_at if back is not None else None
        flowing = wait_for(
            lambda: simulator.stats().get("readings_acked", 0) > acked_before + fleet_rate, 60, 0.25
        )
        result["storm"] = {
            "connected_before": at_restart.get("connected", 0),
            "broker_restart_s": round(up_at - down_at, 1),
            "all_back_after_s": round(back_s, 1) if back_s is not None else None,
            "reconnects": simulator.stats().get("reconnects", 0),
            "connect_failures": simulator.stats().get("connect_failures", 0),
            "readings_flowing_after_s": round(time.monotonic() - up_at, 1) if flowing is not None else None,
        }
        log(
            f"  all {args.devices:,} back {back_s or float('nan'):.1f} s after the broker was up"
            f" ({up_at - down_at:.1f} s restart)"
        )

        log("waiting for the run to end and the simulator's --verify")
        assert simulator.proc is not None
        simulator.proc.wait(timeout=args.duration + args.verify_timeout + 600)
        monitor.stop()
        report = json.loads(simulator.report_path.read_text())
        result["simulator_exit"] = simulator.proc.returncode
        result["verify"] = {k: v for k, v in report.get("verify", {}).items() if k != "samples"}
        result["published"] = report["published"]
        result["connections"] = {
            k: report["connections"][k]
            for k in (
                "connects",
                "reconnects",
                "connect_failures",
                "connects_by_source_address",
                "all_connected_after_s",
            )
        }
        result["processes"] = report["processes"]
        result["rows"] = monitor.rows
        sim_rss = monitor.simulator_peak
        result["rss_mib"] = {name: round(rss / 2**20) for name, rss in sorted(memory.peak.items())}
        result["simulator_rss"] = {
            "mib": round(sim_rss / 2**20),
            "kib_per_device": round(sim_rss / args.devices / 1024, 1),
        }
        v = result["verify"]
        log(
            f"verify: {v.get('stored', 0):,}/{v.get('expected', 0):,} stored, {v.get('missing')} missing,"
            f" {v.get('duplicates')} duplicate seq"
        )
        return result
    finally:
        if simulator is not None:
            simulator.stop()
        log("stopping the stack")
        stack.stop()


class Monitor:
    """A line every ``every`` seconds while the fleet runs; peak RSS of the stack's parts and the simulator."""

    def __init__(self, simulator: Simulator, stack: BenchStack, memory: Memory, every: float) -> None:
        self.simulator = simulator
        self.stack = stack
        self.memory = memory
        self.every = every
        self.rows: list[dict[str, Any]] = []
        self.simulator_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_line = time.monotonic()
        last_acked, last_at = 0, time.monotonic()
        while not self._stop.wait(5.0):
            rss = self.memory.sample(self.stack)
            proc = self.simulator.proc
            if proc is not None:
                self.simulator_peak = max(self.simulator_peak, tree_rss(proc.pid))
            if time.monotonic() - last_line < self.every:
                continue
            last_line = time.monotonic()
            stats = self.simulator.stats()
            acked = stats.get("readings_acked", 0)
            rate = (acked - last_acked) / max(1e-9, time.monotonic() - last_at)
            last_acked, last_at = acked, time.monotonic()
            row = {
                "t_s": round(time.time() - self.simulator.started),
                "connected": stats.get("connected", 0),
                "published": stats.get("readings_published", 0),
                "acked": acked,
                "acked_per_s": round(rate),
                "reconnects": stats.get("reconnects", 0),
                "broker_rss_mib": round(rss.get("mosquitto", 0) / 2**20),
                "simulator_rss_mib": round(self.simulator_peak / 2**20),
            }
            self.rows.append(row)
            log(
                f"  t={row['t_s']:>4}s connected {row['connected']:,} published {row['published']:,}"
                f" acked {row['acked']:,} ({row['acked_per_s']:,}/s) reconnects {row['reconnects']:,}"
                f" broker {row['broker_rss_mib']} MiB simulator {row['simulator_rss_mib']} MiB"
            )


# --- the report --------------------------------------------------------------------------


def section_title(devices: int, registered: int | None = None) -> str:
    if registered and registered != devices:
        return f"Fleet at scale: {registered:,} devices registered, {devices:,} connected"
    return f"Fleet at scale: {devices:,} devices"


def _plus_one(seconds: float | None) -> str:
    """The count was exact ``seconds`` after the simulator's stats line said so; that line is ≤ 1 s late."""
    return "n/a" if seconds is None else f"{seconds + 1.0:.1f}"


def _sources(by_source: dict[str, int]) -> str:
    if len(by_source) <= 1:
        return "one source address (the fleet is below the 20,000 per address that spreading starts at)"
    return "loopback source addresses " + ", ".join(
        f"{a} ({n:,} connects)" for a, n in sorted(by_source.items())
    )


def render(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    n = result["devices"]
    m = result.get("registered") or n
    prov = result["provisioning"]
    storm = result["storm"]
    presence = result["presence"]
    verify = result["verify"]
    rules = result["rules_latency"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {info['cores']} cores, "
        f"{info['memory_gib']} GiB ({info['cpu']}, {info['os']}); Python {info['python']}, {info['mosquitto']}, "
        f"{info['influxd']}. Load average before the run: {result.get('load_before', '?')}.",
        "",
        f"Command: `{command}`: a fresh `iotfleet up` (temp state dir, free ports), {n:,} devices spread over the",
        f"four types reporting every {result['interval_s']:g} s for {result['duration_s']:g} s at QoS 1, simulated by",
        f"`iotfleet simulate` in {result['processes']} worker process(es), connections from "
        + _sources(result["connections"]["connects_by_source_address"])
        + ".",
        "",
        "| what | measured |",
        "|---|---|",
        f"| provisioning {m:,} devices through `POST /api/v1/devices/bulk` | {prov['seconds']:,} s "
        f"({prov['per_s']:,} devices/s) |",
        f"| ramp-up (bounded at the simulator's --ramp-up rate) until all {n:,} connected | "
        f"{result['all_connected_s']} s |",
        f"| readings published / broker-acked | {result['published']['readings']:,} / "
        f"{result['published']['broker_acked']:,} |",
        f"| `--verify` (InfluxDB, streamed, bitmaps per device) | **{verify.get('stored', 0):,} / "
        f"{verify.get('expected', 0):,} stored, {verify.get('missing')} missing, {verify.get('duplicates')} "
        "duplicate seq** |",
        f"| connect storm: broker restarted with {storm['connected_before']:,} connected; back to all "
        f"{n:,} connected after | **{storm['all_back_after_s']} s** (broker restart itself "
        f"{storm['broker_restart_s']} s; full-jitter backoff 0.5 s → 30 s) |",
        f"| presence: {presence['dropped']:,} devices drop at once (LWT); the fleet summary's online "
        "count is exact again after (counted from the simulator's own report of the drop, ±1 s: it writes its "
        f"stats once a second) | ≤ {_plus_one(presence['seconds_to_show_drop'])} s (and after their return "
        f"≤ {_plus_one(presence['seconds_to_show_return'])} s) |",
        f"| rules engine: reading → command p50 / p99 / max with {result['rules']} rules bound to every device "
        f"({m:,} registered) "
        f"(tag scope), engine evaluating {rules['evaluated_per_s']:,} readings/s "
        f"(fleet {rules['fleet_rate_per_s']:,}/s + top-up {rules['top_up_per_s']:,}/s) | "
        f"{rules['latency_ms']['p50']} / **{rules['latency_ms']['p99']}** / {rules['latency_ms']['max']} ms "
        f"({rules['probes']['answered']}/{rules['probes']['sent']} probes; machine load average "
        f"{rules.get('load_avg', '?')}) |",
        f"| simulator RSS (all worker processes + parent) | {result['simulator_rss']['mib']:,} MiB = "
        f"{result['simulator_rss']['kib_per_device']} KiB per device |",
        "",
        f"Operator side with {m:,} devices registered, while the fleet runs (sequential requests from one client,"
        " the calls the dashboard makes):",
        "",
        "| call | p50 ms | p99 ms | max ms | requests |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, stat in result["operator"].items():
        lines.append(f"| {label} | {stat['p50']} | **{stat['p99']}** | {stat['max']} | {stat['n']} |")
    lines += [
        "",
        "Peak RSS per process (MiB): "
        + ", ".join(f"{name} {mib:,}" for name, mib in result["rss_mib"].items())
        + f"; registry during the operator calls {result['registry_rss_mib']:,} MiB.",
        "",
        "Fleet over time (every report line of the run):",
        "",
        "| t (s) | connected | published | broker-acked | acked/s | reconnects | broker RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['t_s']} | {row['connected']:,} | {row['published']:,} | {row['acked']:,} | "
            f"{row['acked_per_s']:,} | {row['reconnects']:,} | {row['broker_rss_mib']:,} |"
        )
    lines += [
        "",
        "How the fleet is held: one connection per device (the simulator's own asyncio MQTT client), one",
        "worker process per core, connections opened from 127.0.0.2, .3, … (20,000 per address: one address",
        "pair has ~28,000 ephemeral ports); the stack's supervisord raises the broker's open-files limit to 131,072",
        f"where the hard limit allows (here: {result.get('broker_fd_limit', 20_000):,}; mosquitto's `max_connections`",
        "is unlimited by default). Devices reconnect with full-jitter",
        "exponential backoff and resend what the broker had not acknowledged, what they measured while away,",
        "and telemetry acknowledged with PUBACK 0x10 (no subscriber yet, right after a broker restart).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000, help="devices connected")
    parser.add_argument(
        "--registered",
        type=int,
        default=0,
        help="devices provisioned (default: --devices); the rest stay offline",
    )
    parser.add_argument("--drop", type=int, default=0, help="devices that drop at once (default: 10 %%)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds the fleet runs")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between a device's readings")
    parser.add_argument("--ramp-up", type=float, default=1_000.0, help="connections opened per second")
    parser.add_argument("--processes", type=int, default=0, help="simulator workers (default: one per core)")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--requests", type=int, default=200, help="requests per operator-side call")
    parser.add_argument("--rules-rate", type=float, default=1_000.0, help="readings/s the engine evaluates")
    parser.add_argument("--verify-timeout", type=float, default=180.0)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the docs section from bench/results/fleet-N.json"
    )
    args = parser.parse_args(argv)
    args.registered = max(args.registered, args.devices)
    if args.render_only:
        saved = json.loads((RESULTS / f"fleet-{args.devices}.json").read_text())
        replace_section(
            section_title(args.devices, args.registered),
            render(saved["result"], saved["machine"], saved["command"]),
        )
        return 0
    if args.duration < 60:
        parser.error("--duration must be at least 60 s (ramp-up, measurements, a mass disconnect, a storm)")
    fds = broker_fd_limit()
    if fds < args.devices + 500:
        parser.error(
            f"the broker can hold at most ~{fds - 500:,} connections here (its open-files limit would be {fds:,}:"
            " the hard limit, which this process may not raise: no CAP_SYS_RESOURCE). Raise the hard limit to"
            f" {FLEET_FDS:,} (ulimit -Hn as root on the host, systemd LimitNOFILE, docker --ulimit"
            " nofile=131072:131072) or run fewer --devices"
        )
    command = " ".join(["python -m bench.fleet", *(argv if argv is not None else sys.argv[1:])])
    info = machine()
    load_before = f"{os.getloadavg()[0]:.1f}"
    log(f"machine: {json.dumps(info)}")
    result = run(args)
    result["load_before"] = load_before
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fleet-{args.devices}.json").write_text(
        json.dumps({"machine": info, "command": command, "result": result}, indent=2)
    )
    text = render(result, info, command)
    print(text, flush=True)
    if args.write_docs:
        title = section_title(args.devices, args.registered)
        replace_section(title, text)
        log(f"wrote the section '{title}' of docs/benchmarks.md")
    ok = result["verify"].get("ok", False) and result["simulator_exit"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
