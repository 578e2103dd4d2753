"""`iotfleet up|status|down`: the whole stack under supervisord, from generated configs.

supervisord (a mature process supervisor) runs every part and restarts a
crashed one; this module only writes its configuration, starts it, brings the
parts up in order (broker and InfluxDB first, then the database is created,
then the services) and asks it, over its XML-RPC socket, what runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from iotfleet import dynsec, pki, tls_clients
from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import StackError
from iotfleet.influx import InfluxClient
from iotfleet.lifecycle import process_alive
from iotfleet.settings import InfluxSettings, Settings
from iotfleet.stack import configs, probes, roles

INFRA = ("mosquitto", "influxd", "broker-agent")
ADMIN_KEY_FILE = "admin-api-key"
AGENT_TOKEN_FILE = "broker-agent-token"
SECRETS_FILE = "secrets.json"


@dataclass(frozen=True)
class Part:
    """One supervised process of the stack and how to tell it is healthy."""

    name: str
    kind: str  # broker | influxdb | registry | ingest | rules
    port: int
    setting: str  # the env var that moves its port
    command: list[str]
    env: dict[str, str]
    host: str = "127.0.0.1"  # where it listens (probes, port checks)


@dataclass
class PartStatus:
    name: str
    kind: str
    pid: int | None
    port: int
    state: str
    healthy: bool
    detail: str = ""


class StackLayout:
    """Paths inside a state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir.resolve()
        self.mosquitto = self.root / "mosquitto"
        self.influxdb = self.root / "influxdb"
        self.logs = self.root / "logs"
        self.supervisord_conf = self.root / "supervisord.conf"
        self.supervisord_pid = self.root / "supervisord.pid"
        self.socket = self.root / "supervisor.sock"
        self.secrets = self.root / SECRETS_FILE
        self.admin_key = self.root / ADMIN_KEY_FILE
        self.agent_token = self.root / AGENT_TOKEN_FILE
        self.stack_file = self.root / "stack.json"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (secrets, keys)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin"):
        candidate = Path(folder) / Path(name).name
        if candidate.exists():
            return str(candidate)
    raise StackError(f"{name} is not installed; `make demo` installs it (apt-get install mosquitto influxdb)")


def _script(name: str) -> str:
    """A console script of this installation (next to the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"console script {name} not found; reinstall iotfleet (pip install -e .)")
    return found


class Stack:
    """The local stack of one state dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = StackLayout(settings.state_dir)

    # --- configuration ----------------------------------------------------

    def _passwords(self) -> dict[str, str]:
        if self.layout.secrets.exists():
            stored: dict[str, str] = json.loads(self.layout.secrets.read_text())
            return stored
        if "broker" not in self.roles():
            # The accounts are the broker's: made where it runs, imported everywhere else.
            raise StackError(
                f"no service account passwords in {self.layout.secrets}: run `iotfleet secrets import FILE`"
                " (made on the broker host by `iotfleet secrets export`)"
            )
        passwords = dynsec.new_passwords()
        write_private(self.layout.secrets, json.dumps(passwords, indent=2))
        return passwords

    def service_passwords(self) -> dict[str, str]:
        """The platform's MQTT accounts (made 0600 on the broker host's first use; imported elsewhere)."""
        return self._passwords()

    def admin_api_key(self) -> str:
        """The admin API key, created 0600 on the first `up`."""
        if not self.layout.admin_key.exists():
            write_private(self.layout.admin_key, f"ifk_{secrets.token_urlsafe(32)}\n")
        return self.layout.admin_key.read_text().strip()

    def agent_token(self) -> str:
        """The token the registry presents to the broker agent, created 0600 on the first `up`."""
        if not self.layout.agent_token.exists():
            write_private(self.layout.agent_token, secrets.token_urlsafe(32) + "\n")
        return self.layout.agent_token.read_text().strip()

    def agent_port(self) -> int:
        """IOTFLEET_BROKER_AGENT__PORT if set, else the first port after the services' health ports."""
        agent = self.settings.broker_agent
        if "port" in agent.model_fields_set:
            return agent.port
        return self.settings.stack.service_port_base + len(DEVICE_TYPES) + 1

    def replica_name(self) -> str:
        """This host's replica name (IOTFLEET_INGEST__REPLICA, else the host name and a hash of the
        state dir): stable across restarts, distinct between hosts and between state dirs."""
        if "replica" in self.settings.ingest.model_fields_set:
            return self.settings.ingest.replica
        host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:24]
        digest = hashlib.sha256(str(self.layout.root).encode()).hexdigest()[:7]
        return f"{host or 'host'}-{digest}"

    def roles(self) -> frozenset[str]:
        """The roles this host runs (IOTFLEET_STACK__ROLES / --roles; all by default)."""
        return self.settings.stack.role_set()

    def opened(self) -> bool:
        """True when a split host (a subset of the roles) was opened to a network with --listen:
        its broker agent and InfluxDB then listen on that address over HTTPS, like the broker's TLS
        listeners. A single-host stack keeps them on loopback, as before."""
        return roles.is_split(self.settings) and "listen" in self.settings.stack.model_fields_set

    def influx_url(self) -> str:
        """Where InfluxDB is: IOTFLEET_INFLUX__URL, or on an opened influxdb host https://<listen>:<port>."""
        s = self.settings
        if "url" in s.influx.model_fields_set or not (self.opened() and "influxdb" in self.roles()):
            return s.influx.url
        return f"https://{_bracketed(s.stack.listen)}:{_url_port(s.influx.url)}"

    def agent_host(self) -> str:
        s = self.settings
        if self.opened() and "host" not in s.broker_agent.model_fields_set:
            return s.stack.listen
        return s.broker_agent.host

    def agent_tls(self) -> tuple[Path, Path] | None:
        """The broker agent's HTTPS certificate and key (None: plain HTTP on loopback)."""
        agent = self.settings.broker_agent
        if agent.tls_certfile is not None and agent.tls_keyfile is not None:
            return agent.tls_certfile, agent.tls_keyfile
        if not self.opened():
            return None
        paths = self._pki_paths()
        return paths.server_cert_path.resolve(), paths.server_key_path.resolve()

    def agent_url(self) -> str:
        """Where this host's services reach the broker agent."""
        agent = self.settings.broker_agent
        if agent.url is not None and "broker" not in self.roles():
            return agent.url
        scheme = "https" if self.agent_tls() is not None else "http"
        return f"{scheme}://{_bracketed(self.agent_host())}:{self.agent_port()}"

    def _pki_paths(self) -> pki.PlatformPki:
        return pki.platform_pki_paths(self.settings.tls, self.layout.root)

    def _platform_ca(self) -> str:
        return str(self._pki_paths().ca_cert_path.resolve())

    def remote_env(self) -> dict[str, str]:
        """The settings of the services that say where the other roles' endpoints are, and how to trust them."""
        s, local = self.settings, self.roles()
        env: dict[str, str] = {}
        if "broker" in local:
            # The broker of this host: its plain listener on loopback.
            env |= {
                "IOTFLEET_MQTT__HOST": s.mqtt.host,
                "IOTFLEET_MQTT__PORT": str(s.mqtt.port),
                "IOTFLEET_MQTT__TLS": "false",
            }
        else:
            env |= {
                "IOTFLEET_MQTT__HOST": s.mqtt.host,
                "IOTFLEET_MQTT__PORT": str(s.mqtt.port),
                "IOTFLEET_MQTT__TLS": "true" if s.mqtt.tls else "false",
            }
            if s.mqtt.tls:
                env["IOTFLEET_MQTT__CA_FILE"] = str(s.mqtt.ca_file or self._platform_ca())
            if s.mqtt.tls_server_name:
                env["IOTFLEET_MQTT__TLS_SERVER_NAME"] = s.mqtt.tls_server_name
        influx_url = self.influx_url()
        env["IOTFLEET_INFLUX__URL"] = influx_url
        if influx_url.startswith("https://"):
            env["IOTFLEET_INFLUX__CA_FILE"] = str(s.influx.ca_file or self._platform_ca())
        agent_url = self.agent_url()
        env["IOTFLEET_BROKER_AGENT__URL"] = agent_url
        if agent_url.startswith("https://"):
            env["IOTFLEET_BROKER_AGENT__CA_FILE"] = str(s.broker_agent.ca_file or self._platform_ca())
        return env

    def parts(self) -> list[Part]:
        """The processes this host runs: those of its roles (every one by default)."""
        local = self.roles()
        return [p for p in self._all_parts() if roles.ROLE_OF_KIND[p.kind] in local]

    def _all_parts(self) -> list[Part]:
        s = self.settings
        local = self.roles()
        passwords = self._passwords() if local - {"influxdb"} else {}
        agent_port = self.agent_port()
        base_env = {
            "IOTFLEET_STATE_DIR": str(self.layout.root),
            "IOTFLEET_LOG_LEVEL": s.log_level,
            "IOTFLEET_MQTT__HOST": s.mqtt.host,
            "IOTFLEET_MQTT__PORT": str(s.mqtt.port),
            "IOTFLEET_INFLUX__URL": s.influx.url,
            "IOTFLEET_INFLUX__DATABASE": s.influx.database,
            "IOTFLEET_INFLUX__RETENTION_POLICY": s.influx.retention_policy,
            "IOTFLEET_REGISTRY__HOST": s.registry.host,
            "IOTFLEET_REGISTRY__PORT": str(s.registry.port),
            "IOTFLEET_BROKER_AGENT__HOST": s.broker_agent.host,
            "IOTFLEET_BROKER_AGENT__PORT": str(agent_port),
            "PYTHONUNBUFFERED": "1",
        }
        if roles.is_split(s):
            base_env |= self.remote_env()
        if "broker" in local:
            agent_token = self.agent_token()
        else:
            agent_token = s.broker_agent.token.get_secret_value() if s.broker_agent.token else ""
            if not agent_token and self.layout.agent_token.exists():
                agent_token = self.layout.agent_token.read_text().strip()

        def service_env(account: str, **extra: str) -> dict[str, str]:
            return {
                **base_env,
                "IOTFLEET_MQTT__USERNAME": account,
                "IOTFLEET_MQTT__PASSWORD": passwords[account],
                **extra,
            }

        agent_tls = self.agent_tls()
        agent_env = {
            **base_env,
            # The agent probes its broker on this host: plain MQTT on loopback.
            "IOTFLEET_MQTT__HOST": s.mqtt.host,
            "IOTFLEET_MQTT__PORT": str(s.mqtt.port),
            "IOTFLEET_BROKER_AGENT__HOST": self.agent_host(),
            # The agent's files are the broker's: in the broker's folder of the state dir.
            "IOTFLEET_BROKER_AGENT__DEVICES_FILE": str(self.layout.mosquitto / "devices"),
            "IOTFLEET_BROKER_AGENT__BROKER_PID_FILE": str(self.layout.mosquitto / "mosquitto.pid"),
            "IOTFLEET_BROKER_AGENT__TOKEN": agent_token,
        }
        agent_env.pop("IOTFLEET_MQTT__TLS", None)
        agent_env.pop("IOTFLEET_MQTT__CA_FILE", None)
        if agent_tls is not None:
            agent_env["IOTFLEET_BROKER_AGENT__TLS_CERTFILE"] = str(agent_tls[0])
            agent_env["IOTFLEET_BROKER_AGENT__TLS_KEYFILE"] = str(agent_tls[1])

        parts: list[Part] = []
        if "broker" in local:
            parts += [
                Part(
                    "mosquitto",
                    "broker",
                    s.mqtt.port,
                    "IOTFLEET_MQTT__PORT (or --mqtt-port)",
                    [
                        _find_binary(s.stack.mosquitto_bin),
                        "-c",
                        str(self.layout.mosquitto / "mosquitto.conf"),
                    ],
                    {},
                    s.mqtt.host,
                ),
                Part(
                    "broker-agent",
                    "agent",
                    agent_port,
                    "IOTFLEET_BROKER_AGENT__PORT (default IOTFLEET_STACK__SERVICE_PORT_BASE + 5)",
                    [_script("iotfleet-broker-agent")],
                    agent_env,
                    self.agent_host(),
                ),
            ]
        if "influxdb" in local:
            parts.append(
                Part(
                    "influxd",
                    "influxdb",
                    _url_port(self.influx_url()),
                    "IOTFLEET_INFLUX__URL (or --influx-port)",
                    [
                        _find_binary(s.stack.influxd_bin),
                        "-config",
                        str(self.layout.influxdb / "influxdb.conf"),
                    ],
                    {},
                    _url_host(self.influx_url()),
                )
            )
        if "registry" in local:
            parts.append(
                Part(
                    "registry",
                    "registry",
                    s.registry.port,
                    "IOTFLEET_REGISTRY__PORT (or --api-port)",
                    [_script("iotfleet-registry")],
                    service_env(
                        "iotfleet-registry",
                        **self._registry_https_env(),
                        IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY=self.admin_api_key(),
                        IOTFLEET_BROKER_AGENT__TOKEN=agent_token,
                    ),
                )
            )
        port = s.stack.service_port_base
        if "rules" in local:
            parts.append(
                Part(
                    "rules-engine",
                    "rules",
                    port,
                    "IOTFLEET_STACK__SERVICE_PORT_BASE",
                    [_script("iotfleet-rules")],
                    service_env("iotfleet-rules", IOTFLEET_HEALTH__PORT=str(port)),
                )
            )
        if "ingest" not in local:
            return parts
        split = roles.is_split(s)
        for offset, type_name in enumerate(DEVICE_TYPES, start=1):
            parts.append(
                Part(
                    f"ingest-{type_name.replace('_', '-')}",
                    "ingest",
                    port + offset,
                    "IOTFLEET_STACK__SERVICE_PORT_BASE",
                    [_script("iotfleet-ingest"), "--type", type_name],
                    service_env(
                        "iotfleet-ingest",
                        IOTFLEET_INGEST__DEVICE_TYPE=type_name,
                        IOTFLEET_HEALTH__PORT=str(port + offset),
                        # One replica per type on a single host: a plain subscription, which
                        # Mosquitto 2.0 restores after a broker restart (shared ones it does
                        # not, and readings published before the ingest re-subscribes would
                        # find no subscriber). Split hosts run replicas side by side: shared,
                        # each under a replica name of its own (the MQTT client id).
                        IOTFLEET_INGEST__SHARED_SUBSCRIPTION=os.environ.get(
                            "IOTFLEET_INGEST__SHARED_SUBSCRIPTION", "true" if split else "false"
                        ),
                        **({"IOTFLEET_INGEST__REPLICA": self.replica_name()} if split else {}),
                    ),
                )
            )
        return parts

    def https_host(self) -> str | None:
        """Where the registry serves HTTPS (API + dashboard), or None: plain HTTP on loopback only.

        On when asked: IOTFLEET_REGISTRY__HTTPS_HOST, or the stack opened to a network with
        ``--listen`` / IOTFLEET_STACK__LISTEN (then on that address, like the devices' TLS
        listeners). A default stack keeps its loopback-only HTTP, unchanged for newcomers.
        """
        s = self.settings
        if s.registry.https_host is not None:
            return s.registry.https_host
        return s.stack.listen if "listen" in s.stack.model_fields_set else None

    def _registry_https_env(self) -> dict[str, str]:
        host = self.https_host()
        if host is None:
            return {}
        s = self.settings
        paths = pki.platform_pki_paths(s.tls, self.layout.root)
        return {
            "IOTFLEET_REGISTRY__HTTPS_HOST": host,
            "IOTFLEET_REGISTRY__HTTPS_PORT": str(s.registry.https_port),
            "IOTFLEET_REGISTRY__TLS_CERTFILE": str(
                s.registry.tls_certfile or paths.server_cert_path.resolve()
            ),
            "IOTFLEET_REGISTRY__TLS_KEYFILE": str(s.registry.tls_keyfile or paths.server_key_path.resolve()),
        }

    def https_base(self) -> str | None:
        """The HTTPS base URL of the API and dashboard (None: no HTTPS listener)."""
        host = self.https_host()
        if host is None:
            return None
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"https://{shown}:{self.settings.registry.https_port}"

    def _write_configs(self, parts: list[Part]) -> None:
        s = self.settings
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        platform_pki = self.write_part_configs()
        influx_url = self.influx_url()
        local = self.roles()
        write_private(self.layout.supervisord_conf, self._supervisord_conf(parts))
        self.layout.stack_file.write_text(
            json.dumps(
                {
                    "parts": [
                        {
                            "name": p.name,
                            "kind": p.kind,
                            "port": p.port,
                            "host": p.host,
                            "url": self._part_url(p),
                        }
                        for p in parts
                    ],
                    "roles": s.stack.roles,
                    "api": f"http://{s.registry.host}:{s.registry.port}",
                    "dashboard": f"http://{s.registry.host}:{s.registry.port}/",
                    "mqtt": f"{s.mqtt.host}:{s.mqtt.port}",
                    "influx": influx_url,
                    "broker_agent": self.agent_url() if "broker" in local or "registry" in local else None,
                    "tls": tls_endpoints(s, platform_pki),
                    "https_api": self.https_base(),
                },
                indent=2,
            )
        )

    def write_part_configs(self) -> pki.PlatformPki:
        """The PKI and the configs of this host's broker and InfluxDB (under supervisord or systemd)."""
        s = self.settings
        # The platform CA and server certificate (made once; the server certificate is re-issued
        # when the --listen address or IOTFLEET_TLS__HOSTS change): the broker's device listeners.
        https_host = self.https_host()
        hosts = [s.stack.listen] + ([https_host] if https_host and https_host != s.stack.listen else [])
        local = self.roles()
        influx_url = self.influx_url()
        influx_tls: tuple[Path, Path] | None = None
        if "influxdb" in local and influx_url.startswith("https://"):
            hosts.append(_url_host(influx_url))
        platform_pki = pki.ensure_platform_pki(s.tls, self.layout.root, list(dict.fromkeys(hosts)))
        if "influxdb" in local and influx_url.startswith("https://"):
            influx_tls = (platform_pki.server_cert_path.resolve(), platform_pki.server_key_path.resolve())
        if "broker" in local:
            self._write_broker_config(platform_pki)
        if "influxdb" in local:
            configs.write_influxdb_config(
                self.layout.influxdb,
                host=_url_host(influx_url),
                port=_url_port(influx_url),
                rpc_port=s.stack.influx_rpc_port,
                tls=influx_tls,
            )
        return platform_pki

    def _write_broker_config(self, platform_pki: pki.PlatformPki) -> None:
        s = self.settings
        configs.write_mosquitto_config(
            self.layout.mosquitto,
            host=s.mqtt.host,
            port=s.mqtt.port,
            passwords=self._passwords(),
            autosave_interval=s.stack.broker_autosave_changes,
            max_payload_bytes=s.ingest.max_payload_bytes,
            device_rate_bytes=s.stack.device_rate_bytes,
            device_burst_bytes=s.stack.device_burst_bytes,
            tls=configs.TlsListeners.from_settings(platform_pki, s.tls, s.stack.listen),
        )

    def _supervisord_conf(self, parts: list[Part]) -> str:
        lay = self.layout
        lines = [
            "; Generated by `iotfleet up`; regenerated on every up.",
            "[unix_http_server]",
            f"file={lay.socket}",
            "chmod=0700",
            "",
            "[supervisord]",
            f"logfile={lay.logs / 'supervisord.log'}",
            f"pidfile={lay.supervisord_pid}",
            f"directory={lay.root}",
            "logfile_maxbytes=10MB",
            "loglevel=info",
            f"minfds={_fd_target()}",  # see FLEET_FDS
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{lay.socket}",
            "",
        ]
        for part in parts:
            infra = part.name in INFRA
            env = ",".join(f'{k}="{_supervisor_quote(v)}"' for k, v in part.env.items())
            lines += [
                f"[program:{part.name}]",
                "command=" + " ".join(_supervisor_quote(arg) for arg in part.command),
                # Services start once the broker and the database are ready (see up()).
                f"autostart={'true' if infra else 'false'}",
                "autorestart=true",
                "startsecs=1",
                "startretries=10",
                f"priority={10 if infra else 50}",
                "stopsignal=TERM",
                "stopwaitsecs=20",
                "stopasgroup=true",
                "killasgroup=true",
                "redirect_stderr=true",
                f"stdout_logfile={lay.logs / (part.name + '.log')}",
                "stdout_logfile_maxbytes=20MB",
                "stdout_logfile_backups=2",
            ]
            if env:
                lines.append(f"environment={env}")
            lines.append("")
        return "\n".join(lines)

    # --- inspection ---------------------------------------------------------

    def supervisord_pid(self) -> int | None:
        """The pid of this state dir's supervisord if it is alive."""
        try:
            pid = int(self.layout.supervisord_pid.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def running_endpoints(self) -> dict[str, Any]:
        """Where the stack running from this state dir listens, as settings overrides ({} if none runs).

        Read from the stack file `up` wrote, so a client (`iotfleet simulate`) finds the broker,
        InfluxDB and the API of a stack started with other ports without being told again.
        """
        if self.supervisord_pid() is None:
            return {}
        try:
            stored = json.loads(self.layout.stack_file.read_text())
            mqtt_host, _, mqtt_port = str(stored["mqtt"]).rpartition(":")
            api = str(stored["api"])
            return {
                "mqtt": {"host": mqtt_host, "port": int(mqtt_port)},
                "influx": {"url": str(stored["influx"])},
                "registry": {"host": _url_host(api), "port": _url_port(api)},
            }
        except (FileNotFoundError, KeyError, ValueError):
            return {}

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.layout.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport, allow_none=True)

    def _stored_parts(self) -> list[dict[str, Any]]:
        try:
            parts: list[dict[str, Any]] = json.loads(self.layout.stack_file.read_text())["parts"]
        except FileNotFoundError:
            return []
        return parts

    def _part_url(self, part: Part) -> str | None:
        """Where a part's HTTP health is probed (InfluxDB, the broker agent: HTTPS on an opened host)."""
        if part.kind == "influxdb":
            return self.influx_url()
        if part.kind == "agent":
            return self.agent_url()
        return None

    def health(self, kind: str, port: int, url: str | None = None) -> tuple[bool, str]:
        """A live probe of one part; ``url`` (from the stack file) says where InfluxDB / the agent listen."""
        host = self.settings.mqtt.host
        if kind == "broker":
            passwords = self._passwords()
            ok = probes.mqtt_ok(host, port, dynsec.ADMIN_USER, passwords[dynsec.ADMIN_USER], timeout=1.0)
            return ok, "MQTT CONNECT accepted" if ok else "MQTT CONNECT failed"
        if kind == "influxdb":
            url = url or self.influx_url()
            base = f"{url.split('://', 1)[0]}://{_bracketed(_url_host(url))}:{port}"
            ok = probes.http_ok(f"{base}/ping", verify=self._verify(base))
            return ok, "/ping 204" if ok else "/ping failed"
        if kind == "agent":
            base = url or self.agent_url()
            ok = probes.http_ok(f"{base}/healthz", verify=self._verify(base))
            return ok, "/healthz ok" if ok else "/healthz not ok"
        health_host = {"registry": self.settings.registry.host}.get(kind, self.settings.health.host)
        ok = probes.http_ok(f"http://{health_host}:{port}/healthz")
        return ok, "/healthz ok" if ok else "/healthz not ok"

    def _verify(self, url: str) -> ssl.SSLContext | bool:
        if not url.startswith("https://"):
            return True
        return tls_clients.verifying_context(Path(self._platform_ca()), "the platform CA (tls/ca.crt)")

    def status(self) -> list[PartStatus]:
        """Each part: supervisor state, pid, port, and a live health probe."""
        if self.supervisord_pid() is None:
            return []
        infos = {info["name"]: info for info in self._rpc().supervisor.getAllProcessInfo()}
        result = []
        for part in self._stored_parts():
            info = infos.get(part["name"], {})
            state = info.get("statename", "UNKNOWN")
            pid = info.get("pid") or None
            healthy, detail = (
                self.health(part["kind"], part["port"], part.get("url"))
                if state == "RUNNING"
                else (False, state)
            )
            result.append(PartStatus(part["name"], part["kind"], pid, part["port"], state, healthy, detail))
        return result

    # --- lifecycle ------------------------------------------------------------

    def check_remote_endpoints(self) -> None:
        """Fail fast, naming the setting, when a role here needs another host's endpoint or secret."""
        roles.check_remote_endpoints(
            self.settings,
            passwords_file=self.layout.secrets,
            agent_token_file=self.layout.agent_token,
            admin_key_file=self.layout.admin_key,
        )

    def check_can_start(self, parts: list[Part]) -> None:
        """Fail before starting anything: already running, or a port taken."""
        pid = self.supervisord_pid()
        if pid is not None:
            raise StackError(
                f"iotfleet is already running from {self.layout.root} (supervisord pid {pid}); "
                "run `iotfleet down` first"
            )
        wanted: dict[int, tuple[str, str]] = {}
        self.check_remote_endpoints()
        local = self.roles()
        claims = [(p.port, p.name, p.setting) for p in parts]
        hosts = {p.name: p.host for p in parts}
        if "influxdb" in local:
            claims.append(
                (self.settings.stack.influx_rpc_port, "influxd RPC", "IOTFLEET_STACK__INFLUX_RPC_PORT")
            )
        for port, name, setting in claims:
            if port in wanted:
                other = wanted[port][0]
                raise StackError(f"port {port} is configured for both {other} and {name}: change {setting}")
            wanted[port] = (name, setting)
        if "broker" in local:
            self._check_tls_ports(wanted)
        if "registry" in local:
            self._check_https_port(wanted)
        for port, (name, setting) in wanted.items():
            host = hosts.get(name, "127.0.0.1")
            if probes.port_in_use(host, port):
                raise StackError(
                    f"port {port} ({name}) is already in use on {host}: set {setting} to a free port"
                )

    def _check_tls_ports(self, wanted: dict[int, tuple[str, str]]) -> None:
        """The broker's device-facing TLS ports: distinct from the others and bindable on --listen."""
        tls, listen = self.settings.tls, self.settings.stack.listen
        ports = [(tls.port, "IOTFLEET_TLS__PORT"), (tls.cert_port, "IOTFLEET_TLS__CERT_PORT")]
        if tls.websockets_port:
            ports.append((tls.websockets_port, "IOTFLEET_TLS__WEBSOCKETS_PORT"))
        seen: dict[int, str] = {}
        for port, setting in ports:
            clash = seen.get(port) or (wanted[port][1] if port in wanted else None)
            if clash is not None:
                raise StackError(f"port {port} is configured twice ({clash} and {setting}): change {setting}")
            seen[port] = setting
            problem = probes.bind_problem(listen, port)
            if problem is not None:
                raise StackError(
                    f"cannot listen on {listen}:{port} ({problem}): change {setting} or IOTFLEET_STACK__LISTEN"
                    " (iotfleet up --listen)"
                )

    def _check_https_port(self, wanted: dict[int, tuple[str, str]]) -> None:
        host = self.https_host()
        if host is None:
            return
        port, setting = self.settings.registry.https_port, "IOTFLEET_REGISTRY__HTTPS_PORT"
        tls = self.settings.tls
        taken = {tls.port: "IOTFLEET_TLS__PORT", tls.cert_port: "IOTFLEET_TLS__CERT_PORT"}
        if tls.websockets_port:
            taken[tls.websockets_port] = "IOTFLEET_TLS__WEBSOCKETS_PORT"
        clash = wanted[port][1] if port in wanted else taken.get(port)
        if clash is not None:
            raise StackError(f"port {port} is configured twice ({clash} and {setting}): change {setting}")
        problem = probes.bind_problem(host, port)
        if problem is not None:
            raise StackError(f"cannot listen on {host}:{port} for HTTPS ({problem}): change {setting}")

    def up(self, *, foreground: bool, on_progress: Callable[[str], None] = print) -> int | None:
        """Start everything; return the foreground supervisord's exit code, or None when detached."""
        self.check_remote_endpoints()
        parts = self.parts()
        self.check_can_start(parts)
        for warning in roles.cleartext_warnings(self.settings, self.influx_url(), self.agent_url()):
            on_progress(warning)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self._write_configs(parts)
        on_progress(f"state dir {self.layout.root}; logs in {self.layout.logs}")
        note = fd_limit_note()
        if note is not None:
            on_progress(note)
        argv = [_script("supervisord"), "-c", str(self.layout.supervisord_conf)]
        process: subprocess.Popen[bytes] | None = None
        if foreground:
            process = subprocess.Popen([*argv, "-n"])
        else:
            # supervisord daemonizes itself; its pid file says when it is there.
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise StackError(f"supervisord did not start: {done.stderr.strip() or done.stdout.strip()}")
        try:
            self._bring_up(parts, on_progress, process)
        except BaseException:
            on_progress("start failed: stopping what was started")
            self.down(on_progress=lambda _m: None)
            raise
        if process is None:
            return None
        return self._wait_foreground(process, on_progress)

    def _bring_up(
        self, parts: list[Part], on_progress: Callable[[str], None], process: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + self.settings.stack.ready_timeout_s

        def wait(part: Part) -> None:
            while True:
                if process is not None and process.poll() is not None:
                    raise StackError(f"supervisord exited ({process.returncode}); see {self.layout.logs}")
                if self.supervisord_pid() is not None and self.layout.socket.exists():
                    info = self._rpc().supervisor.getProcessInfo(part.name)
                    if info["statename"] in ("FATAL", "BACKOFF") and time.monotonic() > deadline - 1:
                        break
                    if (
                        info["statename"] == "RUNNING"
                        and self.health(part.kind, part.port, self._part_url(part))[0]
                    ):
                        on_progress(f"{part.name} healthy (port {part.port}, pid {info['pid']})")
                        return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            log = self.layout.logs / f"{part.name}.log"
            raise StackError(
                f"{part.name} did not become healthy within {self.settings.stack.ready_timeout_s:.0f} s; "
                f"see {log}"
            )

        infra = [p for p in parts if p.name in INFRA]
        services = [p for p in parts if p.name not in INFRA]
        for part in infra:
            wait(part)
        if self.roles() & {"influxdb", "registry", "ingest"}:
            asyncio.run(_ensure_database(self._influx_settings()))
            on_progress(
                f"InfluxDB database {self.settings.influx.database!r} with retention policy "
                f"{self.settings.influx.retention_policy!r} ({self.settings.influx.retention}) ready"
            )
        rpc = self._rpc()
        for part in services:
            rpc.supervisor.startProcess(part.name, False)
        for part in services:
            wait(part)

    def _influx_settings(self) -> InfluxSettings:
        """InfluxDB as this host's services reach it (an opened influxdb host: over HTTPS)."""
        s = self.settings
        url = self.influx_url()
        ca_file = s.influx.ca_file or (Path(self._platform_ca()) if url.startswith("https://") else None)
        return s.influx.model_copy(update={"url": url, "ca_file": ca_file})

    def _wait_foreground(self, process: subprocess.Popen[bytes], on_progress: Callable[[str], None]) -> int:
        on_progress("running in the foreground; Ctrl-C stops everything")
        try:
            return process.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached supervisord too (same process group);
            # it stops every program. Wait for it, and make sure.
            on_progress("stopping…")
            try:
                return process.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                process.send_signal(signal.SIGTERM)
                return process.wait()

    def down(self, *, on_progress: Callable[[str], None] = print, timeout: float = 60.0) -> list[int]:
        """Stop every process this state dir's supervisord started, then supervisord; return their pids."""
        pid = self.supervisord_pid()
        if pid is None:
            on_progress(f"iotfleet is not running from {self.layout.root}")
            return []
        pids: list[int] = []
        try:
            rpc = self._rpc()
            pids = [info["pid"] for info in rpc.supervisor.getAllProcessInfo() if info.get("pid")]
            rpc.supervisor.stopAllProcesses(True)
            rpc.supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault) as exc:
            on_progress(f"supervisord did not answer ({exc}); sending it SIGTERM")
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(process_alive(p) for p in [pid, *pids]):
            time.sleep(0.1)
        leftovers = [p for p in [*pids, pid] if process_alive(p)]
        for leftover in leftovers:  # only pids we started, recorded above
            on_progress(f"pid {leftover} did not stop in {timeout:.0f} s: SIGKILL")
            os.kill(leftover, signal.SIGKILL)
        on_progress(f"stopped {len(pids)} processes and supervisord (pid {pid})")
        return [*pids, pid]


async def _ensure_database(influx: InfluxSettings) -> None:
    async with InfluxClient(influx) as client:
        await client.ensure_database()


# The broker holds one fd per device connection: 100,000 devices plus its own files and the
# platform's sessions. supervisord raises its limits to `minfds` (soft and hard) and every part
# inherits them; mosquitto's own `max_connections` defaults to -1 (no limit but the fd limit).
FLEET_FDS = 131_072


def _fd_target() -> int:
    """`minfds` for supervisord: FLEET_FDS where the hard limit allows it or may be raised, else the hard limit.

    Raising the hard limit needs CAP_SYS_RESOURCE (root on a normal host; a container may
    withhold it) and stays under fs.nr_open. Probing it raises this process's own hard limit,
    which is harmless; supervisord refuses to start on a `minfds` the environment cannot give.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= FLEET_FDS:
        return FLEET_FDS
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, FLEET_FDS))
    except (ValueError, OSError):
        return hard
    return FLEET_FDS


def broker_fd_limit() -> int:
    """The open-files limit the stack's broker gets here (about as many device connections)."""
    return _fd_target()


def fd_limit_note() -> str | None:
    """A line for `iotfleet up` when the broker cannot hold a 100,000-device fleet here."""
    target = _fd_target()
    if target >= FLEET_FDS:
        return None
    return (
        f"open-files limit {target:,}: the broker holds at most ~{target - 100:,} device connections;"
        f" for 100,000 raise the hard limit to {FLEET_FDS:,} (ulimit -Hn, systemd LimitNOFILE, docker --ulimit)"
    )


def _url_port(url: str) -> int:
    tail = url.split("://", 1)[-1].split("/", 1)[0]
    if ":" in tail:
        return int(tail.rsplit(":", 1)[1])
    return 443 if url.startswith("https") else 80


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _url_host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]


def _supervisor_quote(value: str) -> str:
    # supervisord expands %(name)s in its config: a literal % must be doubled.
    return value.replace("%", "%%").replace('"', '\\"')


def tls_endpoints(settings: Settings, platform_pki: pki.PlatformPki) -> dict[str, Any]:
    """Where devices connect over TLS and the CA certificate they need (stack file, status --json)."""
    tls, listen = settings.tls, settings.stack.listen
    host = f"[{listen}]" if ":" in listen else listen
    return {
        "ca_cert": str(platform_pki.ca_cert_path.resolve()),
        "mqtts_password": f"mqtts://{host}:{tls.port}",
        "mqtts_certificate": f"mqtts://{host}:{tls.cert_port}",
        "wss": f"wss://{host}:{tls.websockets_port}" if tls.websockets_port else None,
        "listen": listen,
    }


def status_as_json(stack: Stack, parts: list[PartStatus]) -> dict[str, Any]:
    try:
        stored = json.loads(stack.layout.stack_file.read_text())
        base = stored["api"]
    except (FileNotFoundError, KeyError):
        stored = {}
        base = f"http://{stack.settings.registry.host}:{stack.settings.registry.port}"
    https = stored.get("https_api") if stored else stack.https_base()
    tls = stored.get("tls") or tls_endpoints(
        stack.settings, pki.platform_pki_paths(stack.settings.tls, stack.layout.root)
    )
    return {
        "running": bool(parts),
        "state_dir": str(stack.layout.root),
        "roles": stored.get("roles", stack.settings.stack.roles) if stored else stack.settings.stack.roles,
        "admin_api_key_file": str(stack.layout.admin_key),
        "dashboard": f"{base}/",
        "api": f"{base}/api/v1",
        "docs": f"{base}/docs",
        "healthy": bool(parts) and all(p.healthy for p in parts),
        "parts": [asdict(p) for p in parts],
        "ca_cert": tls["ca_cert"],
        "tls": tls,
        # HTTPS for operators beyond loopback (None unless the stack listens: --listen).
        "https_dashboard": f"{https}/" if https else None,
        "https_api": f"{https}/api/v1" if https else None,
    }
