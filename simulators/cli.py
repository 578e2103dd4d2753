"""``iotfleet simulate`` (and ``python -m simulators``): run a simulated device fleet against the stack.

With no flag but ``--devices N``, ``--duration`` and ``--verify`` it works
against a stack started by ``iotfleet up`` from the same state dir, whatever
ports it was started with (read from ``<state_dir>/stack.json`` while it runs;
a flag or an ``IOTFLEET_*`` variable still overrides them): devices
are provisioned through the registry API with the admin key in
``<state_dir>/admin-api-key`` and their credentials saved to
``<state_dir>/simulator/credentials.json`` for reuse; the observer uses the
registry's MQTT account from ``<state_dir>/secrets.json``.

Examples::

    iotfleet simulate --devices 100 --duration 60 --verify
    iotfleet simulate --scenario simulators/scenarios/faults.yaml --verify
    iotfleet simulate --type thermostat=500 --type smart_plug=500 --interval 1s --qos 1 --processes 2
    iotfleet simulate --devices 50 --fault malformed:0.1,probability=0.2 --fault disconnect:0.1,every_s=30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from iotfleet.cli import build_settings  # the same stack flags as `iotfleet up`
from iotfleet.errors import ConfigError, IotfleetError
from iotfleet.settings import Settings
from simulators import addresses, provisioning
from simulators.faults import FaultKind, FaultSpec
from simulators.fleet import DeviceCredentials
from simulators.observer import ObserverCredentials
from simulators.runner import RunPlan, render_report, run_plan
from simulators.scenario import SCENARIO_DIR, Scenario, load_scenario, parse_duration

OBSERVER_ACCOUNT = "iotfleet-registry"  # may read devices/# and deadletter/#, and publish commands


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _type_count(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected TYPE=COUNT (e.g. thermostat=100), got {text!r}")
    return name.strip(), int(count)


def parse_fault(text: str) -> FaultSpec:
    """``kind[:fraction][,key=value...]``, e.g. ``malformed:0.1,probability=0.2`` or ``disconnect:0.05``."""
    head, _, rest = text.partition(",")
    kind, _, fraction = head.partition(":")
    data: dict[str, Any] = {"kind": kind.strip()}
    if fraction:
        data["fraction"] = fraction
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"fault option {item!r}: expected key=value")
        key = key.strip()
        data[key] = value.split("+") if key in ("devices", "types") else value
    try:
        return FaultSpec.model_validate(data)
    except ValidationError as exc:
        kinds = ", ".join(k.value for k in FaultKind)
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise argparse.ArgumentTypeError(
            f"--fault {text!r}: {where}: {first['msg']} (kinds: {kinds})"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's flags (the ``iotfleet`` CLI adds --state-dir/--mqtt-port/... itself)."""
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--scenario", type=Path, help="scenario YAML (flags below override its values)")
    fleet.add_argument("--devices", type=int, help="number of devices, spread over all types (default 40)")
    fleet.add_argument(
        "--type",
        dest="type_counts",
        action="append",
        type=_type_count,
        metavar="TYPE=N",
        help="devices of one type (repeatable); e.g. --type thermostat=100",
    )
    fleet.add_argument("--duration", type=_duration, help="how long to run: 90, 90s, 5m, 1h (default 60s)")
    fleet.add_argument("--interval", type=_duration, help="publish interval per device (default 10s)")
    fleet.add_argument("--jitter", type=float, help="± fraction of the interval (default 0.1)")
    fleet.add_argument("--batch", type=int, help="readings per message, a JSON array when > 1 (default 1)")
    fleet.add_argument("--qos", type=int, choices=(0, 1), help="telemetry QoS (default 1)")
    fleet.add_argument(
        "--ramp-up",
        type=float,
        help="connections opened per second at the start, fleet-wide (default 1000): a bounded ramp, not a storm",
    )
    fleet.add_argument(
        "--processes",
        type=int,
        help="fleet processes (default: one per core, at most one per 1,000 devices)",
    )
    fleet.add_argument(
        "--backoff-base", type=_duration, help="reconnect backoff, first window (default 0.5s; full jitter)"
    )
    fleet.add_argument(
        "--backoff-cap", type=_duration, help="reconnect backoff, largest window (default 30s)"
    )
    fleet.add_argument(
        "--resend-unrouted",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send telemetry again after PUBACK 0x10 (no subscriber yet, e.g. right after a broker restart);"
        " default on (the device contract); off to measure the broker alone",
    )
    fleet.add_argument(
        "--source-address",
        dest="source_addresses",
        action="append",
        metavar="IP",
        help="open connections from this local address (repeatable; default: 127.0.0.2, .3, … when the"
        " broker is on loopback and the fleet is larger than --devices-per-source, else the OS's choice)",
    )
    fleet.add_argument(
        "--devices-per-source",
        type=int,
        default=addresses.PER_SOURCE,
        help=f"connections per source address (default {addresses.PER_SOURCE:,}; one address pair has"
        " ~28,000 ephemeral ports)",
    )
    fleet.add_argument("--seed", type=int, help="random seed: same seed, same signals and faulty devices")
    fleet.add_argument(
        "--fault",
        action="append",
        type=parse_fault,
        metavar="KIND[:FRACTION][,k=v]",
        help="inject a fault (repeatable): " + ", ".join(k.value for k in FaultKind),
    )
    fleet.add_argument(
        "--commands-rate", type=float, help="commands per second the simulator sends to its devices"
    )
    secure = parser.add_argument_group("TLS")
    secure.add_argument(
        "--tls",
        action="store_true",
        help="connect the devices to the broker's TLS listener (CA and port from the running stack:"
        " <state_dir>/stack.json, else <state_dir>/tls/ca.crt and IOTFLEET_TLS__PORT / __CERT_PORT)",
    )
    secure.add_argument(
        "--auth",
        choices=("password", "cert"),
        default="password",
        help="how devices authenticate: password (default), or cert: X.509 client certificates issued by the"
        " registry (devices provisioned with auth=certificate; implies --tls)",
    )
    secure.add_argument("--cafile", type=Path, help="CA certificate the broker's must chain to (with --tls)")
    secure.add_argument("--tls-host", help="broker address for TLS (default: the stack's --listen address)")
    secure.add_argument("--tls-port", type=int, help="broker TLS port (default: the stack's, per --auth)")
    access = parser.add_argument_group("provisioning and accounts")
    access.add_argument(
        "--credentials",
        type=Path,
        help="credentials file to reuse/save (default <state_dir>/simulator/credentials.json)",
    )
    access.add_argument(
        "--reprovision", action="store_true", help="provision new devices even if the file has enough"
    )
    access.add_argument(
        "--api-url",
        help="registry API base URL (default: the running stack's, else IOTFLEET_REGISTRY__HOST/PORT)",
    )
    access.add_argument("--api-key", help="registry admin API key (default <state_dir>/admin-api-key)")
    access.add_argument(
        "--observer-user", help=f"MQTT account for dead letters/acks (default {OBSERVER_ACCOUNT})"
    )
    access.add_argument("--observer-password", help="its password (default from <state_dir>/secrets.json)")
    access.add_argument("--no-observer", action="store_true", help="do not count dead letters, acks, LWTs")
    out = parser.add_argument_group("verification and report")
    out.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the run, read back stored seqs per device and report missing/duplicates",
    )
    out.add_argument(
        "--verify-source",
        choices=("auto", "api", "influx"),
        default="auto",
        help="where --verify reads: registry API, InfluxDB directly, or auto (API, else InfluxDB)",
    )
    out.add_argument(
        "--verify-timeout", type=_duration, default=60.0, help="wait for the ingest (default 60s)"
    )
    out.add_argument(
        "--report", type=Path, help="JSON report path (default <state_dir>/simulator/report-*.json)"
    )
    out.add_argument("--quiet", action="store_true", help="no live progress (the final report is printed)")
    out.add_argument(
        "--stats-file",
        type=Path,
        help="append one JSON line of fleet-wide counters per second here (for benchmarks and dashboards)",
    )


def build_scenario(args: argparse.Namespace) -> Scenario:
    scenario_path: Path | None = getattr(args, "scenario", None)
    if scenario_path is None and getattr(args, "command", None) == "demo":
        scenario_path = SCENARIO_DIR / "demo.yaml"
    scenario = load_scenario(scenario_path) if scenario_path is not None else Scenario()
    updates: dict[str, Any] = {}
    for flag, key in (
        ("devices", "devices"),
        ("duration", "duration"),
        ("interval", "interval"),
        ("jitter", "jitter"),
        ("batch", "batch"),
        ("qos", "qos"),
        ("ramp_up", "ramp_up"),
        ("processes", "processes"),
        ("backoff_base", "backoff_base"),
        ("backoff_cap", "backoff_cap"),
        ("resend_unrouted", "resend_unrouted"),
        ("seed", "seed"),
        ("verify", "verify"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            updates[key] = value
    if getattr(args, "type_counts", None):
        updates["types"] = dict(args.type_counts)
        if "devices" not in updates:
            updates["devices"] = None
    if getattr(args, "fault", None):
        updates["faults"] = list(scenario.faults) + list(args.fault)
    if getattr(args, "commands_rate", None) is not None:
        updates["commands"] = {"rate_per_s": args.commands_rate, "ttl_s": scenario.commands.ttl_s}
    try:
        return Scenario.model_validate({**scenario.model_dump(), **updates})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid simulator options: {problems}") from None


def resolve_devices(
    args: argparse.Namespace, settings: Settings, counts: dict[str, int], console: Console
) -> tuple[list[DeviceCredentials], str, Path]:
    """Reuse the credentials file if it has enough devices of each type (and auth); provision the rest."""
    path: Path = getattr(args, "credentials", None) or settings.state_dir / "simulator" / "credentials.json"
    certificates = getattr(args, "auth", "password") == "cert"
    kept: list[DeviceCredentials] = []
    if path.exists() and not getattr(args, "reprovision", False):
        kept = provisioning.load_credentials(path)
    # Password and certificate devices share the file; a run uses those of its --auth only.
    existing = [d for d in kept if (d.cert_file is not None) == certificates]
    others = [d for d in kept if (d.cert_file is not None) != certificates]
    missing = provisioning.missing_counts(existing, counts)
    if not missing:
        return provisioning.select(existing, counts), f"reused {path}", path
    api_url = _api_url(args, settings)
    api_key = getattr(args, "api_key", None) or provisioning.read_api_key(settings.state_dir)
    if not api_key:
        raise provisioning.ProvisioningError(
            f"need {sum(missing.values())} more device(s) ({', '.join(f'{t}={n}' for t, n in missing.items())})"
            f" but no registry API key: start the stack with `iotfleet up` (it writes"
            f" {settings.state_dir / 'admin-api-key'}), pass --api-key, or pass --credentials FILE"
        )
    console.print(escape(f"provisioning {sum(missing.values()):,} device(s) through {api_url} …"))
    started = time.monotonic()
    cafile = _cafile(args, settings) if api_url.startswith("https://") else None
    new = provisioning.RegistryProvisioner(api_url, api_key, cafile=cafile).provision(
        missing,
        on_progress=lambda done, total: console.print(f"  {done:,}/{total:,} provisioned"),
        cert_dir=path.parent / "certs" if certificates else None,
    )
    console.print(f"provisioned {len(new):,} device(s) in {time.monotonic() - started:.1f} s")
    provisioning.save_credentials(path, others + existing + new)
    kind = "certificate devices" if certificates else "devices"
    note = f"provisioned {len(new)} {kind} via registry, saved to {path}"
    return provisioning.select(existing + new, counts), note, path


def _api_url(args: argparse.Namespace, settings: Settings) -> str:
    url: str | None = getattr(args, "api_url", None)
    return url or f"http://{settings.registry.host}:{settings.registry.port}"


def _stack_tls(settings: Settings) -> dict[str, Any]:
    """The TLS endpoints of the stack running from the state dir (``tls`` in stack.json), or {}."""
    try:
        stored = json.loads((settings.state_dir / "stack.json").read_text()).get("tls")
    except (OSError, ValueError, AttributeError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _cafile(args: argparse.Namespace, settings: Settings) -> Path:
    explicit: Path | None = getattr(args, "cafile", None)
    if explicit is not None:
        return explicit
    stored = _stack_tls(settings).get("ca_cert")
    if stored:
        return Path(stored)
    return settings.tls.ca_cert or settings.state_dir / "tls" / "ca.crt"


def resolve_tls(args: argparse.Namespace, settings: Settings) -> tuple[str, int, Path] | None:
    """Where devices connect over TLS (host, port, CA file), or None for plain MQTT.

    The stack's listeners bind IOTFLEET_STACK__LISTEN; a wildcard (0.0.0.0) is reached on loopback,
    whose address is in the server certificate too.
    """
    certificates = getattr(args, "auth", "password") == "cert"
    if not (getattr(args, "tls", False) or certificates):
        return None
    stored = _stack_tls(settings)
    key = "mqtts_certificate" if certificates else "mqtts_password"
    port: int | None = getattr(args, "tls_port", None)
    host: str | None = getattr(args, "tls_host", None)
    if stored.get(key):
        stored_host, _, stored_port = str(stored[key]).removeprefix("mqtts://").rpartition(":")
        host = host or stored_host.strip("[]")
        port = port or int(stored_port)
    host = host or settings.stack.listen
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = port or (settings.tls.cert_port if certificates else settings.tls.port)
    cafile = _cafile(args, settings)
    if not cafile.exists():
        raise ConfigError(
            f"--tls: no CA certificate at {cafile}: start the stack with `iotfleet up` (it makes"
            f" {settings.state_dir / 'tls' / 'ca.crt'}) or pass --cafile"
        )
    return host, port, cafile


def resolve_observer(args: argparse.Namespace, settings: Settings) -> tuple[ObserverCredentials | None, str]:
    if getattr(args, "no_observer", False):
        return None, "disabled (--no-observer)"
    user = getattr(args, "observer_user", None)
    password = getattr(args, "observer_password", None)
    if user is None and settings.mqtt.username:
        user = settings.mqtt.username
        password = password or (settings.mqtt.password.get_secret_value() if settings.mqtt.password else None)
    if user is None:
        user = OBSERVER_ACCOUNT
    if password is None:
        password = provisioning.read_stack_secrets(settings.state_dir).get(user)
    if password is None:
        return None, (
            f"no password for observer account {user!r} (not in {settings.state_dir / 'secrets.json'});"
            " pass --observer-user/--observer-password to count dead letters and command round trips"
        )
    return ObserverCredentials(settings.mqtt.host, settings.mqtt.port, user, password), ""


def run(args: argparse.Namespace) -> int:
    """Entry point used by ``iotfleet simulate`` / ``iotfleet demo``; returns the exit code."""
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # The running stack's ports and addresses unless a flag or env var says otherwise.
        settings = build_settings(args, running_stack=True)
        scenario = build_scenario(args)
        counts = scenario.counts()
        devices, credentials_note, credentials_path = resolve_devices(args, settings, counts, console)
        observer, observer_note = resolve_observer(args, settings)
        if observer is None and (scenario.commands.rate_per_s > 0):
            console.print(f"[yellow]note[/]: no commands will be sent: {escape(observer_note)}")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        report_path = (
            getattr(args, "report", None) or settings.state_dir / "simulator" / f"report-{stamp}.json"
        )
        total = len(devices)
        tls = resolve_tls(args, settings)
        broker_host, broker_port = (tls[0], tls[1]) if tls else (settings.mqtt.host, settings.mqtt.port)
        explicit = getattr(args, "source_addresses", None)
        per_source = getattr(args, "devices_per_source", addresses.PER_SOURCE)
        sources = addresses.parse(explicit) if explicit else addresses.choose(broker_host, total, per_source)
        if explicit and len(sources) * per_source < total:
            raise ConfigError(
                f"{total:,} devices need {-(-total // per_source)} source addresses at"
                f" --devices-per-source {per_source:,}; {len(sources)} given"
            )
        plan = RunPlan(
            scenario=scenario,
            devices=devices,
            mqtt_host=broker_host,
            mqtt_port=broker_port,
            tls_cafile=tls[2] if tls else None,
            settings=settings,
            observer=observer,
            observer_note=observer_note,
            api_url=_api_url(args, settings),
            api_key=getattr(args, "api_key", None) or provisioning.read_api_key(settings.state_dir),
            verify_source=getattr(args, "verify_source", "auto"),
            verify_timeout_s=getattr(args, "verify_timeout", 60.0),
            report_path=report_path,
            live=not getattr(args, "quiet", False),
            credentials_note=credentials_note,
            credentials_path=credentials_path,
            source_addresses=sources,
            per_source=per_source,
            stats_path=getattr(args, "stats_file", None),
        )
        console.print(
            escape(
                f"simulating {len(devices):,} devices ({', '.join(f'{t}={n}' for t, n in counts.items())})"
                f" for {scenario.duration:,.0f} s against {broker_host}:{broker_port}"
                + (f" over TLS (CA {tls[2]}, auth {getattr(args, 'auth', 'password')})" if tls else "")
                + f" in {scenario.process_count()} process(es)"
                + (f" from {len(sources)} source addresses ({sources[0]}…)" if sources else "")
                + f" — {credentials_note}"
            )
        )
        report = asyncio.run(run_plan(plan, console))
    except (ConfigError, IotfleetError) as exc:
        console.print(f"[bold red]error[/]: {escape(str(exc))}")
        return 2
    render_report(report, Console())
    console.print(escape(f"report written to {report_path}"))
    verify = report.get("verify")
    if verify is not None and not verify.get("ok", False):
        return 1
    if report["connections"]["connects"] == 0 and report["devices"]:
        console.print("[bold red]error[/]: no device could connect (see connect_errors in the report)")
        return 1
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators",
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--state-dir", type=Path, help="state dir (IOTFLEET_STATE_DIR, default ./.iotfleet)")
    parser.add_argument("--mqtt-port", type=int, help="MQTT port (IOTFLEET_MQTT__PORT, default 1883)")
    parser.add_argument("--influx-port", type=int, help="InfluxDB HTTP port (default 8086)")
    parser.add_argument("--api-port", type=int, help="registry API port (default 8000)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    try:
        code = run(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
