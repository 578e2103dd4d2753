"""Fixtures: real mosquitto (dynsec) and influxd on free ports, isolated per test.

The servers are started once per session (they take ~0.2 s and ~1 s); each
test gets its own InfluxDB database and its own device-id namespace. Tests that
restart or kill a server use ``fresh_broker``/``fresh_influxd`` instead. When a
test fails, the servers' log tails are printed with the failure.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from iotfleet.influx import quote_identifier
from iotfleet.settings import Settings
from tests.harness import Broker, Influxd


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(request.node, f"rep_{when}", None) is not None and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )


def _dump_logs(request: pytest.FixtureRequest, *servers: Broker | Influxd) -> None:
    if not _failed(request):
        return
    for server in servers:
        if server.process is not None:
            print(f"\n----- {server.process.name} log ({server.process.log_path}) -----")
            print(server.process.log_tail())


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def session_broker(servers_dir: Path) -> Iterator[Broker]:
    broker = Broker(servers_dir / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def session_influxd(servers_dir: Path) -> Iterator[Influxd]:
    server = Influxd(servers_dir / "influxd").start()
    yield server
    server.stop()


@pytest.fixture
def broker(session_broker: Broker, request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The shared broker; its log tail is printed if the test fails."""
    yield session_broker
    _dump_logs(request, session_broker)


@pytest.fixture
def influxd(session_influxd: Influxd, request: pytest.FixtureRequest) -> Iterator[Influxd]:
    yield session_influxd
    _dump_logs(request, session_influxd)


@pytest.fixture
def fresh_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A broker of this test's own, for tests that restart or kill it."""
    broker = Broker(tmp_path / "mosquitto").start()
    yield broker
    _dump_logs(request, broker)
    broker.stop()


@pytest.fixture
def fresh_influxd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Influxd]:
    server = Influxd(tmp_path / "influxd").start()
    yield server
    _dump_logs(request, server)
    server.stop()


@pytest.fixture
def uid() -> Callable[[str], str]:
    """Unique names per test (device ids, databases): ``uid('dev')`` → ``dev-1a2b3c4d``."""
    token = secrets.token_hex(4)
    return lambda prefix: f"{prefix}-{token}"


@pytest.fixture
def database(influxd: Influxd) -> Iterator[str]:
    """A fresh InfluxDB database for this test, dropped afterwards."""
    name = f"test_{secrets.token_hex(6)}"
    yield name
    httpx.post(f"{influxd.url}/query", data={"q": f"DROP DATABASE {quote_identifier(name)}"}, timeout=10)


@pytest.fixture
def settings(broker: Broker, influxd: Influxd, database: str, tmp_path: Path) -> Settings:
    """Settings pointing at the shared servers, with this test's database and state dir."""
    return Settings(
        state_dir=tmp_path / "state",
        mqtt=broker.settings_for(),
        influx=influxd.settings_for(database),
    )
