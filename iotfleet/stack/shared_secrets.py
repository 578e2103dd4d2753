"""`iotfleet secrets export|import`: the secrets every host of one deployment must share.

The broker host makes them on its first ``up`` (or on export): the service accounts' MQTT
passwords (the broker's dynamic-security file holds their hashes), the broker agent's token,
the admin API key and the platform CA (its key too: the registry issues device certificates the
broker must trust, and each host's HTTPS certificate is signed by it). The other hosts import
the file into their state dir before their first ``up``, so every host uses the same accounts
and trusts the same CA. The file is written 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotfleet import pki
from iotfleet.errors import StackError
from iotfleet.stack.supervisor import Stack, tls_endpoints, write_private

FORMAT = "iotfleet-secrets/1"


@dataclass(frozen=True)
class ImportResult:
    written: list[Path]
    unchanged: list[Path]
    endpoints: dict[str, Any]


def export_secrets(stack: Stack) -> dict[str, Any]:
    """The shared secrets of this state dir (made now if this is the broker host's first use)."""
    s = stack.settings
    paths = pki.platform_pki_paths(s.tls, stack.layout.root)
    if paths.ca_cert_path.exists():
        # The CA of a stack that ran (or runs): read, never re-issued under a running broker.
        platform_pki = paths
    else:
        platform_pki = pki.ensure_platform_pki(s.tls, stack.layout.root, [s.stack.listen])
    # A bring-your-own CA without its key: None (the other hosts bring their certificates too).
    key_path = platform_pki.ca_key_path
    ca_key = key_path.read_text() if key_path is not None else None
    return {
        "format": FORMAT,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exported_from": socket.gethostname(),
        "service_passwords": stack.service_passwords(),
        "broker_agent_token": stack.agent_token(),
        "admin_api_key": stack.admin_api_key(),
        "ca_cert": platform_pki.ca_cert_path.read_text(),
        "ca_key": ca_key,
        # Not secret: where this host's endpoints are, printed by `secrets import` as settings to set.
        "endpoints": _endpoints(stack, platform_pki),
    }


def _endpoints(stack: Stack, platform_pki: pki.PlatformPki) -> dict[str, Any]:
    """Where this host's broker, agent and InfluxDB listen: from the stack file of the last `up`
    (so `export` needs no flags after it), else from the settings and flags given now."""
    s = stack.settings
    try:
        stored = json.loads(stack.layout.stack_file.read_text())
        kinds = {part["kind"] for part in stored["parts"]}
        urls = {part["kind"]: part.get("url") for part in stored["parts"]}
        listen, tls_port = stored["tls"]["listen"], int(stored["tls"]["mqtts_password"].rsplit(":", 1)[1])
    except (FileNotFoundError, KeyError, ValueError, IndexError):
        local = stack.roles()
        kinds = ({"broker", "agent"} if "broker" in local else set()) | ({"influxdb"} & local)
        urls = {"agent": stack.agent_url(), "influxdb": stack.influx_url()}
        listen, tls_port = tls_endpoints(s, platform_pki)["listen"], s.tls.port
    endpoints: dict[str, Any] = {}
    if "broker" in kinds:
        endpoints["mqtt_host"] = listen
        endpoints["mqtt_tls_port"] = tls_port
    if "agent" in kinds and urls.get("agent"):
        endpoints["broker_agent_url"] = urls["agent"]
    if "influxdb" in kinds and urls.get("influxdb"):
        endpoints["influx_url"] = urls["influxdb"]
    return endpoints


def write_export(stack: Stack, out: Path) -> None:
    write_private(out, json.dumps(export_secrets(stack), indent=2) + "\n")


def import_secrets(stack: Stack, source: Path, *, force: bool = False) -> ImportResult:
    """Write the shared secrets into this state dir; refuse to replace different ones unless ``force``."""
    try:
        data = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read secrets file {source}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StackError(f"{source} is not an `iotfleet secrets export` file (format {FORMAT})")
    if stack.supervisord_pid() is not None:
        raise StackError(f"iotfleet is running from {stack.layout.root}: `iotfleet down` before importing")
    layout = stack.layout
    tls_dir = layout.root / pki.TLS_DIR
    files: list[tuple[Path, str, bool]] = [
        (layout.secrets, json.dumps(data["service_passwords"], indent=2), True),
        (layout.agent_token, str(data["broker_agent_token"]) + "\n", True),
        (layout.admin_key, str(data["admin_api_key"]) + "\n", True),
        (tls_dir / pki.CA_CERT, str(data["ca_cert"]), False),
    ]
    if data.get("ca_key"):
        files.append((tls_dir / pki.CA_KEY, str(data["ca_key"]), True))
    conflicts = [path for path, text, _ in files if path.exists() and not _same(path, text)]
    if conflicts and not force:
        raise StackError(
            "this state dir already has different secrets ("
            + ", ".join(str(p) for p in conflicts)
            + "): importing would change accounts or the CA under a running deployment; use --force to replace"
        )
    written, unchanged = [], []
    for path, text, private in files:
        if path.exists() and _same(path, text):
            unchanged.append(path)
            continue
        if private:
            write_private(path, text)
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(text)
            os.chmod(path, 0o644)
        written.append(path)
    return ImportResult(written, unchanged, dict(data.get("endpoints") or {}))


def _same(path: Path, text: str) -> bool:
    if path.suffix == ".json" or path.name.endswith(".json"):
        try:
            return bool(json.loads(path.read_text()) == json.loads(text))
        except ValueError:
            return False
    return path.read_text().strip() == text.strip()


def settings_for(endpoints: dict[str, Any]) -> list[str]:
    """The settings (env lines) a host importing these secrets sets to reach the exporting host."""
    lines = []
    if "mqtt_host" in endpoints:
        lines += [
            f"IOTFLEET_MQTT__HOST={endpoints['mqtt_host']}",
            f"IOTFLEET_MQTT__PORT={endpoints['mqtt_tls_port']}",
            "IOTFLEET_MQTT__TLS=true",
        ]
    if "broker_agent_url" in endpoints:
        lines.append(f"IOTFLEET_BROKER_AGENT__URL={endpoints['broker_agent_url']}")
    if "influx_url" in endpoints:
        lines.append(f"IOTFLEET_INFLUX__URL={endpoints['influx_url']}")
    return lines
