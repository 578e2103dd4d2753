"""Which parts of the stack one host runs (``iotfleet up --roles``) and what it then needs from the others.

Roles (IOTFLEET_STACK__ROLES, default all = the single-host stack):

- ``broker``: mosquitto and the broker agent (which owns the broker's device file);
- ``influxdb``: influxd;
- ``registry``: the API (system of record);
- ``ingest``: one ingest service per device type;
- ``rules``: the rules engine.

A host without the broker (or InfluxDB, …) reaches the remote one through the usual settings;
``check_remote_endpoints`` refuses to start when one of them is missing, naming it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from iotfleet.errors import StackError
from iotfleet.settings import ROLES, Settings

ROLE_OF_KIND = {
    "broker": "broker",
    "agent": "broker",
    "influxdb": "influxdb",
    "registry": "registry",
    "ingest": "ingest",
    "rules": "rules",
}
"""A part's kind (supervisor.Part.kind) → the role that runs it."""

MQTT_CLIENT_ROLES = frozenset({"registry", "ingest", "rules"})
INFLUX_CLIENT_ROLES = frozenset({"registry", "ingest"})


def is_split(settings: Settings) -> bool:
    """True when this host runs only some of the roles (a multi-host deployment)."""
    return settings.stack.role_set() != frozenset(ROLES)


def check_remote_endpoints(
    settings: Settings, *, passwords_file: Path, agent_token_file: Path, admin_key_file: Path
) -> None:
    """Fail before anything starts when a role needs a remote endpoint or a shared secret that is not set."""
    roles = settings.stack.role_set()
    problems: list[str] = []
    import_hint = "run `iotfleet secrets import FILE` (made on the broker host by `iotfleet secrets export`)"
    if roles & MQTT_CLIENT_ROLES and "broker" not in roles:
        needing = _names(roles & MQTT_CLIENT_ROLES)
        if "host" not in settings.mqtt.model_fields_set:
            problems.append(
                f"{needing} without the broker role needs the broker's address: set IOTFLEET_MQTT__HOST"
                " (and IOTFLEET_MQTT__PORT=8883, IOTFLEET_MQTT__TLS=true for its TLS listener)"
            )
        if not passwords_file.exists():
            problems.append(f"{needing} needs the broker's service account passwords: {import_hint}")
    if (
        roles & INFLUX_CLIENT_ROLES
        and "influxdb" not in roles
        and "url" not in settings.influx.model_fields_set
    ):
        problems.append(
            f"{_names(roles & INFLUX_CLIENT_ROLES)} without the influxdb role needs InfluxDB's address:"
            " set IOTFLEET_INFLUX__URL (e.g. https://influx-host:8086)"
        )
    if "registry" in roles and "broker" not in roles:
        agent = settings.broker_agent
        if agent.url is None:
            problems.append(
                "registry without the broker role needs the broker agent's address: set IOTFLEET_BROKER_AGENT__URL"
                " (e.g. https://broker-host:9105)"
            )
        if agent.token is None and not agent_token_file.exists():
            problems.append(f"registry without the broker role needs the broker agent's token: {import_hint}")
    if "rules" in roles and "registry" not in roles:
        if "host" not in settings.registry.model_fields_set:
            problems.append(
                "rules without the registry role reads its rules from a registry: set IOTFLEET_REGISTRY__HOST"
                " (and IOTFLEET_REGISTRY__PORT)"
            )
        if settings.rules.api_key is None and not admin_key_file.exists():
            problems.append(f"rules without the registry role needs the admin API key: {import_hint}")
    if problems:
        raise StackError(f"cannot start roles {settings.stack.roles}: " + "; ".join(problems))


def cleartext_warnings(settings: Settings, influx_url: str, agent_url: str) -> list[str]:
    """One line per connection of this host's services that leaves the host without TLS."""
    roles = settings.stack.role_set()
    warnings = []
    mqtt_remote = roles & MQTT_CLIENT_ROLES and "broker" not in roles
    if mqtt_remote and not settings.mqtt.tls and not _loopback(settings.mqtt.host):
        warnings.append(
            f"warning: MQTT to {settings.mqtt.host} without TLS (set IOTFLEET_MQTT__TLS=true and the broker's"
            " TLS port)"
        )
    influx_remote = roles & INFLUX_CLIENT_ROLES and "influxdb" not in roles
    if influx_remote and influx_url.startswith("http://") and not _loopback(_host_of(influx_url)):
        warnings.append(f"warning: InfluxDB at {influx_url} without TLS (an https:// IOTFLEET_INFLUX__URL)")
    agent_remote = "registry" in roles and "broker" not in roles
    if agent_remote and agent_url.startswith("http://") and not _loopback(_host_of(agent_url)):
        warnings.append(f"warning: the broker agent at {agent_url} without TLS (its token crosses in clear)")
    return warnings


def _host_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _names(roles: frozenset[str]) -> str:
    return "+".join(role for role in ROLES if role in roles)
