"""MQTT over TLS vs plain, on one fresh stack (`iotfleet up --listen 127.0.0.1`), in one run.

Writes the "Devices over TLS" section of docs/benchmarks.md (with --write-docs) and
bench/results/tls.json. Against the stack's listeners: plain MQTT (loopback), TLS
with passwords (IOTFLEET_TLS__PORT) and TLS with client certificates issued by the
registry (IOTFLEET_TLS__CERT_PORT); devices provisioned through the public bulk API.

1. Connections: N devices connected by the simulator's own MQTT client, each
   transport in a fresh process (100 attempts in flight): devices/s (TCP + TLS
   handshake + CONNECT → CONNACK 0) and the RSS delta per connection; plain, TLS
   through the simulator's memory-BIO bridge, TLS with client certificates, and
   TLS through asyncio's own SSL transport (the design not taken).
2. Sustained readings/s: the real CLI (`python -m simulators`, one process), M
   devices publishing every 50 ms at QoS 1 through the whole stack for D seconds
   (offered more than one process publishes): broker-acked readings/s, plain vs
   TLS, and the process RSS per device.
3. Scale: `iotfleet simulate --tls --verify` with S devices, a reading every 10 s.

Usage: ``python -m bench.tls --write-docs`` (≈ 10 min) or smaller sizes, e.g.
``--devices 1000 --rate-devices 200 --scale 2000 --scale-duration 60`` (what
``make bench`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.report import replace_section  # noqa: E402
from bench.workload import machine  # noqa: E402
from iotfleet.stack import probes  # noqa: E402

SECTION = "Devices over TLS"
IN_FLIGHT = 100  # connection attempts in flight at once in the connect-rate probes
RESULTS = ROOT / "bench" / "results"
IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class EdgeStack:
    """A fresh stack on free ports listening on loopback (TLS listeners + HTTPS), in a temp dir."""

    def __init__(self, work: Path) -> None:
        mqtt, influx, api, rpc, base = probes.free_ports(4, block=8)
        https, tls, cert = probes.free_ports(3)
        self.state = work / "state"
        self.client_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IOTFLEET_")}
        self.env = {
            **self.client_env,
            "IOTFLEET_STATE_DIR": str(self.state),
            "IOTFLEET_MQTT__PORT": str(mqtt),
            "IOTFLEET_INFLUX__URL": f"http://127.0.0.1:{influx}",
            "IOTFLEET_REGISTRY__PORT": str(api),
            "IOTFLEET_REGISTRY__HTTPS_PORT": str(https),
            "IOTFLEET_STACK__INFLUX_RPC_PORT": str(rpc),
            "IOTFLEET_STACK__SERVICE_PORT_BASE": str(base),
            "IOTFLEET_TLS__PORT": str(tls),
            "IOTFLEET_TLS__CERT_PORT": str(cert),
        }
        self.ports = {"mqtt": mqtt, "tls": tls, "cert": cert, "api": api}

    def up(self) -> None:
        done = subprocess.run(
            [*IOTFLEET, "up", "--detach", "--listen", "127.0.0.1"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"iotfleet up failed: {done.stderr[-2000:]}")

    def down(self) -> None:
        subprocess.run([*IOTFLEET, "down"], env=self.env, capture_output=True, timeout=120, check=False)

    def broker_pid(self) -> int | None:
        status = subprocess.run(
            [*IOTFLEET, "status", "--json"], env=self.env, capture_output=True, text=True, check=False
        )
        for part in json.loads(status.stdout or "{}").get("parts", []):
            if part["name"] == "mosquitto":
                return int(part["pid"]) if part["pid"] else None
        return None


def simulate(stack: EdgeStack, label: str, credentials: Path, *flags: str) -> dict[str, Any]:
    """One run of the real CLI (its own process); returns its report."""
    report = credentials.parent / f"report-{label}.json"
    argv = [
        sys.executable,
        "-m",
        "simulators",
        "--state-dir",
        str(stack.state),
        "--credentials",
        str(credentials),
        "--report",
        str(report),
        "--quiet",
        *flags,
    ]
    log(f"{label}: simulate {' '.join(flags)}")
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env=stack.client_env, capture_output=True, text=True, check=False)
    if not report.exists():
        raise RuntimeError(
            f"{label}: simulator exited {done.returncode} without a report: {done.stderr[-2000:]}"
        )
    data: dict[str, Any] = json.loads(report.read_text())
    data["exit_code"] = done.returncode
    data["wall_s"] = round(time.monotonic() - started, 1)
    return data


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    conn, pub, res = report["connections"], report["published"], report["resources"]
    verify = report.get("verify") or {}
    after = conn.get("all_connected_after_s")
    return {
        "devices": report["devices"],
        "processes": report["processes"],
        "connects": conn["connects"],
        "connect_failures": conn["connect_failures"],
        "all_connected_after_s": after,
        "connect_rate_per_s": round(report["devices"] / after, 1) if after else None,
        "readings_acked": pub["broker_acked"],
        "rate_per_s": pub["rate_per_s"],
        "peak_rate_per_s": pub["peak_rate_per_s"],
        "rss_bytes": res["rss_bytes"],
        "rss_per_device_bytes": res["rss_per_device_bytes"],
        "verify": {k: verify.get(k) for k in ("ok", "expected", "stored", "missing", "duplicates")}
        if verify
        else None,
        "exit_code": report["exit_code"],
    }


AUTH_FLAGS = {"plain": [], "tls": ["--tls"]}


def sustained(stack: EdgeStack, work: Path, devices: int, duration: int) -> dict[str, Any]:
    out = {}
    for mode in ("plain", "tls"):
        report = simulate(
            stack,
            f"rate-{mode}",
            work / "creds-rate.json",
            "--devices",
            str(devices),
            "--duration",
            str(duration),
            "--interval",
            "50ms",
            "--jitter",
            "0.5",
            "--processes",
            "1",
            "--stats-file",
            str(work / f"stats-{mode}.jsonl"),
            *AUTH_FLAGS[mode],
        )
        out[mode] = _summary(report)
        out[mode]["duration_s"] = duration
        out[mode]["steady_rate_per_s"] = steady_rate(work / f"stats-{mode}.jsonl", duration)
        log(f"  {mode}: {out[mode]}")
    return out


def steady_rate(stats_file: Path, duration: int) -> float | None:
    """Broker-acked readings/s from the moment every device is connected to the end of the run's
    duration (per-second counters; the drain after it, when nothing new is published, left out)."""
    lines = [json.loads(line) for line in stats_file.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    end = lines[0]["t"] + duration
    steady = [
        x
        for x in lines
        if x.get("phase") == "running" and x.get("connected") == x.get("devices") and x["t"] <= end
    ]
    if len(steady) < 3:
        return None
    first, last = steady[0], steady[-1]
    return round(float(last["readings_acked"] - first["readings_acked"]) / float(last["t"] - first["t"]), 1)


def scale(stack: EdgeStack, work: Path, devices: int, duration: int, ramp_up: int) -> dict[str, Any]:
    pid = stack.broker_pid()
    report = simulate(
        stack,
        "scale-tls",
        work / "creds-scale.json",
        "--devices",
        str(devices),
        "--duration",
        str(duration),
        "--interval",
        "10s",
        "--ramp-up",
        str(ramp_up),
        "--verify",
        "--verify-timeout",
        "120s",
        "--tls",
    )
    out = _summary(report)
    out["ramp_up_per_s"], out["duration_s"] = ramp_up, duration
    if pid is not None:
        out["broker_rss_bytes"] = psutil.Process(pid).memory_info().rss
    log(f"  scale: {out}")
    return out


# --- marginal RSS of one connection (a fresh process per transport) ---------------------------


def provision(stack: EdgeStack, work: Path, count: int, certificates: bool) -> Path:
    """``count`` devices through the registry's bulk API (certificate devices: key + certificate files)."""
    from simulators.provisioning import RegistryProvisioner, save_credentials, spread

    path = work / f"creds-probe-{'cert' if certificates else 'password'}.json"
    key = (stack.state / "admin-api-key").read_text().strip()
    started = time.monotonic()
    devices = RegistryProvisioner(f"http://127.0.0.1:{stack.ports['api']}", key).provision(
        spread(count), cert_dir=work / "certs" if certificates else None
    )
    log(
        f"  provisioned {count:,} {'certificate' if certificates else 'password'} devices in {time.monotonic() - started:.1f} s"
    )
    save_credentials(path, devices)
    return path


PROBES = ("plain", "tls", "cert", "asyncio-ssl")
PARTS = ("connections", "sustained", "scale")


def connections(stack: EdgeStack, work: Path, count: int, skip_cert: bool) -> dict[str, Any]:
    """Each transport in a fresh process: connect ``count`` devices, 100 handshakes in flight at most."""
    passwords = provision(stack, work, count, certificates=False)
    certificates = None if skip_cert else provision(stack, work, count, certificates=True)
    out = {}
    for transport in PROBES:
        if transport == "cert" and certificates is None:
            continue
        port = {"plain": stack.ports["mqtt"], "cert": stack.ports["cert"]}.get(transport, stack.ports["tls"])
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.tls",
                "--probe",
                transport,
                "--probe-credentials",
                str(certificates if transport == "cert" else passwords),
                "--probe-port",
                str(port),
                "--probe-ca",
                str(stack.state / "tls" / "ca.crt"),
            ],
            cwd=ROOT,
            env=stack.client_env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe {transport} failed: {done.stderr[-2000:]}")
        out[transport] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  {transport}: {out[transport]}")
    return out


def probe(transport: str, credentials: Path, port: int, cafile: Path) -> dict[str, Any]:
    """Connect every device of the file (CONNACK 0), report the RSS delta per connection."""
    import ssl

    from simulators import mqtt
    from simulators.provisioning import load_credentials
    from simulators.tls import ClientContexts, TlsOptions

    devices = load_credentials(credentials)

    class Waiter(mqtt.MqttHandler):
        __slots__ = ("done",)

        def __init__(self) -> None:
            self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connack(self, reason: int, session_present: bool, receive_maximum: int) -> None:
            if not self.done.done():
                self.done.set_result(reason)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        contexts = ClientContexts(TlsOptions(str(cafile)))
        native = ssl.create_default_context(cafile=str(cafile))
        gc.collect()
        before = psutil.Process().memory_info().rss
        held: list[Any] = []
        gate = asyncio.Semaphore(IN_FLIGHT)
        started = time.perf_counter()

        async def one(device: Any) -> None:
            async with gate:
                waiter = Waiter()
                password = None if device.cert_file else device.password
                packet = mqtt.encode_connect(
                    device.client_id, username=device.username, password=password, keepalive=300
                )
                if transport == "asyncio-ssl":
                    _t, connection = await loop.create_connection(
                        lambda: mqtt.MqttConnection(waiter), "127.0.0.1", port, ssl=native
                    )
                    connection.write(packet)
                else:
                    tls = None
                    if transport != "plain":
                        tls = (contexts.for_device(device.id, device.cert_file), "127.0.0.1")
                    connection = await mqtt.open_connection(waiter, "127.0.0.1", port, packet, tls=tls)
                if await asyncio.wait_for(waiter.done, 30) != 0:
                    raise RuntimeError("CONNACK refused")
                held.append((connection, waiter))

        await asyncio.gather(*(one(d) for d in devices))
        connect_s = time.perf_counter() - started
        gc.collect()
        after = psutil.Process().memory_info().rss
        for connection, _waiter in held:
            connection.disconnect()
        await asyncio.sleep(0.5)
        return {
            "connections": len(held),
            "connect_s": round(connect_s, 2),
            "connect_rate_per_s": round(len(held) / connect_s, 1),
            "kib_per_connection": round((after - before) / len(held) / 1024, 1),
        }

    return asyncio.run(run())


# --- report ------------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def render(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    c, r, s = result["connections"], result["sustained"], result["scale"]
    n = c["plain"]["connections"]

    def cell(mode: str, key: str, fmt: str) -> str:
        return fmt.format(c[mode][key]) if mode in c else "–"

    def ratio(mode: str) -> str:
        return f"{c[mode]['connect_rate_per_s'] / c['plain']['connect_rate_per_s']:.2f}" if mode in c else "–"

    lines = [
        f"Measured {result['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']},"
        f" Python {m['python']}, {m['mosquitto']}; load average {result['load_before']} before,"
        f" {result['load_after']} after (the machine was shared with other work: absolute rates are low,"
        " the ratios are what this section is for).",
        "",
        f"Command: `{command}`",
        "",
        "One fresh stack (`iotfleet up --listen 127.0.0.1`). Plain = the broker's MQTT port; TLS = its"
        " device listener for passwords (TLS 1.2+, ECDSA P-256 server certificate of the platform CA; every"
        " device checks the chain and the host name); cert = the certificate listener, each device with its"
        " own client certificate issued by the registry (`auth: certificate`). Devices provisioned through"
        " the public bulk API.",
        "",
        f"**Connections** ({n:,} devices, each transport in a fresh simulator process, {IN_FLIGHT} connection"
        " attempts in flight; TCP + TLS handshake + CONNECT → CONNACK 0):",
        "",
        "| what | plain | TLS, password (simulator bridge) | TLS, client certificate (bridge) |"
        " TLS, password, asyncio's SSL transport |",
        "|---|---|---|---|---|",
        "| connect rate | "
        + " | ".join(cell(k, "connect_rate_per_s", "**{:,.0f} devices/s**") for k in PROBES)
        + " |",
        "| ratio to plain | 1 | " + " | ".join(ratio(k) for k in PROBES[1:]) + " |",
        "| simulator memory per connection (RSS delta / connections) | "
        + " | ".join(cell(k, "kib_per_connection", "**{} KiB**") for k in PROBES)
        + " |",
        "",
        "The simulator speaks TLS through a memory-BIO bridge (`simulators/tls.py`): one `SSLContext`"
        " per process for password devices, OpenSSL's per-connection state only. asyncio's own SSL"
        " transport (`create_connection(ssl=…)`) gives each connection a 256 KiB read buffer (CPython 3.11"
        " `SSLProtocol.max_size`), the last column. A certificate device also holds its own `SSLContext`"
        " (Python's `ssl` sets a client certificate per context, not per connection), built on its first"
        " connect: the cert column's extra memory and time.",
        "",
        f"**Sustained readings/s** ({r['plain']['devices']:,} devices, a reading every 50 ms each: 10,000/s"
        " offered, more than one simulator process publishes here; QoS 1, through the whole stack; one"
        f" {r['plain']['duration_s']:.0f} s run each): broker-acked readings/s once every device is connected"
        " (the simulator's per-second counters), and the best second.",
        "",
        "| what | plain | TLS, password |",
        "|---|---|---|",
        f"| broker-acked readings/s, all connected | **{r['plain']['steady_rate_per_s']:,.0f}** |"
        f" **{r['tls']['steady_rate_per_s']:,.0f}** |",
        f"| ratio to plain | 1 | **{r['tls']['steady_rate_per_s'] / r['plain']['steady_rate_per_s']:.2f}** |",
        f"| best second | {r['plain']['peak_rate_per_s']:,.0f} | {r['tls']['peak_rate_per_s']:,.0f} |",
        f"| all connected after | {r['plain']['all_connected_after_s']} s | {r['tls']['all_connected_after_s']} s |",
        f"| simulator RSS / device (whole process, interpreter included) | {_kib(r['plain']['rss_per_device_bytes'])}"
        f" | {_kib(r['tls']['rss_per_device_bytes'])} |",
        "",
        f"**Scale over TLS**: {s['devices']:,} password devices over TLS (`iotfleet simulate --tls --verify`,"
        f" {s['processes']} processes, ramp-up {s['ramp_up_per_s']:,.0f}/s, a reading every 10 s for"
        f" {s['duration_s']:,.0f} s): "
        + (
            f"all connected after {s['all_connected_after_s']} s"
            if s["all_connected_after_s"] is not None
            else f"NOT all connected ({s['connects']:,} connects)"
        )
        + f""
        f" ({s['connect_failures']} connect failures), {s['readings_acked']:,} readings broker-acked,"
        f" stored {s['verify']['stored']:,} of {s['verify']['expected']:,}: **{s['verify']['missing']}"
        f" missing, {s['verify']['duplicates']} duplicate**; simulator {_mib(s['rss_bytes'])}"
        f" ({_kib(s['rss_per_device_bytes'])} per device, whole processes)"
        + (f", broker {_mib(s['broker_rss_bytes'])}" if s.get("broker_rss_bytes") else "")
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000, help="devices per connection probe")
    parser.add_argument("--rate-devices", type=int, default=500, help="sustained-rate fleet (every 50 ms)")
    parser.add_argument("--rate-duration", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10_000, help="devices of the TLS scale run")
    parser.add_argument("--scale-duration", type=int, default=300)
    parser.add_argument(
        "--scale-ramp-up",
        type=int,
        default=60,
        help="connections/s of the scale run: below the TLS connect rate, or connects time out and retry",
    )
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--skip-cert", action="store_true", help="no certificate devices (a CA without its key)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable); the others are taken from bench/results/tls.json",
    )
    parser.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    parser.add_argument("--probe-credentials", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-ca", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_credentials, args.probe_port, args.probe_ca)))
        return
    # A stop (SIGTERM) still takes the stack down (the finally below).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    command = ".venv/bin/python -m bench.tls " + " ".join(sys.argv[1:])
    parts = args.only or list(PARTS)
    result: dict[str, Any] = {}
    if args.only:  # the other parts from the last full run (its command is kept with them)
        result = json.loads((RESULTS / "tls.json").read_text())
        command = f"{result.get('command', '?')}`, then `{command}"
    result.update(date=time.strftime("%Y-%m-%d"), machine=machine(), load_before=round(os.getloadavg()[0], 1))
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        stack = EdgeStack(work)
        log("starting the stack (--listen 127.0.0.1)")
        stack.up()
        try:
            if "connections" in parts:
                log(f"connections: {args.devices:,} devices per transport (plain, TLS, TLS + certificates)")
                result["connections"] = connections(stack, work, args.devices, args.skip_cert)
            if "sustained" in parts:
                log(f"sustained readings/s: {args.rate_devices:,} devices every 50 ms, plain / TLS")
                result["sustained"] = sustained(stack, work, args.rate_devices, args.rate_duration)
            if "scale" in parts:
                log(f"scale: {args.scale:,} devices over TLS for {args.scale_duration} s, --verify")
                result["scale"] = scale(stack, work, args.scale, args.scale_duration, args.scale_ramp_up)
        finally:
            stack.down()
    result["load_after"] = round(os.getloadavg()[0], 1)
    result["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tls.json").write_text(json.dumps(result, indent=2))
    body = render(result, command)
    print(body)
    if args.write_docs:
        replace_section(SECTION, body)
        log(f"docs/benchmarks.md section {SECTION!r} written")


if __name__ == "__main__":
    main()
