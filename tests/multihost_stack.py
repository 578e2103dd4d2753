"""The platform laid out over hosts (network namespaces, tests/netns_hosts.py), for tests and benchmarks.

Host ``core``: mosquitto + its broker agent + influxd. Host ``db``: PostgreSQL.
Each service host (``svc1``, ``svc2``, …): one registry, one ingest replica per
device type (one shared subscription group across hosts) and one rules engine,
all on the registry database in PostgreSQL. Host ``fleet``: the simulator
(``python -m simulators``), a separate process tree like a real fleet.

Two ways to start the hosts, the same layout:

- ``use_roles=True`` (what an operator does, docs/deployment.md): ``iotfleet up
  --roles broker,influxdb --listen <core>`` on core, ``iotfleet secrets export``
  there and ``import`` on each service host, then ``iotfleet up --roles
  registry,ingest,rules --listen <svcN>`` (MQTT over TLS to the broker, InfluxDB
  and the broker agent over HTTPS, the API over HTTPS on 8443);
- ``use_roles=False``: the test harness's servers (tests/harness.py) and the
  services' entry points with the settings ``iotfleet up`` would give them
  (``service_env``), plain MQTT/HTTP between hosts.

Every server binds its host's address; the test process (root namespace) sees
all of them through the bridge (``endpoints()``). A service host can be killed
with everything on it and started again on the same state dir (its disk
survived: the ingest's journal, the rules engine's files, its sessions'
names).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from iotfleet import dynsec
from iotfleet.stack import probes
from simulators.fleet import DeviceCredentials
from simulators.provisioning import RegistryProvisioner, save_credentials
from tests.harness import Broker, Influxd
from tests.netns_hosts import Host, HostNetwork, HostProcess
from tests.registry_harness import ADMIN_KEY, Postgres

INFLUX_DATABASE = "iotfleet"
READY_TIMEOUT_S = 60.0
# Fixed ports are safe here: every host is a namespace of the test's own, with its own port space.
REGISTRY_PORT = 8000
RULES_HEALTH_PORT = 9100
INGEST_HEALTH_PORT = 9101
POSTGRES_PORT = 5432
LEASE_TTL_S = 5.0  # registry and rules leases: the defaults on PostgreSQL
RULES_PARTITIONS = 16  # per device type, spread over the live engines


IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]
TLS_MQTT_PORT = 8883  # the stack's defaults, free in a namespace of the test's own
HTTPS_API_PORT = 8443


@dataclass(frozen=True)
class Endpoints:
    """How the test process (root namespace) reaches the platform, and as whom."""

    mqtt_host: str
    mqtt_port: int
    admin_password: str  # the broker's admin account (may subscribe to everything)
    influx_url: str
    api_key: str  # an admin API key of the registry
    ca_file: Path | None = None  # the platform CA, when the hosts talk TLS

    def http_verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True


@dataclass
class ServiceHost:
    """One service host: what runs on it and with which settings (to start it again after a kill)."""

    host: Host
    state_dir: Path
    device_types: list[str]
    extra_env: dict[str, str]
    processes: dict[str, HostProcess] = field(default_factory=dict)
    tls: bool = False  # started with `iotfleet up --roles … --listen`: the API over HTTPS

    @property
    def api_url(self) -> str:
        if self.tls:
            return f"https://{self.host.address}:{HTTPS_API_PORT}"
        return f"http://{self.host.address}:{REGISTRY_PORT}"

    def health_urls(self) -> dict[str, str]:
        urls = {"registry": f"{self.api_url}/healthz", "rules": self._health(RULES_HEALTH_PORT)}
        for offset, device_type in enumerate(self.device_types):
            urls[f"ingest-{device_type}"] = self._health(INGEST_HEALTH_PORT + offset)
        return urls

    def _health(self, port: int) -> str:
        return f"http://{self.host.address}:{port}/healthz"

    def log_tails(self) -> str:
        return "\n".join(f"--- {self.host.name}/{n} ---\n{p.log_tail()}" for n, p in self.processes.items())


@dataclass
class MultiHostPlatform:
    """Servers and service hosts on a HostNetwork; ``close()`` stops what it started."""

    network: HostNetwork
    root: Path
    device_types: list[str]
    broker: Broker | None = None
    influxd: Influxd | None = None
    postgres: Postgres | None = None
    database_url: str = ""
    rules_store_url: str = ""  # the partitioned rules engines' leases and firing state
    services: dict[str, ServiceHost] = field(default_factory=dict)
    use_roles: bool = False
    secrets: dict[str, object] = field(default_factory=dict)  # `iotfleet secrets export` (roles)
    ca_file: Path | None = None  # the platform CA made by core's `up` (roles)

    # --- servers ---------------------------------------------------------------------------------

    def start_servers(self, core: str = "core", db: str = "db") -> None:
        core_host, db_host = self.network[core], self.network[db]
        # Not under pytest's tmp dir: that is 0700 root, which user postgres cannot enter.
        pg_root = Path(tempfile.mkdtemp(prefix="iotfleet-pg-hosts-"))
        self.postgres = Postgres(
            pg_root, POSTGRES_PORT, host=db_host.address, exec_prefix=tuple(db_host.exec_prefix())
        ).start()
        self.database_url = self.postgres.create_database()
        self.rules_store_url = self.postgres.create_database().replace(
            "postgresql+asyncpg://", "postgresql://"
        )
        if self.use_roles:
            self._up_core(core_host)
            return
        self.broker = Broker(
            self.root / "mosquitto", host=core_host.address, exec_prefix=core_host.exec_prefix()
        ).start()
        self.influxd = Influxd(
            self.root / "influxd", host=core_host.address, exec_prefix=core_host.exec_prefix()
        ).start()

    def _up_core(self, core: Host) -> None:
        """`iotfleet up --roles broker,influxdb` opened on core's address; its secrets exported."""
        state = self.root / core.name
        self.iotfleet(core, "up", "--detach", "--roles", "broker,influxdb", "--listen", core.address)
        exported = self.root / "iotfleet-secrets.json"
        self.iotfleet(
            core, "secrets", "export", "--roles", "broker,influxdb", "--listen", core.address,
            "--out", str(exported),
        )  # fmt: skip
        self.secrets = json.loads(exported.read_text())
        self.ca_file = state / "tls" / "ca.crt"

    def iotfleet(
        self, host: Host, *args: str, env: dict[str, str] | None = None, state: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """An `iotfleet` command on a host (in its namespace), on that host's state dir; must succeed."""
        state = state or self.root / host.name
        done = subprocess.run(
            [*host.exec_prefix(), *IOTFLEET, *args, "--state-dir", str(state)],
            env=env or _clean_env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{host.name}: iotfleet {' '.join(args)} failed:\n{done.stderr[-4000:]}")
        return done

    def endpoints(self) -> Endpoints:
        if self.use_roles:
            endpoints: dict[str, str] = self.secrets["endpoints"]  # type: ignore[assignment]
            passwords: dict[str, str] = self.secrets["service_passwords"]  # type: ignore[assignment]
            return Endpoints(
                mqtt_host=endpoints["mqtt_host"],
                mqtt_port=int(endpoints["mqtt_tls_port"]),
                admin_password=passwords[dynsec.ADMIN_USER],
                influx_url=endpoints["influx_url"],
                api_key=str(self.secrets["admin_api_key"]),
                ca_file=self.ca_file,
            )
        assert self.broker is not None and self.influxd is not None
        return Endpoints(
            mqtt_host=self.broker.host,
            mqtt_port=self.broker.port,
            admin_password=self.broker.passwords[dynsec.ADMIN_USER],
            influx_url=self.influxd.url,
            api_key=ADMIN_KEY,
        )

    # --- service hosts ---------------------------------------------------------------------------

    def service_env(self, service: ServiceHost, account: str) -> dict[str, str]:
        """What ``iotfleet up`` gives a service, pointed at the servers on the other hosts."""
        assert self.broker is not None and self.influxd is not None
        address = service.host.address
        return {
            **os.environ,
            "IOTFLEET_STATE_DIR": str(service.state_dir),
            "IOTFLEET_MQTT__HOST": self.broker.host,
            "IOTFLEET_MQTT__PORT": str(self.broker.port),
            "IOTFLEET_MQTT__USERNAME": account,
            "IOTFLEET_MQTT__PASSWORD": self.broker.passwords[account],
            "IOTFLEET_INFLUX__URL": self.influxd.url,
            "IOTFLEET_INFLUX__DATABASE": INFLUX_DATABASE,
            "IOTFLEET_REGISTRY__HOST": address,
            "IOTFLEET_REGISTRY__PORT": str(REGISTRY_PORT),
            "IOTFLEET_REGISTRY__DATABASE_URL": self.database_url,
            "IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            "IOTFLEET_BROKER_AGENT__HOST": self.broker.host,
            "IOTFLEET_BROKER_AGENT__PORT": str(self.broker.agent_port),
            "IOTFLEET_BROKER_AGENT__TOKEN": self.broker.agent_token,
            "IOTFLEET_HEALTH__HOST": address,
            "IOTFLEET_RULES__API_KEY": ADMIN_KEY,
            **self.replica_env(service.host),
            **service.extra_env,
        }

    def _up_service_host(self, service: ServiceHost) -> None:
        """`iotfleet up --roles registry,ingest,rules`, pointed at core (TLS) and db; returns once healthy."""
        endpoints: dict[str, str] = self.secrets["endpoints"]  # type: ignore[assignment]
        env = {
            **_clean_env(),
            "IOTFLEET_MQTT__HOST": endpoints["mqtt_host"],
            "IOTFLEET_MQTT__PORT": str(endpoints["mqtt_tls_port"]),
            "IOTFLEET_MQTT__TLS": "true",
            "IOTFLEET_INFLUX__URL": endpoints["influx_url"],
            "IOTFLEET_BROKER_AGENT__URL": endpoints["broker_agent_url"],
            "IOTFLEET_REGISTRY__DATABASE_URL": self.database_url,
            **self.replica_env(service.host),
            **service.extra_env,
        }
        address = service.host.address
        self.iotfleet(
            service.host, "up", "--detach", "--roles", "registry,ingest,rules", "--listen", address, env=env
        )

    def replica_env(self, host: Host) -> dict[str, str]:
        """Replicas: the registry's once-only work under a DB lease, the rules engines' partitions under
        leases in their shared store. Names given (stable across the host's restart): the defaults
        derive from the host name, which every namespace of this machine shares."""
        return {
            "IOTFLEET_REGISTRY__REPLICA": host.name,
            "IOTFLEET_REGISTRY__LEASE_TTL_S": str(LEASE_TTL_S),
            "IOTFLEET_RULES__PARTITIONS": str(RULES_PARTITIONS),
            "IOTFLEET_RULES__SHARED_STORE_URL": self.rules_store_url,
            "IOTFLEET_RULES__REPLICA": host.name,
            "IOTFLEET_RULES__LEASE_TTL_S": str(LEASE_TTL_S),
        }

    def add_service_host(self, name: str, extra_env: dict[str, str] | None = None) -> ServiceHost:
        service = ServiceHost(
            self.network[name], self.root / name, list(self.device_types), extra_env or {}, tls=self.use_roles
        )
        self.services[name] = service
        if self.use_roles:
            self.iotfleet(service.host, "secrets", "import", str(self.root / "iotfleet-secrets.json"))
        self.start_service_host(name)
        return service

    def start_service_host(self, name: str) -> None:
        """Start (or start again, on the same state dir) the registry, the ingest replicas and the rules engine."""
        service = self.services[name]
        if self.use_roles:
            self._up_service_host(service)
            return
        host, logs = service.host, service.state_dir / "logs"
        python = sys.executable
        registry_env = self.service_env(service, "iotfleet-registry")
        service.processes["registry"] = host.spawn(
            "registry", [python, "-m", "device_registry.main"], logs / "registry.log", registry_env
        )
        # Migrations run at the registry's start: the next host's registry waits for this one.
        self._wait_healthy(service, "registry")
        for offset, device_type in enumerate(service.device_types):
            env = self.service_env(service, "iotfleet-ingest")
            env.update(
                {
                    "IOTFLEET_INGEST__DEVICE_TYPE": device_type,
                    "IOTFLEET_INGEST__REPLICA": name,
                    "IOTFLEET_HEALTH__PORT": str(INGEST_HEALTH_PORT + offset),
                }
            )
            part = f"ingest-{device_type}"
            service.processes[part] = host.spawn(
                part, [python, "-m", "telemetry_ingest.runner"], logs / f"{part}.log", env
            )
        rules_env = self.service_env(service, "iotfleet-rules")
        rules_env.update(
            {
                "IOTFLEET_HEALTH__PORT": str(RULES_HEALTH_PORT),
                "IOTFLEET_RULES__CLIENT_ID": f"iotfleet-rules-{name}",
                "IOTFLEET_MQTT__SESSION_EXPIRY_S": "3600",
            }
        )
        service.processes["rules"] = host.spawn(
            "rules", [python, "-m", "rules_engine.main"], logs / "rules.log", rules_env
        )
        for part in service.health_urls():
            self._wait_healthy(service, part)

    def _wait_healthy(self, service: ServiceHost, part: str) -> None:
        url = service.health_urls()[part]
        # A registry serves its API once its database answers; the rest of its /healthz (broker
        # agent, presence link) belongs to the once-only work of the lease holder.
        check = _registry_serves if part == "registry" else probes.http_ok

        def ready() -> bool:
            process = service.processes[part]
            if not process.alive():
                raise RuntimeError(f"{service.host.name}/{part} exited:\n{process.log_tail()}")
            return check(url)

        probes.wait_until(ready, timeout=READY_TIMEOUT_S, what=f"{service.host.name}/{part} healthy")

    def rules_metrics(self, name: str) -> str:
        """The rules engine's /metrics on a service host ('' if it does not answer). Under `iotfleet up`
        its health endpoint is on the host's loopback: read from inside the namespace."""
        service = self.services[name]
        if not self.use_roles:
            try:
                return httpx.get(
                    service.health_urls()["rules"].replace("/healthz", "/metrics"), timeout=2
                ).text
            except httpx.HTTPError:
                return ""
        url = f"http://127.0.0.1:{RULES_HEALTH_PORT}/metrics"
        done = subprocess.run(
            [*service.host.exec_prefix(), "curl", "-sf", "-m", "2", url],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout if done.returncode == 0 else ""

    # --- the fleet -------------------------------------------------------------------------------

    def provision(self, counts: dict[str, int], path: Path, via: str) -> list[DeviceCredentials]:
        """Devices through the bulk API of one registry; credentials saved for the simulator."""
        endpoints = self.endpoints()
        provisioner = RegistryProvisioner(
            self.services[via].api_url, endpoints.api_key, cafile=endpoints.ca_file
        )
        devices = provisioner.provision(counts)
        save_credentials(path, devices)
        return devices

    def start_fleet(self, host: str, args: list[str], log_path: Path) -> HostProcess:
        """``python -m simulators`` on the fleet host, against the broker (and InfluxDB for --verify)."""
        endpoints = self.endpoints()
        env = {
            **_clean_env(),
            "IOTFLEET_MQTT__HOST": endpoints.mqtt_host,
            "IOTFLEET_INFLUX__URL": endpoints.influx_url,
            "IOTFLEET_INFLUX__DATABASE": INFLUX_DATABASE,
        }
        if endpoints.ca_file is not None:  # devices over TLS, --verify reads InfluxDB over HTTPS
            env["IOTFLEET_INFLUX__CA_FILE"] = str(endpoints.ca_file)
            tls = ["--tls", "--cafile", str(endpoints.ca_file), "--tls-host", endpoints.mqtt_host]
            argv = [*tls, "--tls-port", str(endpoints.mqtt_port)]
        else:
            argv = ["--mqtt-port", str(endpoints.mqtt_port)]
        return self.network[host].spawn(
            "fleet", [sys.executable, "-m", "simulators", *argv, *args], log_path, env
        )

    # --- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the servers by pid; the namespaces' close() kills whatever is left in them."""
        for service in self.services.values():
            for process in service.processes.values():
                process.stop(timeout=10)
            if self.use_roles and service.host.pids():
                _down(self, service.host)
        if self.use_roles and "core" in self.network.hosts:
            _down(self, self.network["core"])
        if self.broker is not None:
            self.broker.stop()
        if self.influxd is not None:
            self.influxd.stop()
        if self.postgres is not None:
            self.postgres.stop()


def _registry_serves(healthz_url: str) -> bool:
    try:
        response = httpx.get(healthz_url, timeout=2)
        return bool(response.json().get("checks", {}).get("database") == "ok")
    except (httpx.HTTPError, ValueError):
        return False


def _clean_env() -> dict[str, str]:
    """The environment without the caller's IOTFLEET_* settings (each host gets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLEET_")}
    env["IOTFLEET_STACK__READY_TIMEOUT_S"] = str(READY_TIMEOUT_S)
    return env


def _down(stack: MultiHostPlatform, host: Host) -> None:
    try:
        stack.iotfleet(host, "down")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"{host.name}: iotfleet down: {exc}")  # the namespace's close() kills what is left
