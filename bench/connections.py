"""How many device connections one box holds: ``iotfleet simulate`` against seeded brokers, nothing else.

    python -m bench.connections --devices 30000 --brokers 2

Each broker (a mosquitto of the stack's config, on a free port) gets
devices/brokers devices written into its dynamic-security file before it
starts (no provisioning cost), then one ``iotfleet simulate`` per broker (the
real CLI, one worker per core, ``--devices-per-source`` connections per
loopback source address) connects them all and holds them for ``--hold``
seconds, publishing at QoS 0 every 30 s. Reported: the peak of connections
held at once per broker and in total, time to connect, connect failures, RSS
of each broker and each simulator, the open-files limits.

Why several brokers: a process holds at most its hard RLIMIT_NOFILE of
sockets. Where that is below the fleet (a container without
CAP_SYS_RESOURCE), one broker cannot hold it; the box still can, split over
brokers. With the limit raised, ``--brokers 1`` measures one broker.
Writes the "Connections held on one box" section of docs/benchmarks.md with
``--write-docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.report import replace_section
from bench.workload import machine
from simulators.fleet import DeviceCredentials
from simulators.provisioning import save_credentials, spread
from simulators.worker import raise_fd_limit
from tests.devices import seed_broker
from tests.harness import Broker

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Connections held on one box"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def last_stats(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            data: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        return data
    return {}


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    raise_fd_limit(args.devices + 1_024)  # the brokers inherit it
    per_broker = args.devices // args.brokers
    brokers: list[Broker] = []
    sims: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for b in range(args.brokers):
            devices = [
                (t, f"conn{b}-{t.replace('_', '-')}-{i:05d}")
                for t, n in spread(per_broker).items()
                for i in range(n)
            ]
            broker = Broker(work / f"mosquitto-{b}")
            passwords = seed_broker(broker, devices)
            broker.start()
            brokers.append(broker)
            creds = work / f"credentials-{b}.json"
            save_credentials(creds, [DeviceCredentials(i, t, i, passwords[i], i) for t, i in devices])
            log(f"broker {b}: port {broker.port}, {len(devices):,} devices seeded")
        started = time.monotonic()
        for b, broker in enumerate(brokers):
            stats, report = work / f"stats-{b}.jsonl", work / f"report-{b}.json"
            argv = [
                sys.executable, "-m", "simulators",
                "--state-dir", str(work / f"state-{b}"),
                "--mqtt-port", str(broker.port),
                "--credentials", str(work / f"credentials-{b}.json"),
                "--devices", str(per_broker),
                "--duration", f"{args.hold}s",
                "--interval", "30s",
                "--qos", "0",
                "--ramp-up", str(args.ramp_up / args.brokers),
                "--devices-per-source", str(args.devices_per_source),
                "--no-observer", "--quiet",
                "--stats-file", str(stats),
                "--report", str(report),
            ]  # fmt: skip
            with (work / f"simulator-{b}.log").open("ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            sims.append((proc, stats, report))
        peak_total = 0
        peak: list[int] = [0] * len(brokers)
        all_at: float | None = None
        rss_brokers = [0] * len(brokers)
        rss_sims = [0] * len(brokers)
        storm: dict[str, Any] = {}
        while any(p.poll() is None for p, _s, _r in sims):
            time.sleep(1.0)
            connected = [int(last_stats(s).get("connected", 0)) for _p, s, _r in sims]
            for i, c in enumerate(connected):
                peak[i] = max(peak[i], c)
            peak_total = max(peak_total, sum(connected))
            if all_at is None and sum(connected) >= per_broker * len(brokers):
                all_at = time.monotonic() - started
                log(f"all {sum(connected):,} connected after {all_at:.1f} s")
            for i, broker in enumerate(brokers):
                if broker.process is not None:
                    rss_brokers[i] = max(rss_brokers[i], tree_rss(broker.process.pid))
                rss_sims[i] = max(rss_sims[i], tree_rss(sims[i][0].pid))
            if int(time.monotonic() - started) % 15 == 0:
                log(f"  connected {sum(connected):,} ({' + '.join(f'{c:,}' for c in connected)})")
            if args.storm and all_at is not None and not storm and time.monotonic() - started > all_at + 10:
                storm = restart_brokers(brokers, sims, per_broker * len(brokers))
        reports = [json.loads(r.read_text()) for _p, _s, r in sims]
        return {
            "devices": per_broker * len(brokers),
            "brokers": len(brokers),
            "peak_connected": peak_total,
            "peak_per_broker": peak,
            "all_connected_s": round(all_at, 1) if all_at is not None else None,
            "connect_failures": sum(r["connections"]["connect_failures"] for r in reports),
            "connect_errors": [r["connections"]["connect_errors"] for r in reports],
            "connects_by_source": [r["connections"]["connects_by_source_address"] for r in reports],
            "processes_per_simulator": reports[0]["processes"],
            "broker_rss_mib": [round(x / 2**20) for x in rss_brokers],
            "simulator_rss_mib": [round(x / 2**20) for x in rss_sims],
            "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "storm": storm,
        }
    finally:
        for proc, _s, _r in sims:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        for broker in brokers:
            broker.stop()


def restart_brokers(
    brokers: list[Broker], sims: list[tuple[subprocess.Popen[bytes], Path, Path]], total: int
) -> dict[str, Any]:
    """Connect storm: every broker restarted at once under its connected fleet; time until all are back."""
    log(f"connect storm: restarting {len(brokers)} broker(s) under {total:,} connections")
    reconnects_before = sum(int(last_stats(s).get("reconnects", 0)) for _p, s, _r in sims)
    down = time.monotonic()
    threads = [threading.Thread(target=b.restart) for b in brokers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    up = time.monotonic()
    while time.monotonic() - up < 300:
        stats = [last_stats(s) for _p, s, _r in sims]
        connected = sum(int(x.get("connected", 0)) for x in stats)
        reconnected = sum(int(x.get("reconnects", 0)) for x in stats) - reconnects_before
        # Every device reconnected once (the stats file may still show the moment before the restart).
        if connected >= total and reconnected >= total:
            back = time.monotonic() - up
            log(f"  all {total:,} back {back:.1f} s after the brokers were up ({up - down:.1f} s restart)")
            return {"restart_s": round(up - down, 1), "all_back_after_s": round(back, 1)}
        time.sleep(0.25)
    return {"restart_s": round(up - down, 1), "all_back_after_s": None}


def render(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    kib = sum(result["broker_rss_mib"]) * 1024 / max(1, result["peak_connected"])
    sim_kib = sum(result["simulator_rss_mib"]) * 1024 / max(1, result["peak_connected"])
    sources = sorted({a for per in result["connects_by_source"] for a in per})
    return "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {info['cores']} cores, "
            f"{info['memory_gib']} GiB, {info['mosquitto']}; open-files limit (soft, hard) {result['fd_limit']}.",
            "",
            f"Command: `{command}`",
            "",
            "| what | measured |",
            "|---|---|",
            f"| connections held at once (peak), box-wide | **{result['peak_connected']:,}** of "
            f"{result['devices']:,} |",
            f"| per broker ({result['brokers']} mosquitto processes) | "
            + " + ".join(f"{p:,}" for p in result["peak_per_broker"])
            + " |",
            f"| time until all connected (ramp-up bounded at --ramp-up) | {result['all_connected_s']} s |",
            f"| connect failures | {result['connect_failures']:,} |",
            f"| simulator | {result['processes_per_simulator']} worker processes per broker, connections "
            f"from {', '.join(sources)} |",
            f"| broker RSS | {' + '.join(str(m) for m in result['broker_rss_mib'])} MiB ≈ {kib:.1f} KiB "
            "per connection |",
            f"| simulator RSS | {' + '.join(str(m) for m in result['simulator_rss_mib'])} MiB ≈ {sim_kib:.1f} "
            "KiB per device |",
            *(
                [
                    f"| connect storm: every broker restarted under its connected fleet; all back after | "
                    f"**{result['storm']['all_back_after_s']} s** (restart {result['storm']['restart_s']} s; "
                    "full-jitter backoff 0.5 → 30 s) |"
                ]
                if result.get("storm")
                else []
            ),
            "",
            "A fixed 10 s CONNACK timeout in the simulator (before this run) made the same storm never converge:",
            "80 s after the restart 160 of 15,000 devices per broker were back, the brokers nearly idle, every",
            "device giving up on a CONNECT the broker then processed for nothing and queueing again. Devices now",
            "wait 10 s, doubled with each consecutive failure up to 120 s (simulators/README.md, for firmware",
            "authors). The machine was shared (load average 10-14 on its 2 cores) during these runs.",
            "",
            "Several brokers only because this machine's hard RLIMIT_NOFILE is 20,000 and its root lacks",
            "CAP_SYS_RESOURCE: no single process here can hold more than ~20,000 sockets. Where the hard limit",
            "may be raised, `iotfleet up` gives the broker 131,072 (supervisord `minfds`), and `--brokers 1`",
            "measures one broker holding the whole fleet.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=30_000)
    parser.add_argument("--brokers", type=int, default=2)
    parser.add_argument("--hold", type=float, default=90.0, help="seconds the fleet runs")
    parser.add_argument(
        "--ramp-up", type=float, default=2_000.0, help="connections opened per second, in all"
    )
    parser.add_argument("--devices-per-source", type=int, default=8_000)
    parser.add_argument("--storm", action="store_true", help="restart the brokers once all are connected")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.connections", *(argv if argv is not None else sys.argv[1:])])
    info = machine()
    with tempfile.TemporaryDirectory(prefix="iotfleet-bench-conn-") as tmp:
        result = run(args, Path(tmp))
    text = render(result, info, command)
    print(text, flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "connections.json").write_text(json.dumps(result, indent=2))
    if args.write_docs:
        replace_section(SECTION, text)
    return 0 if result["peak_connected"] >= result["devices"] else 1


if __name__ == "__main__":
    os.environ.setdefault("IOTFLEET_LOG_LEVEL", "WARNING")
    sys.exit(main())
