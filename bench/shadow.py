"""Device shadow benchmark: one desired-state change to N simulated devices, time until every device reports it.

    python -m bench.shadow --devices 10000 --write-docs

One run against ``iotfleet up`` on free ports in a temp state dir (broker,
InfluxDB, registry, ingest services, rules engine):

1. provision N thermostats through ``POST /api/v1/devices/bulk``;
2. ``python -m simulators`` (child process, one worker per core) connects them;
   each device subscribes to its ``state/delta`` and reports its state at
   connect; the benchmark waits until the registry holds N reported states;
3. batched path: the change ``{"mode": "eco", "setpoint_c": <x>}`` for every
   device as the rules engine asks for it (one ``iotfleet/state/desired``
   request per device, QoS 1, published by a platform account): the registry
   applies them in batched transactions, publishes N retained deltas (outbox),
   the devices apply them and report, the registry records the reports in
   batches. Timed from the first request until the registry's database shows
   every device reporting the new state (read-only SQLite query, 0.25 s polls),
   with the moment every device had received its delta (simulator stats) and
   the moment every retained delta was cleared;
4. peer, same run: the next change through the public API, one ``PATCH
   …/state/desired`` per device (``--api-clients`` concurrent clients), timed
   the same way;
5. job, same run: the next change as ONE desired-state job to every thermostat
   (``POST /api/v1/jobs`` with ``{"desired_state": {"set": …}}``, unthrottled
   rollout), timed the same way, plus the moment the job shows every execution
   succeeded (the registry matched each device's report to its execution).

Writes the section "Device shadow: desired state to N devices" of
docs/benchmarks.md with ``--write-docs`` and bench/results/shadow-N.json.
Prints progress and results only.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.fleet import Simulator, log, wait_for
from bench.report import replace_section
from bench.workload import BenchStack, machine
from iotfleet import topics
from simulators import provisioning

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def in_sync(db: Path, setpoint: float) -> tuple[int, int, int]:
    """(devices reporting the setpoint, devices with a non-empty delta, deltas not yet acked by the broker)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        reported = conn.execute(
            "SELECT COUNT(*) FROM device_states WHERE json_extract(reported, '$.setpoint_c') = ?"
            " AND json_extract(reported, '$.mode') = 'eco'",
            (setpoint,),
        ).fetchone()[0]
        open_deltas = conn.execute("SELECT COUNT(*) FROM device_states WHERE delta != '{}'").fetchone()[0]
        pending = conn.execute("SELECT COUNT(*) FROM device_states WHERE delta_pending").fetchone()[0]
    return int(reported), int(open_deltas), int(pending)


def reported_count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(
            conn.execute("SELECT COUNT(*) FROM device_states WHERE reported_version > 0").fetchone()[0]
        )


def publish_requests(stack: BenchStack, ids: list[str], patch: dict[str, Any]) -> float:
    """One desired-state request per device on iotfleet/state/desired (the rules engine's account); the
    time until the broker acknowledged them all."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-shadow-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set("iotfleet-rules", stack.passwords()["iotfleet-rules"])
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    acked = threading.Semaphore(0)
    client.on_publish = lambda *_a: acked.release()
    client.connect(stack.mqtt_host, stack.mqtt_port)
    client.loop_start()
    started = time.perf_counter()
    for device_id in ids:
        body = {
            "id": str(uuid.uuid4()),
            "device_type": "thermostat",
            "device_id": device_id,
            "patch": patch,
            "source": "bench",
        }
        client.publish(topics.DESIRED_STATE_REQUESTS, orjson.dumps(body), qos=1)
    for _ in ids:
        acked.acquire(timeout=120)
    took = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return took


def patch_via_api(api: str, key: str, ids: list[str], patch: dict[str, Any], clients: int) -> float:
    """One PATCH per device from ``clients`` threads; the time until every call answered."""
    errors: list[str] = []

    def worker(part: list[str]) -> None:
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            for device_id in part:
                resp = http.patch(f"/api/v1/devices/{device_id}/state/desired", json=patch)
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(ids[i::clients],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} PATCH calls failed, first: {errors[0]}")
    return time.perf_counter() - started


def create_job(api: str, key: str, patch: dict[str, Any]) -> tuple[str, float]:
    """One desired-state job to every thermostat, unthrottled: its id and the time the POST took."""
    body = {
        "name": "bench: desired state to the fleet",
        "action": {"desired_state": {"set": patch}},
        "target": {"device_type": "thermostat"},
    }
    started = time.perf_counter()
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        resp = http.post("/api/v1/jobs", json=body)
    if resp.status_code != 201:
        raise RuntimeError(f"job creation failed: {resp.status_code} {resp.text[:200]}")
    return str(resp.json()["id"]), time.perf_counter() - started


def job_done(api: str, key: str, job_id: str, started: float, timeout: float) -> dict[str, Any]:
    """Poll the job until completed: (seconds from ``started``, its counts)."""
    deadline = time.perf_counter() + timeout
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        while True:
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] != "in_progress" or time.perf_counter() > deadline:
                return {
                    "job_status": job["status"],
                    "job_completed_s": round(time.perf_counter() - started, 2),
                    "job_counts": {k: v for k, v in job["counts"].items() if v},
                }
            time.sleep(0.25)


def converge(  # noqa: PLR0917 (one argument per input)
    db: Path,
    simulator: Simulator,
    setpoint: float,
    devices: int,
    deltas_before: int,
    started: float,
    timeout: float,
) -> dict[str, float | None]:
    """Poll until every device reports ``setpoint``; the times (from ``started``) of the milestones.
    ``timeout`` counts from now (the requests are all sent)."""
    marks: dict[str, float | None] = {
        "all_received_s": None,
        "all_reported_s": None,
        "retained_cleared_s": None,
    }
    deadline = time.perf_counter() + timeout
    last_log = 0.0
    while time.perf_counter() < deadline:
        now = time.perf_counter() - started
        received = int(simulator.stats().get("deltas_received", 0)) - deltas_before
        if marks["all_received_s"] is None and received >= devices:
            marks["all_received_s"] = round(now, 2)
        reported, open_deltas, pending = in_sync(db, setpoint)
        if marks["all_reported_s"] is None and reported >= devices:
            marks["all_reported_s"] = round(now, 2)
        cleared = open_deltas == 0 and pending == 0
        if marks["retained_cleared_s"] is None and marks["all_reported_s"] is not None and cleared:
            marks["retained_cleared_s"] = round(now, 2)
        # The simulator's stats file is written once a second: its mark may come a little later.
        if marks["retained_cleared_s"] is not None and (
            marks["all_received_s"] is not None or now > marks["retained_cleared_s"] + 3
        ):
            break
        if now - last_log >= 2:
            log(
                f"  {now:5.1f} s: {received:,} deltas received, {reported:,} reported, {pending:,} unacked deltas"
            )
            last_log = now
        time.sleep(0.25)
    return marks


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"devices": args.devices}
    stack = BenchStack()
    simulator: Simulator | None = None
    try:
        log(f"starting the stack in {stack.root}")
        stack.start(services=True)
        api = f"http://{stack.settings.registry.host}:{stack.settings.registry.port}"
        key = provisioning.read_api_key(stack.stack.layout.root)
        assert key, "the stack wrote no admin API key"
        provisioner = provisioning.RegistryProvisioner(api, key, timeout_s=3_600)
        log(f"provisioning {args.devices:,} thermostats")
        fleet = provisioner.provision({"thermostat": args.devices}, run_id="shadow")
        ids = [c.id for c in fleet]
        credentials = stack.root / "shadow-credentials.json"
        provisioning.save_credentials(credentials, fleet)
        argv = [
            "--credentials", str(credentials),
            "--type", f"thermostat={args.devices}",
            "--duration", f"{args.duration}s",
            "--interval", f"{args.interval}s",
            "--ramp-up", str(args.ramp_up),
            "--no-verify",
        ]  # fmt: skip
        simulator = Simulator(stack, stack.root, argv)
        log(f"$ python -m simulators {' '.join(argv)}")
        simulator.start()
        db = stack.stack.layout.root / "registry.db"
        connected = wait_for(lambda: simulator.stats().get("connected", 0) >= args.devices, args.duration)
        log(f"all {args.devices:,} connected after {connected or float('nan'):.1f} s")
        initial = wait_for(lambda: reported_count(db) >= args.devices, 300, poll=1.0)
        log(f"the registry holds every device's reported state ({initial or float('nan'):.1f} s later)")
        registry_pid = stack.stack._rpc().supervisor.getProcessInfo("registry")["pid"]
        registry = psutil.Process(registry_pid) if registry_pid else None

        for name, setpoint in (("batched", 17.5), ("api", 18.5), ("job", 19.5)):
            patch = {"mode": "eco", "setpoint_c": setpoint}
            deltas_before = int(simulator.stats().get("deltas_received", 0))
            cpu_before = sum(registry.cpu_times()[:2]) if registry else 0.0
            log(f"{name}: setting {patch} on {args.devices:,} devices")
            started = time.perf_counter()
            job_id = None
            if name == "batched":
                sent_s = publish_requests(stack, ids, patch)
            elif name == "api":
                sent_s = patch_via_api(api, key, ids, patch, args.api_clients)
            else:
                job_id, sent_s = create_job(api, key, patch)
            marks = converge(db, simulator, setpoint, args.devices, deltas_before, started, args.timeout)
            job = job_done(api, key, job_id, started, args.timeout) if job_id else {}
            cpu = (sum(registry.cpu_times()[:2]) - cpu_before) if registry else None
            result[name] = {
                "requests_sent_s": round(sent_s, 2),
                **marks,
                **job,
                "registry_cpu_s": cpu and round(cpu, 1),
                # The machine may be shared: the 1-minute load average says how much.
                "load_average_1m": round(os.getloadavg()[0], 1),
            }
            log(f"{name}: {json.dumps(result[name])}")
            time.sleep(2)
        result["simulator"] = {
            k: simulator.stats().get(k) for k in ("deltas_received", "deltas_invalid", "states_reported")
        }
    finally:
        if simulator is not None:
            simulator.stop()
        stack.stop()
    return result


def _cell(value: float | None, floor: float | None) -> str:
    if value is not None:
        return f"{value}"
    return f"> {floor} (not reached before the timeout)" if floor is not None else "–"


def render(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    n = result["devices"]
    rows = []
    for name, label in (
        ("batched", "rule-engine requests (`iotfleet/state/desired`, batched)"),
        ("api", "one `PATCH …/state/desired` per device (peer)"),
        ("job", "one desired-state job (`POST /api/v1/jobs`, unthrottled)"),
    ):
        r = result.get(name, {})
        sent = r.get("requests_sent_s")
        cells = [_cell(r.get(k), sent) for k in ("all_received_s", "all_reported_s", "retained_cleared_s")]
        rows.append(
            f"| {label} | {sent} | {' | '.join(cells)} | {r.get('registry_cpu_s')} | {r.get('load_average_1m', '–')} |"
        )
    batched, api = result.get("batched", {}), result.get("api", {})
    b_done, a_done = batched.get("all_reported_s"), api.get("all_reported_s")
    if b_done and a_done:
        ratio = f"{a_done / b_done:.1f}× faster than"
    elif b_done and api.get("requests_sent_s"):
        ratio = f"at least {api['requests_sent_s'] / b_done:.1f}× faster than"
    else:
        ratio = "(no ratio: a path did not finish) compared with"
    cpu = ""
    if batched.get("registry_cpu_s") and api.get("registry_cpu_s"):
        cpu = f", with {api['registry_cpu_s'] / batched['registry_cpu_s']:.1f}× less registry CPU"
    job = result.get("job", {})
    job_text = ""
    if job.get("all_reported_s") and a_done:
        job_text = (
            f' The job reaches "every device reports it" in {job["all_reported_s"]} s:'
            f" {a_done / job['all_reported_s']:.1f}× faster than one PATCH per device"
        )
        if job.get("registry_cpu_s") and api.get("registry_cpu_s"):
            job_text += f", with {api['registry_cpu_s'] / job['registry_cpu_s']:.1f}× less registry CPU"
        if b_done:
            job_text += f" ({job['all_reported_s'] / b_done:.1f}× the batched rule-engine path's time)"
        job_text += (
            f"; the job showed every execution succeeded at {job.get('job_completed_s')} s"
            f" ({job.get('job_status')}, {job.get('job_counts')})."
            ' For the job, "requests sent" is the `POST /api/v1/jobs` answer (its executions recorded in'
            " one INSERT … SELECT); the rollout then releases them in batches (IOTFLEET_JOBS__RELEASE_BATCH),"
            " and each execution succeeds when the registry records the device's report holding the fields."
        )
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['os']}, Python"
        f" {info['python']}, {info['mosquitto']}; shared with other jobs during the run (1-minute load"
        " average in the table: above 2, the stack got a fraction of the two cores).\n\n"
        f"Command: `{command}`\n\n"
        f"{n:,} simulated thermostats (one fleet process per core) connected to the stack of `iotfleet up`;"
        " each holds its retained `state/delta` subscription and reports its state at connect. One change"
        ' `{"mode": "eco", "setpoint_c": x}` to every device, timed from the first request (seconds):\n\n'
        "| path | requests sent | every device received its delta | registry holds every report |"
        " retained deltas cleared | registry CPU (s) | load avg |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f'\n\nThe batched path reaches "every device reports it" {ratio} the API peer{cpu}.{job_text}'
        f" Simulator: {result.get('simulator')}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--duration", type=int, default=900, help="simulator run bound (s)")
    parser.add_argument("--interval", type=int, default=60, help="telemetry interval of the fleet (s)")
    parser.add_argument("--ramp-up", type=int, default=2_000)
    parser.add_argument("--api-clients", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"shadow-{args.devices}.json").write_text(json.dumps(result, indent=2))
    if args.write_docs:
        command = "python -m bench.shadow " + " ".join(sys.argv[1:] if argv is None else argv)
        replace_section(
            f"Device shadow: desired state to {args.devices:,} devices", render(result, info, command)
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
