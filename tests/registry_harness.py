"""Registry test support: a throwaway PostgreSQL 15, the registry app in-process, API clients.

Imported by the ``test_registry_*`` modules (fixtures are imported into their
namespace). The registry runs in the test's event loop through httpx's ASGI
transport with its real lifespan: real migrations, real broker links, real DB.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device_registry.main import create_app
from iotfleet import dynsec
from iotfleet.settings import MqttSettings, RegistrySettings, Settings
from iotfleet.stack import probes
from tests.harness import Broker


def _pg_bin() -> Path:
    """Debian's newest PostgreSQL server binaries (15 on Debian 12), or IOTFLEET_TEST_PG_BIN."""
    if os.environ.get("IOTFLEET_TEST_PG_BIN"):
        return Path(os.environ["IOTFLEET_TEST_PG_BIN"])
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    return max(found, key=lambda p: int(p.parts[-2])) if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
ADMIN_KEY = "ifk_test-admin-" + secrets.token_urlsafe(16)


# --- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class Postgres:
    """A PostgreSQL cluster of our own, run as user postgres (initdb refuses root)."""

    root: Path
    port: int
    host: str = "127.0.0.1"
    # Runs the server elsewhere, e.g. ``["ip", "netns", "exec", NS]`` (tests/netns_hosts.py).
    exec_prefix: tuple[str, ...] = ()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    def _as_postgres(self, *argv: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*self.exec_prefix, *prefix, *argv], check=True, capture_output=True, text=True, timeout=60
        )

    def start(self) -> Postgres:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL 15 not installed ({PG_BIN}/initdb); run scripts/install-system-deps.sh")
        self.sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        if self.host != "127.0.0.1":  # initdb's pg_hba.conf trusts loopback only
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses={self.host}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "start",
        )
        return self

    def stop(self) -> None:
        try:
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        name = f"reg_{secrets.token_hex(5)}"
        self._as_postgres(
            str(PG_BIN / "psql"), "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres",
            "-q", "-c", f"CREATE DATABASE {name}",
        )  # fmt: skip
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # Not under pytest's tmp dir: that is 0700 root, which user postgres cannot enter.
    root = Path(tempfile.mkdtemp(prefix="iotfleet-pg-"))
    server = Postgres(root, probes.free_port()).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry DB of one test: a SQLite file, or a fresh database on the session PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database()


# --- the registry -------------------------------------------------------------------------------


def registry_settings(broker: Broker, state_dir: Path, database_url: str | None = None) -> Settings:
    return Settings(
        state_dir=state_dir,
        mqtt=broker.settings_for("iotfleet-registry"),
        registry=RegistrySettings(database_url=database_url, bootstrap_admin_key=ADMIN_KEY),
        broker_agent=broker.agent_settings(),
    )


@dataclass
class Api:
    """An API client holding one key; ``as_(key)`` gives a client with another."""

    http: httpx.AsyncClient
    app: Any

    def as_(self, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=self.http._transport, base_url="http://registry", headers=headers, timeout=120
        )

    @property
    def state(self) -> Any:
        return self.app.state.registry


@asynccontextmanager
async def running_registry(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://registry",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        ) as http:
            api = Api(http, app)
            await wait_for(lambda: api.state.reconciler.last is not None, what="first reconcile", within=30)
            yield api


async def wait_for(check: Any, *, what: str, within: float = 10.0, interval: float = 0.02) -> None:
    import asyncio

    deadline = time.monotonic() + within
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not true after {within} s")
        await asyncio.sleep(interval)


# --- a device over MQTT -------------------------------------------------------------------------


class DeviceClient:
    """A paho MQTT 5 client acting as a device; records acks, messages and disconnects."""

    def __init__(
        self, mqtt_settings: MqttSettings, username: str, password: str, client_id: str | None = None
    ):
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or username, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.host, self.port = mqtt_settings.host, mqtt_settings.port
        self.connack: ReasonCode | None = None
        self.disconnected_at: float | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.disconnected_at = time.monotonic()
        self.disconnect_reason = reason

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self.pubacks[mid] = reason

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self.subacks[mid] = reasons

    def will(self, topic: str, payload: bytes) -> DeviceClient:
        self.client.will_set(topic, payload, qos=1, retain=True)
        return self

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        probes.wait_until(lambda: self.connack is not None, timeout=timeout, what="CONNACK")
        assert self.connack is not None
        return self.connack

    def publish(
        self, topic: str, payload: bytes | str, *, retain: bool = False, timeout: float = 5.0
    ) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        probes.wait_until(lambda: info.mid in self.pubacks, timeout=timeout, what=f"PUBACK on {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str, timeout: float = 5.0) -> ReasonCode:
        _rc, mid = self.client.subscribe(topic, qos=1)
        probes.wait_until(lambda: mid in self.subacks, timeout=timeout, what=f"SUBACK on {topic}")
        return self.subacks[mid][0]

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_device(broker: Broker, username: str, password: str, **kw: Any) -> DeviceClient:
    device = DeviceClient(broker.settings_for(dynsec.ADMIN_USER), username, password, **kw)
    device.connect()
    return device


def admin_listener(broker: Broker, topic: str) -> DeviceClient:
    """An admin-account client subscribed to ``topic`` (it may read everything)."""
    listener = DeviceClient(
        broker.settings_for(dynsec.ADMIN_USER), dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER],
        client_id=f"listener-{secrets.token_hex(4)}",
    )  # fmt: skip
    listener.connect()
    assert not listener.subscribe(topic).is_failure
    return listener


# --- the registry as a real process (kill -9 tests) ----------------------------------------------


@dataclass
class RegistryProcess:
    """``python -m device_registry.main`` with the env the stack supervisor gives it."""

    broker: Broker
    state_dir: Path
    database_url: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "IOTFLEET_STATE_DIR": str(self.state_dir),
                "IOTFLEET_MQTT__HOST": self.broker.host,
                "IOTFLEET_MQTT__PORT": str(self.broker.port),
                "IOTFLEET_MQTT__USERNAME": "iotfleet-registry",
                "IOTFLEET_MQTT__PASSWORD": self.broker.passwords["iotfleet-registry"],
                "IOTFLEET_BROKER_AGENT__PORT": str(self.broker.agent_port),
                "IOTFLEET_BROKER_AGENT__TOKEN": self.broker.agent_token,
                "IOTFLEET_REGISTRY__HOST": "127.0.0.1",
                "IOTFLEET_REGISTRY__PORT": str(self.port),
                "IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            }
        )
        if self.database_url:
            env["IOTFLEET_REGISTRY__DATABASE_URL"] = self.database_url
        env.update(self.extra_env or {})
        return env

    def start(self) -> RegistryProcess:
        self.port = self.port or probes.free_port()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "registry.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "device_registry.main"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        probes.wait_until(self._ready, timeout=30, what="registry /healthz")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"registry exited {self.proc.returncode}:\n{self.log_tail()}")
        return probes.http_ok(f"{self.url}/healthz")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown code runs
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.state_dir / "registry.log").read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
