"""Benchmark: telemetry query latency through the registry's REST API on a week of 1 Hz data.

Starts its own influxd, mosquitto and registry process (uvicorn, SQLite, all on
free loopback ports in a temp dir), stores one thermostat's readings at 1/s
for the 7 days up to now (604,800 points, written in big line-protocol
batches), provisions the device, then times, over keep-alive HTTP with a
viewer key:

- ``GET /api/v1/devices/{id}/telemetry/latest`` (every field's newest value);
- ``GET /api/v1/devices/{id}/telemetry/aggregate?start=-24h&every=1m&fn=mean``
  (1440 buckets of the three numeric fields).

Both are timed twice: (A) right after the load, while the whole week is still
in influxd's in-memory cache (worst case), and (B) in steady state, after
restarting influxd with a short cache cold duration so the week is written to
TSM files. Besides latency, the CPU time the registry and influxd spend per
request is reported (the load-independent cost). It also times the InfluxQL
shapes for "latest" directly on InfluxDB, to show why the API sends one
time-bounded ``LAST(f)`` per field. Targets: p99 < 100 ms (latest) and
< 300 ms (aggregate).

    .venv/bin/python bench/queries.py --write-docs

``--write-docs`` replaces the "Telemetry queries" section of
docs/benchmarks.md (only that section).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import replace_section  # noqa: E402
from iotfleet.influx import InfluxClient, quote_identifier, series_rows  # noqa: E402
from iotfleet.settings import InfluxSettings  # noqa: E402
from iotfleet.stack import probes  # noqa: E402
from tests.harness import Broker, Influxd  # noqa: E402

SECTION_TITLE = "Telemetry queries"
DOC = REPO / "docs" / "benchmarks.md"
DEVICE_ID = "bench-thermostat-0001"
TARGET_LATEST_MS = 100.0
TARGET_AGGREGATE_MS = 300.0


@dataclass
class Stats:
    name: str
    samples_ms: list[float]
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU time per request of each server process (load-independent: the idle-machine floor)."""

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    @property
    def worst(self) -> float:
        return max(self.samples_ms)

    def line(self) -> str:
        cpu = ", ".join(f"{name} {ms:.1f}" for name, ms in self.cpu_ms.items())
        return (
            f"{self.name}: p50 {self.p50:.1f} ms, p99 {self.p99:.1f} ms, max {self.worst:.1f} ms"
            f" (n={len(self.samples_ms)}; CPU ms per request: {cpu or '-'})"
        )


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def timed(
    name: str,
    call: Callable[[], None],
    *,
    requests: int,
    warmup: int,
    processes: dict[str, psutil.Process] | None = None,
) -> Stats:
    for _ in range(warmup):
        call()
    processes = processes or {}
    cpu_before = {label: _cpu_s(p) for label, p in processes.items()}
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    cpu = {label: (_cpu_s(p) - cpu_before[label]) * 1000 / requests for label, p in processes.items()}
    return Stats(name, samples, cpu)


# --- data ----------------------------------------------------------------------------------


def week_lines(end_ms: int, points: int) -> list[str]:
    """``points`` readings 1 s apart ending at ``end_ms``, as the ingest stores them."""
    start_ms = end_ms - (points - 1) * 1000
    modes = ("heat", "cool", "auto", "off")
    prefix = f"thermostat,device_id={DEVICE_ID}"
    lines = []
    for i in range(points):
        t = start_ms + i * 1000
        temperature = round(21.0 + 3.0 * math.sin(i / 3600.0) + (i % 7) * 0.01, 2)
        humidity = round(45.0 + 10.0 * math.cos(i / 5400.0), 2)
        mode = modes[(i // 21_600) % 4]
        lines.append(
            f'{prefix} temperature_c={temperature!r},humidity_pct={humidity!r},setpoint_c=21.0,mode="{mode}",'
            f"seq={i}i {t}"
        )
    return lines


async def load(settings: InfluxSettings, points: int, batch: int, end_ms: int) -> tuple[float, int]:
    """Write the week up to ``end_ms``; return (seconds, points stored)."""
    lines = week_lines(end_ms, points)
    async with InfluxClient(settings, max_connections=4) as influx:
        await influx.ensure_database()
        started = time.perf_counter()
        # Two batches in flight: the server parses one while the next is on the wire.
        semaphore = asyncio.Semaphore(2)

        async def write(chunk: list[str]) -> None:
            async with semaphore:
                await influx.write("\n".join(chunk))

        await asyncio.gather(*(write(lines[i : i + batch]) for i in range(0, len(lines), batch)))
        elapsed = time.perf_counter() - started
        rp = quote_identifier(settings.retention_policy)
        rows = list(
            series_rows(
                await influx.query(
                    f"SELECT COUNT(seq) FROM {rp}.thermostat WHERE device_id = $d", params={"d": DEVICE_ID}
                )
            )
        )
        return elapsed, int(rows[0]["count"]) if rows else 0


async def shapes(settings: InfluxSettings, requests: int) -> list[Stats]:
    """InfluxQL alternatives for 'latest', timed directly on InfluxDB (no API in between)."""
    rp = quote_identifier(settings.retention_policy)
    fields = ("temperature_c", "humidity_pct", "setpoint_c", "mode", "seq")
    where = "device_id = $d"
    last_each = ", ".join(f'LAST("{f}")' for f in fields)
    candidates = {
        "`LAST(a), LAST(b), …` in one statement, no time bound": (
            f"SELECT {last_each} FROM {rp}.thermostat WHERE {where}"
        ),
        '`SELECT "f" … ORDER BY time DESC LIMIT 1` per field, no time bound': "; ".join(
            f'SELECT "{f}" FROM {rp}.thermostat WHERE {where} ORDER BY time DESC LIMIT 1' for f in fields
        ),
        "`LAST(f)` per field, no time bound": "; ".join(
            f'SELECT LAST("{f}") FROM {rp}.thermostat WHERE {where}' for f in fields
        ),
        "`LAST(f)` per field, `time >= now - 1h` (what the API sends first)": "; ".join(
            f'SELECT LAST("{f}") FROM {rp}.thermostat WHERE {where} AND time >= now() - 1h' for f in fields
        ),
    }
    results = []
    async with InfluxClient(settings) as influx:
        for name, text in candidates.items():
            for _ in range(5):
                await influx.query(text, params={"d": DEVICE_ID})
            samples = []
            for _ in range(requests):
                started = time.perf_counter()
                await influx.query(text, params={"d": DEVICE_ID})
                samples.append((time.perf_counter() - started) * 1000)
            results.append(Stats(name, samples))
    return results


SNAPSHOT_COLD_S = 5
COLD_ENV = "INFLUXDB_DATA_CACHE_SNAPSHOT_WRITE_COLD_DURATION"
"""influxd writes a shard's in-memory cache to TSM files after this long without writes (default 10 min)."""


async def cached_bytes(settings: InfluxSettings) -> int:
    """Bytes of the bench database still in influxd's in-memory cache (not yet in TSM files)."""
    async with InfluxClient(settings) as influx:
        results = await influx.query("SHOW STATS FOR 'tsm1_cache'", database="_internal")
    total = 0
    for series in results[0].get("series", []):
        if series.get("tags", {}).get("database") == settings.database:
            row = dict(zip(series["columns"], series["values"][0], strict=True))
            total += int(row.get("memBytes") or 0)
    return total


def settle(settings: InfluxSettings, influxd: Influxd, *, timeout_s: float = 180.0) -> tuple[float, int]:
    """Wait for steady state: the week snapshotted to TSM files and influxd idle again.

    In a running system everything but the last minutes is in TSM files; right
    after a bulk load it is all in the cache, which is not what operators query.
    """
    assert influxd.process is not None
    process = psutil.Process(influxd.process.pid)
    started = time.monotonic()
    remaining = asyncio.run(cached_bytes(settings))
    while remaining > 0 and time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        remaining = asyncio.run(cached_bytes(settings))
    process.cpu_percent(None)
    while time.monotonic() - started < timeout_s and process.cpu_percent(interval=2.0) >= 5.0:
        pass
    return time.monotonic() - started, remaining


# --- the registry process ---------------------------------------------------------------------


def start_registry(
    broker: Broker, influx: InfluxSettings, state_dir: Path, admin_key: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = probes.free_port()
    env = dict(os.environ)
    env.update(
        {
            "IOTFLEET_STATE_DIR": str(state_dir),
            "IOTFLEET_MQTT__HOST": broker.host,
            "IOTFLEET_MQTT__PORT": str(broker.port),
            "IOTFLEET_MQTT__USERNAME": "iotfleet-registry",
            "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-registry"],
            "IOTFLEET_INFLUX__URL": influx.url,
            "IOTFLEET_INFLUX__DATABASE": influx.database,
            "IOTFLEET_REGISTRY__PORT": str(port),
            "IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY": admin_key,
            "IOTFLEET_LOG_LEVEL": "WARNING",
        }
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    log = (state_dir / "registry.log").open("ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("iotfleet-registry"))],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    probes.wait_until(
        lambda: proc.poll() is None and probes.http_ok(f"{url}/healthz"), timeout=60, what="registry /healthz"
    )
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- report -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    influx_version = subprocess.run(
        ["influxd", "version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{psutil.cpu_count()} vCPU ({cpu}), {memory:.0f} GiB RAM, {platform.platform()},"
        f" Python {platform.python_version()}, {influx_version}"
    )


@dataclass
class Phase:
    title: str
    latest: Stats
    aggregate: Stats
    shapes: list[Stats]


def measure(
    title: str,
    *,
    url: str,
    viewer_key: str,
    influx: InfluxSettings,
    end_ms: int,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> Phase:
    latest_path = f"/api/v1/devices/{DEVICE_ID}/telemetry/latest"
    aggregate_path = f"/api/v1/devices/{DEVICE_ID}/telemetry/aggregate"
    # The 24 h ending with the newest reading (pinned: "now" moves on during the run).
    aggregate_params = {
        "start": str(end_ms + 1 - 86_400_000),
        "end": str(end_ms + 1),
        "every": "1m",
        "fn": "mean",
    }
    print(f"{title}:", flush=True)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {viewer_key}"}, timeout=60) as viewer:
        # The registry's pooled connections to influxd may predate a restart: let them be replaced.
        for _ in range(3):
            try:
                viewer.get(latest_path).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = viewer.get(latest_path).raise_for_status().json()
        assert set(body["fields"]) == {"temperature_c", "humidity_pct", "setpoint_c", "mode", "seq"}, body
        sample = viewer.get(aggregate_path, params=aggregate_params).raise_for_status().json()
        assert len(sample["points"]) == 1441, len(sample["points"])  # 24 h not on minute boundaries

        def get_latest() -> None:
            viewer.get(latest_path).raise_for_status()

        def get_aggregate() -> None:
            viewer.get(aggregate_path, params=aggregate_params).raise_for_status()

        processes = {label: psutil.Process(pid) for label, pid in pids.items()}
        latest = timed("latest", get_latest, requests=args.requests, warmup=args.warmup, processes=processes)
        print("  " + latest.line(), flush=True)
        aggregate = timed(
            "aggregate 24 h / 1 min",
            get_aggregate,
            requests=args.requests,
            warmup=args.warmup,
            processes=processes,
        )
        print("  " + aggregate.line(), flush=True)
    shape_stats = asyncio.run(shapes(influx, min(args.requests, 200)))
    for stat in shape_stats:
        print("  influx direct, " + stat.line(), flush=True)
    return Phase(title, latest, aggregate, shape_stats)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=604_800, help="readings stored (1 per second)")
    parser.add_argument("--batch", type=int, default=50_000, help="lines per /write")
    parser.add_argument("--requests", type=int, default=500, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true", help="write the docs/benchmarks.md section")
    args = parser.parse_args()

    admin_key = "ifk_bench-" + secrets.token_urlsafe(24)
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="iotfleet-bench-queries-") as tmp:
        root = Path(tmp)
        os.environ.pop(COLD_ENV, None)
        influxd = Influxd(root / "influxd").start()
        broker = Broker(root / "mosquitto").start()
        registry: subprocess.Popen[bytes] | None = None
        try:
            influx = influxd.settings_for("bench")
            print(f"writing {args.points:,} points in batches of {args.batch:,} ...", flush=True)
            end_ms = time.time_ns() // 1_000_000 - 1_000
            write_s, stored = asyncio.run(load(influx, args.points, args.batch, end_ms))
            print(f"  {stored:,} stored in {write_s:.1f} s ({stored / write_s:,.0f} points/s)", flush=True)
            if stored != args.points:
                print(f"expected {args.points} points, InfluxDB counts {stored}", file=sys.stderr)
                return 1
            cached_mb = asyncio.run(cached_bytes(influx)) / 2**20
            registry, url = start_registry(broker, influx, root / "registry", admin_key)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}) as admin:
                admin.post("/api/v1/devices", json={"id": DEVICE_ID, "type": "thermostat"}).raise_for_status()
                resp = admin.post("/api/v1/api-keys", json={"name": "bench viewer", "role": "viewer"})
                viewer_key = resp.raise_for_status().json()["key"]
            assert influxd.process is not None
            target = {"url": url, "viewer_key": viewer_key, "influx": influx, "end_ms": end_ms, "args": args}
            target["pids"] = {"registry": registry.pid, "influxd": influxd.process.pid}
            title = f"A. right after the load: the week in influxd's cache ({cached_mb:.0f} MiB)"
            phases.append(measure(title, **target))
            # Restart influxd with a short cold duration (an environment override of its
            # config): the WAL is reloaded, then the cache is written to TSM files.
            influxd.stop()
            os.environ[COLD_ENV] = f"{SNAPSHOT_COLD_S}s"
            influxd.start()
            target["pids"] = {"registry": registry.pid, "influxd": influxd.process.pid}
            settled_s, in_cache = settle(influx, influxd)
            print(f"  TSM after {settled_s:.0f} s ({in_cache} bytes left in cache)", flush=True)
            phases.append(measure("B. steady state: the week in TSM files", **target))
        finally:
            os.environ.pop(COLD_ENV, None)
            if registry is not None:
                stop(registry)
            broker.stop()
            influxd.stop()

    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    ok = all(p.latest.p99 < TARGET_LATEST_MS and p.aggregate.p99 < TARGET_AGGREGATE_MS for p in phases)
    verdicts = "; ".join(
        f"{p.title.split('.')[0]}: latest p99 target {'met' if p.latest.p99 < TARGET_LATEST_MS else 'NOT met'},"
        f" aggregate p99 target {'met' if p.aggregate.p99 < TARGET_AGGREGATE_MS else 'NOT met'}"
        for p in phases
    )
    rows = []
    for phase in phases:
        key = phase.title.split(".")[0]
        for request, stat, target_ms in (
            ("`latest` (5 fields)", phase.latest, TARGET_LATEST_MS),
            ("`aggregate?start=…&end=…&every=1m&fn=mean` (24 h, 3 fields, 1441 buckets)", phase.aggregate,
             TARGET_AGGREGATE_MS),
        ):  # fmt: skip
            cpu = " + ".join(f"{ms:.1f}" for ms in stat.cpu_ms.values())
            rows.append(
                f"| {key} | {request} | {stat.p50:.1f} ms | {stat.p99:.1f} ms | {stat.worst:.1f} ms"
                f" | {cpu} ms | < {target_ms:.0f} ms |"
            )
    shape_rows = [
        f"| {a.name} | {a.p50:.1f} / {a.p99:.1f} ms | {b.p50:.1f} / {b.p99:.1f} ms |"
        for a, b in zip(phases[0].shapes, phases[1].shapes, strict=True)
    ]
    nl = "\n"
    body = f"""
Machine: {machine()}. Load average (1/5/15 min) at the end of the run: {load_avg} — the machine
was shared with other test runs, so the tails include that noise.

Command: `.venv/bin/python bench/queries.py --write-docs` (starts its own influxd, mosquitto and
registry process on free loopback ports; {args.requests} timed requests per endpoint and phase after
{args.warmup} warm-up ones, sequential, over keep-alive HTTP with a viewer API key; end-to-end:
HTTP, API-key check, registry lookup of the device, InfluxDB query, JSON).

Data: one thermostat, 1 reading/s for the 7 days up to now = {stored:,} points (5 fields each,
`seq` included), written as line protocol in batches of {args.batch:,} lines in {write_s:.1f} s
({stored / write_s:,.0f} points/s). Two phases: **A** right after the load, when the whole week
is still in influxd's in-memory cache (a worst case: in a running system only the newest data
is); **B** steady state, after restarting influxd with
`{COLD_ENV}={SNAPSHOT_COLD_S}s` so that the week is written to TSM files.

| phase | request | p50 | p99 | max | CPU per request (registry + influxd) | target p99 |
|---|---|---|---|---|---|---|
{nl.join(rows)}

{verdicts}. The CPU column is the processes' CPU time
divided by the requests: what one request costs the machine whatever the load, i.e. roughly its
latency on an idle machine; the difference to p50 is time spent waiting for a core.

Query shapes for `latest`, directly on InfluxDB (p50 / p99, {len(phases[0].shapes[0].samples_ms)} runs each):

| InfluxQL | A (cache) | B (TSM) |
|---|---|---|
{nl.join(shape_rows)}

`LAST(a), LAST(b)` in one statement loses each field's own time (InfluxDB stamps
it 0), so the API sends one `LAST(f)` statement per field in one request. The
lower time bound matters while data is in the cache (the newest data always is):
InfluxDB then skips every other shard. The API looks back 1 h first and widens
(1 d, then unbounded) only for fields not found, so a device that reported in
the last hour costs one query.
"""
    print(body)
    if args.write_docs:
        replace_section(SECTION_TITLE, body, DOC)
        print(f"wrote the '{SECTION_TITLE}' section of {DOC.relative_to(REPO)}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
