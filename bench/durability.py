"""Durability benchmark (issue #14): what broker snapshots and the ingest journal cost.

Part ``broker`` (Mosquitto 2.0 persists by whole-database snapshot only): for each
autosave setting, a fresh broker gets an offline persistent QoS 1 session (the
stalled ingest of the issue), a backlog of ``--backlog`` messages is published into
it (timed: "fill"), then ``--probe`` more messages are published on top of that
backlog (timed: "on backlog"); and, with a live consumer instead (the journaled
ingest keeps the broker's queues empty), ``--probe`` messages are timed ("live").
The broker log gives the number of snapshots; the rates are compared with the
time-based ``autosave_interval 30`` of the same run.

Part ``ingest``: bench/ingest.py's drained and live runs, with the journal off
(ack after InfluxDB) and on (ack after fsync, drained to InfluxDB), alternated in
the same run; the ratio is journal / no journal.

Part ``sqlite``: the registry's SQLite settings (WAL + synchronous NORMAL vs FULL):
the cost of one committed write (a device row insert, one transaction). Part ``api``:
the same through the registry process, ``PATCH /api/v1/devices/{id}``.

    .venv/bin/python -m bench.durability --parts broker --backlog 100000
    .venv/bin/python -m bench.durability --parts ingest,sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Broker, ServerProcess
from tests.ingest_support import provision_publisher, wait_for

TOPIC_FILTER = "devices/thermostat/+/telemetry"
PUBLISHERS = 4


def _publish(broker: Broker, accounts: list[tuple[str, str, list[str]]], count: int) -> float:
    """``count`` QoS 1 readings from one publisher process per device (bench/ingest.py's asyncio
    publisher, which counts every PUBACK); seconds from the first publish to the last PUBACK."""
    from bench.ingest import publish_all

    per = count // len(accounts)
    results = publish_all(broker, accounts, per, 0)
    published = sum(r["published"] for r in results)
    if published != per * len(accounts):
        raise RuntimeError(f"published {published} of {per * len(accounts)}")
    return max(r["finished"] for r in results) - min(r["started"] for r in results)


def _consumer(broker: Broker, client_id: str, *extra: str) -> list[str]:
    admin = "iotfleet-admin"
    return [
        "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-u", admin, "-P", broker.passwords[admin],
        "-V", "mqttv5", "-i", client_id, "-c", "-x", "86400", "-q", "1", "-t", TOPIC_FILTER, *extra,
    ]  # fmt: skip


def _snapshots(broker: Broker) -> int:
    assert broker.process is not None
    return broker.process.log_path.read_text(errors="replace").count("Saving in-memory database")


def _timed_snapshot(broker: Broker, db: Path) -> float:
    """SIGUSR1 makes mosquitto save now; the save ends with the rename of mosquitto.db.new over
    mosquitto.db (a new inode): the time until then is one snapshot of the current database."""
    assert broker.process is not None
    before = db.stat().st_ino if db.exists() else None
    started = time.perf_counter()
    os.kill(broker.process.pid, signal.SIGUSR1)
    wait_for(
        lambda: db.exists() and db.stat().st_ino != before,
        timeout=600,
        what="snapshot written",
        interval=0.002,
    )
    return time.perf_counter() - started


def broker_case(work: Path, name: str, config: dict[str, Any], backlog: int, probe: int) -> dict[str, Any]:
    broker = Broker(work / name, config=config)
    # Line-buffered stdout (mosquitto's log): snapshots are counted from it while it runs.
    broker.process = ServerProcess(
        "mosquitto",
        [
            "stdbuf",
            "-oL",
            shutil.which("mosquitto") or "/usr/sbin/mosquitto",
            "-c",
            str(work / name / "mosquitto.conf"),
        ],
        work / name / "mosquitto.log",
    )
    broker.start()
    try:
        devices = [f"bench{i}" for i in range(PUBLISHERS)]
        # one account (and client id) per publisher process, one device each
        accounts = [(*provision_publisher(broker, "thermostat", [d]), [d]) for d in devices]
        # live consumer: the broker's queue stays (nearly) empty
        live = subprocess.Popen(
            _consumer(broker, "live-consumer", "-C", str(probe)), stdout=subprocess.DEVNULL
        )
        wait_for(lambda: "live-consumer" in broker.process.log_tail(5) if broker.process else False,
                 timeout=10, what="live consumer connected")  # fmt: skip
        before = _snapshots(broker)
        live_s = _publish(broker, accounts, probe)
        live.wait(timeout=600)
        live_snaps = _snapshots(broker) - before
        # clean start + session expiry 0: the live consumer's session goes (it must not queue a copy)
        drop = [a for a in _consumer(broker, "live-consumer", "-E") if a != "-c"]
        drop[drop.index("-x") + 1] = "0"
        subprocess.run(drop, check=True, timeout=30)
        # offline consumer: the stalled ingest; its session holds the backlog
        subprocess.run(_consumer(broker, "stalled-ingest", "-E"), check=True, timeout=30)
        before = _snapshots(broker)
        fill_s = _publish(broker, accounts, backlog)
        fill_snaps = _snapshots(broker) - before
        before = _snapshots(broker)
        on_backlog_s = _publish(broker, accounts, probe)
        probe_snaps = _snapshots(broker) - before
        db = work / name / "mosquitto.db"
        snapshot_s = _timed_snapshot(broker, db)
        result = {
            "setting": name,
            "live_msg_per_s": round(probe / live_s),
            "live_snapshots": live_snaps,
            "fill_msg_per_s": round(backlog / fill_s),
            "fill_snapshots": fill_snaps,
            "on_backlog_msg_per_s": round(probe / on_backlog_s),
            "on_backlog_snapshots": probe_snaps,
            "db_mib": round(db.stat().st_size / 2**20, 1),
            "snapshot_s": round(snapshot_s, 2),
        }
        print(f"  broker {name}: {result}", flush=True)
        return result
    finally:
        broker.stop()


def bench_broker(backlog: int, probe: int, counts: list[int]) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="bench-durability-"))
    cases: list[tuple[str, dict[str, Any]]] = [
        ("time 30 s", {"autosave_on_changes": False, "autosave_interval": 30})
    ]
    cases += [
        (f"on changes {c:,}", {"autosave_on_changes": True, "autosave_interval": c}) for c in counts if c
    ]
    return [broker_case(work, f"{name}", config, backlog, probe) for name, config in cases]


def bench_ingest(readings: int, rounds: int, live_rate: int) -> list[dict[str, Any]]:
    from bench import ingest as ingest_bench

    results = []
    for round_ in range(rounds):
        for journal in (False, True):
            os.environ["IOTFLEET_INGEST__JOURNAL__ENABLED"] = str(journal).lower()
            for mode, rate in (("drained", 0), ("live", live_rate)):
                args = argparse.Namespace(
                    mode=mode,
                    readings=readings if mode == "drained" else readings // 2,
                    devices=1_000,
                    replicas=1,
                    publishers=4,
                    rate=rate,
                    transport="fast",
                )
                out = ingest_bench.run(args)
                row = {
                    "round": round_,
                    "journal": journal,
                    "mode": mode,
                    "rate": round(out["rate"]),
                    "incomplete": out["devices_incomplete"],
                    "p50_ms": round(out.get("latency", {}).get("p50_ms", 0)),
                    "p99_ms": round(out.get("latency", {}).get("p99_ms", 0)),
                    "load": round(out["load_average_1m_at_start"], 1),
                }
                print(f"  ingest {row}", flush=True)
                results.append(row)
    os.environ.pop("IOTFLEET_INGEST__JOURNAL__ENABLED", None)
    return results


def bench_sqlite(writes: int) -> list[dict[str, Any]]:
    """One INSERT + COMMIT per write, like one API call creating a device, on this machine's disk."""
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-sqlite-", dir=Path.cwd()))  # the real disk, not tmpfs
    for sync in ("NORMAL", "FULL", "NORMAL", "FULL"):
        path = work / f"{sync}-{time.monotonic_ns()}.db"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, type TEXT, body TEXT)")
        latencies = []
        for i in range(writes):
            started = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO devices VALUES (?, 'thermostat', ?)", (f"d{i}", "x" * 300))
            db.execute("COMMIT")
            latencies.append(time.perf_counter() - started)
        db.close()
        latencies.sort()
        row = {
            "synchronous": sync,
            "writes": writes,
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "writes_per_s": round(writes / sum(latencies)),
        }
        print(f"  sqlite {row}", flush=True)
        results.append(row)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return results


def bench_registry_api(writes: int) -> list[dict[str, Any]]:
    """``PATCH /api/v1/devices/{id}`` (one transaction, no broker call) against the real registry
    process on SQLite, with synchronous FULL and NORMAL, alternated."""
    from tests.registry_harness import ADMIN_KEY, RegistryProcess

    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=Path.cwd()))  # the real disk
    broker = Broker(work / "mosquitto").start()
    results = []
    try:
        for round_, sync in enumerate(("NORMAL", "FULL", "NORMAL", "FULL")):
            os.environ["IOTFLEET_REGISTRY__SQLITE_SYNCHRONOUS"] = sync
            registry = RegistryProcess(broker, work / f"registry-{round_}").start()
            try:
                with httpx.Client(
                    base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                ) as http:
                    device = f"sync-{round_}"
                    http.post("/api/v1/devices", json={"id": device, "type": "thermostat"}).raise_for_status()
                    latencies = []
                    for i in range(writes):
                        started = time.perf_counter()
                        http.patch(f"/api/v1/devices/{device}", json={"name": f"n{i}"}).raise_for_status()
                        latencies.append(time.perf_counter() - started)
            finally:
                registry.stop()
            latencies.sort()
            row = {
                "synchronous": sync,
                "writes": writes,
                "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
                "writes_per_s": round(writes / sum(latencies)),
            }
            print(f"  registry api {row}", flush=True)
            results.append(row)
    finally:
        os.environ.pop("IOTFLEET_REGISTRY__SQLITE_SYNCHRONOUS", None)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="broker,ingest,sqlite")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--probe", type=int, default=20_000)
    parser.add_argument("--counts", default="1000,10000", help="autosave_on_changes counts to compare")
    parser.add_argument("--readings", type=int, default=100_000, help="ingest part: drained readings")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--live-rate", type=int, default=5_000)
    parser.add_argument("--sqlite-writes", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="also write the raw results (JSON) here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"load_average_1m_at_start": os.getloadavg()[0]}
    if "broker" in parts:
        print(f"broker: backlog {args.backlog:,}, probe {args.probe:,}", flush=True)
        results["broker"] = bench_broker(
            args.backlog, args.probe, [int(c) for c in args.counts.split(",") if c]
        )
    if "ingest" in parts:
        print(f"ingest: {args.readings:,} readings, {args.rounds} rounds", flush=True)
        results["ingest"] = bench_ingest(args.readings, args.rounds, args.live_rate)
    if "sqlite" in parts:
        print("sqlite", flush=True)
        results["sqlite"] = bench_sqlite(args.sqlite_writes)
    if "api" in parts:
        print("registry api", flush=True)
        results["registry_api"] = bench_registry_api(args.sqlite_writes)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
