"""The ``iotfleet`` command: run the local stack, inspect it, stop it, simulate devices.

iotfleet up [--detach]     start broker, InfluxDB, registry, ingest services, rules engine
           [--roles R,…]   … or only some of them on this host (docs/deployment.md)
iotfleet status [--json]   each part with its pid, port and health
iotfleet down              stop every process the stack started (and nothing else)
iotfleet secrets export|import   the accounts, tokens and CA every host of a deployment shares
iotfleet systemd --out DIR systemd units for this host's roles (instead of `up`)
iotfleet simulate …        run a simulated device fleet against the stack
iotfleet demo              up + a simulated fleet, in the foreground; Ctrl-C stops both
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from iotfleet.errors import ConfigError, StackError
from iotfleet.settings import Settings, load_settings
from iotfleet.stack import demo, shared_secrets, systemd_units
from iotfleet.stack.supervisor import PartStatus, Stack, status_as_json
from iotfleet.stack.systemd_units import TARGET

console = Console(stderr=True, soft_wrap=True)


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="state dir (IOTFLEET_STATE_DIR, default ./.iotfleet)")
    parser.add_argument("--mqtt-port", type=int, help="MQTT port (IOTFLEET_MQTT__PORT, default 1883)")
    parser.add_argument("--influx-port", type=int, help="InfluxDB HTTP port (default 8086)")
    parser.add_argument(
        "--api-port", type=int, help="registry API port (IOTFLEET_REGISTRY__PORT, default 8000)"
    )


def _add_roles_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--roles",
        metavar="ROLE,…",
        help="what this host runs: a comma-separated subset of broker (mosquitto + broker agent), influxdb,"
        " registry, ingest, rules; default all (IOTFLEET_STACK__ROLES). The others are reached through"
        " IOTFLEET_MQTT__HOST, IOTFLEET_INFLUX__URL, IOTFLEET_BROKER_AGENT__URL, … (docs/deployment.md)",
    )


def _add_listen_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="address of the broker's device-facing TLS listeners (IOTFLEET_STACK__LISTEN, default 127.0.0.1;"
        " the plain MQTT listener stays on loopback); given, the API and dashboard are served over HTTPS there"
        " too (IOTFLEET_REGISTRY__HTTPS_PORT, default 8443; plain HTTP stays on loopback); on a host running"
        " only some roles, the broker agent and InfluxDB listen there over HTTPS too",
    )


# The settings a running stack's file can provide, and the env vars that would set them instead.
_STACK_SETTINGS = {
    ("mqtt", "host"): "IOTFLEET_MQTT__HOST",
    ("mqtt", "port"): "IOTFLEET_MQTT__PORT",
    ("influx", "url"): "IOTFLEET_INFLUX__URL",
    ("registry", "host"): "IOTFLEET_REGISTRY__HOST",
    ("registry", "port"): "IOTFLEET_REGISTRY__PORT",
}


def build_settings(args: argparse.Namespace, *, running_stack: bool = False) -> Settings:
    """Settings from the environment, with the command-line flags on top.

    With ``running_stack`` (clients of a stack: ``simulate``), the broker, InfluxDB and API
    addresses of the stack running from the state dir fill what neither a flag nor an env
    var sets: flags > environment > the running stack > defaults.
    """
    overrides = _flag_overrides(args)
    settings = load_settings(**overrides)
    if not running_stack:
        return settings
    found = Stack(settings).running_endpoints()
    environ = {name.upper() for name in os.environ}
    merged = {section: dict(values) for section, values in overrides.items() if isinstance(values, dict)}
    changed = False
    for (section, key), env_var in _STACK_SETTINGS.items():
        if key in merged.get(section, {}) or env_var in environ or key not in found.get(section, {}):
            continue
        merged.setdefault(section, {})[key] = found[section][key]
        changed = True
    if not changed:
        return settings
    return load_settings(**{**overrides, **merged})


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        overrides["state_dir"] = args.state_dir
    if getattr(args, "mqtt_port", None):
        overrides["mqtt"] = {"port": args.mqtt_port}
    if getattr(args, "influx_port", None):
        overrides["influx"] = {"url": f"http://127.0.0.1:{args.influx_port}"}
    if getattr(args, "api_port", None):
        overrides["registry"] = {"port": args.api_port}
    stack: dict[str, Any] = {}
    if getattr(args, "listen", None):
        stack["listen"] = args.listen
    if getattr(args, "roles", None):
        stack["roles"] = args.roles
    if stack:
        overrides["stack"] = stack
    return overrides


def _progress(message: str) -> None:
    # Messages carry paths, settings and error text: escaped, so rich cannot read
    # a bracketed part (a regex like [mhdw], a path) as markup and drop it.
    console.print(f"[bold cyan]iotfleet[/]: {escape(message)}")


def _status_table(stack: Stack, parts: list[PartStatus]) -> Table:
    table = Table(title=escape(f"iotfleet stack — {stack.layout.root}"))
    for column in ("part", "pid", "port", "state", "health"):
        table.add_column(column)
    for part in parts:
        health = "[green]healthy[/]" if part.healthy else f"[red]unhealthy[/] ({escape(part.detail)})"
        table.add_row(escape(part.name), str(part.pid or "-"), str(part.port), escape(part.state), health)
    return table


def _print_status(stack: Stack, parts: list[PartStatus]) -> None:
    out = Console()
    out.print(_status_table(stack, parts))
    info = status_as_json(stack, parts)
    if info["roles"] != "all":
        out.print(escape(f"Roles on this host: {info['roles']} (docs/deployment.md)"), soft_wrap=True)
    kinds = {p.kind for p in parts} or {"registry", "broker"}
    if "registry" in kinds:
        out.print(escape(f"Dashboard: {info['dashboard']}"), soft_wrap=True)
        out.print(escape(f"API: {info['api']}   OpenAPI docs: {info['docs']}"), soft_wrap=True)
        out.print(escape(f"Admin API key: {info['admin_api_key_file']} (mode 0600)"), soft_wrap=True)
    if info.get("https_dashboard") and "registry" in kinds:
        out.print(
            escape(f"HTTPS: dashboard {info['https_dashboard']}   API {info['https_api']}"), soft_wrap=True
        )
    if "broker" not in kinds:
        return
    tls = info["tls"]
    out.print(
        escape(
            f"Devices over TLS: {tls['mqtts_password']} (password), {tls['mqtts_certificate']} (certificate);"
            f" CA certificate: {info['ca_cert']}"
        ),
        soft_wrap=True,
    )


def cmd_up(args: argparse.Namespace) -> int:
    stack = Stack(build_settings(args))
    if args.detach:
        stack.up(foreground=False, on_progress=_progress)
        _print_status(stack, stack.status())
        _progress("stack is up; `iotfleet down` stops it")
        return 0
    code = stack.up(foreground=True, on_progress=lambda m: _on_foreground_progress(stack, m))
    _progress("stopped")
    return code or 0


def _on_foreground_progress(stack: Stack, message: str) -> None:
    _progress(message)
    if message.startswith("running in the foreground"):
        _print_status(stack, stack.status())


def cmd_status(args: argparse.Namespace) -> int:
    stack = Stack(build_settings(args))
    parts = stack.status()
    if args.json:
        print(json.dumps(status_as_json(stack, parts), indent=2))
    elif not parts:
        Console(soft_wrap=True).print(escape(f"iotfleet is not running from {stack.layout.root}"))
    else:
        _print_status(stack, parts)
    if not parts:
        return 3
    return 0 if all(p.healthy for p in parts) else 1


def cmd_down(args: argparse.Namespace) -> int:
    Stack(build_settings(args)).down(on_progress=_progress)
    return 0


def cmd_secrets_export(args: argparse.Namespace) -> int:
    stack = Stack(build_settings(args))
    if args.stdout:
        print(json.dumps(shared_secrets.export_secrets(stack), indent=2))
        return 0
    shared_secrets.write_export(stack, args.out)
    _progress(
        f"shared secrets written to {args.out} (mode 0600); copy it to the other hosts over a safe channel"
    )
    return 0


def cmd_secrets_import(args: argparse.Namespace) -> int:
    stack = Stack(build_settings(args))
    result = shared_secrets.import_secrets(stack, args.file, force=args.force)
    _progress(
        f"imported into {stack.layout.root}: {len(result.written)} file(s) written,"
        f" {len(result.unchanged)} already the same"
    )
    lines = shared_secrets.settings_for(result.endpoints)
    if lines:
        _progress("to reach the exporting host, set (e.g. in the environment or a systemd EnvironmentFile):")
        for line in lines:
            console.print(f"  {escape(line)}")
    return 0


def cmd_systemd(args: argparse.Namespace) -> int:
    stack = Stack(build_settings(args))
    written = systemd_units.write_units(stack, args.out)
    _progress(
        f"{len(written.units)} unit(s) and {TARGET} in {args.out} (secrets in {len(written.env_files)} 0600"
        " EnvironmentFile(s)); install: cp them to /etc/systemd/system && systemctl daemon-reload &&"
        f" systemctl enable --now {TARGET}"
    )
    return 0


def _simulator_cli() -> ModuleType | None:
    """The simulator's CLI module, if installed (the stack commands work without it)."""
    try:
        return importlib.import_module("simulators.cli")
    except ImportError:
        return None


def cmd_simulate(args: argparse.Namespace) -> int:
    simulator_cli = _simulator_cli()
    assert simulator_cli is not None
    return int(simulator_cli.run(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """The stack plus a simulated fleet in the foreground; Ctrl-C stops both."""
    simulator_cli = _simulator_cli()
    assert simulator_cli is not None
    stack = Stack(build_settings(args))
    started_here = stack.supervisord_pid() is None
    if started_here:
        stack.up(foreground=False, on_progress=_progress)
    else:
        _progress("using the stack already running from this state dir")
    _print_status(stack, stack.status())
    operator: demo.OperatorCommands | None = None
    try:
        operator = _demo_operator(stack, args, simulator_cli)
        return int(simulator_cli.run(args))
    except KeyboardInterrupt:
        return 0
    finally:
        if operator is not None:
            operator.stop()
            _progress(
                f"{operator.sent} operator command(s) sent through the API as {demo.OPERATOR_KEY_NAME!r}"
            )
        if started_here:
            stack.down(on_progress=_progress)


def _demo_operator(
    stack: Stack, args: argparse.Namespace, simulator_cli: ModuleType
) -> demo.OperatorCommands:
    """Example rules, and the scenario's commands sent by an operator through the API (not over MQTT)."""
    api_url = str(status_as_json(stack, [])["api"]).removesuffix("/api/v1")
    admin_key = stack.admin_api_key()
    created = demo.ensure_rules(api_url, admin_key)
    if created:
        _progress(f"example rules created: {', '.join(created)}")
    rate = float(simulator_cli.build_scenario(args).commands.rate_per_s)
    args.commands_rate = 0.0  # the simulator publishes none itself: each command is an operator's
    key = demo.operator_key(api_url, admin_key, stack.layout.root)
    _progress(f"an operator ({demo.OPERATOR_KEY_NAME!r}) sends ~{rate:g} command(s)/s through the API")
    return demo.OperatorCommands(api_url, key, rate, seed=getattr(args, "seed", None)).start()


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite from the source tree (bench/ is not installed with the package)."""
    from iotfleet.stack.configs import REPO_ROOT

    if not (REPO_ROOT / "bench" / "suite.py").exists():
        raise StackError(
            f"no bench/ folder next to this installation ({REPO_ROOT}); run from a source checkout"
        )
    return subprocess.call([sys.executable, "-m", "bench.suite", *args.bench_args], cwd=REPO_ROOT)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotfleet", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack (or this host's roles of it)")
    _add_stack_options(up)
    _add_roles_option(up)
    up.add_argument("--detach", action="store_true", help="return once every part is healthy")
    _add_listen_option(up)
    up.set_defaults(handler=cmd_up)

    status = sub.add_parser("status", help="each part, its pid, port and health")
    _add_stack_options(status)
    _add_roles_option(status)
    _add_listen_option(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    down = sub.add_parser("down", help="stop every process of the stack")
    _add_stack_options(down)
    down.set_defaults(handler=cmd_down)

    secrets = sub.add_parser(
        "secrets", help="export/import the accounts, tokens and CA every host of one deployment shares"
    )
    secrets_sub = secrets.add_subparsers(dest="secrets_command", required=True)
    export = secrets_sub.add_parser(
        "export", help="on the broker host: write the shared secrets to a file (mode 0600)"
    )
    _add_stack_options(export)
    _add_roles_option(export)
    _add_listen_option(export)
    export.add_argument(
        "--out", type=Path, default=Path("iotfleet-secrets.json"), help="file to write (default %(default)s)"
    )
    export.add_argument(
        "--stdout", action="store_true", help="print the secrets to standard output instead (careful)"
    )
    export.set_defaults(handler=cmd_secrets_export)
    imp = secrets_sub.add_parser(
        "import", help="on the other hosts: take the shared secrets into the state dir"
    )
    _add_stack_options(imp)
    imp.add_argument("file", type=Path, help="a file made by `iotfleet secrets export`")
    imp.add_argument(
        "--force", action="store_true", help="replace different secrets already in the state dir"
    )
    imp.set_defaults(handler=cmd_secrets_import)

    systemd = sub.add_parser("systemd", help="write systemd unit files for this host's roles")
    _add_stack_options(systemd)
    _add_roles_option(systemd)
    _add_listen_option(systemd)
    systemd.add_argument("--out", type=Path, required=True, help="folder for the unit files")
    systemd.set_defaults(handler=cmd_systemd)

    bench = sub.add_parser("bench", help="run every benchmark on a fresh stack; writes docs/benchmarks.md")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of bench/suite.py (see --help)")
    bench.set_defaults(handler=cmd_bench)

    simulator_cli = _simulator_cli()
    if simulator_cli is not None and hasattr(simulator_cli, "add_arguments"):
        simulate = sub.add_parser("simulate", help="run a simulated device fleet against the stack")
        _add_stack_options(simulate)
        simulator_cli.add_arguments(simulate)
        simulate.set_defaults(handler=cmd_simulate)

        demo = sub.add_parser("demo", help="the stack and a simulated fleet, in the foreground")
        _add_stack_options(demo)
        simulator_cli.add_arguments(demo)
        demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except (ConfigError, StackError) as error:
        console.print(f"[bold red]error[/]: {escape(str(error))}")
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
