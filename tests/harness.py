"""Real mosquitto and influxd processes for the tests: free ports, temp dirs, polled readiness.

Never a system service, never a fixed port, never a fixed sleep.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotfleet import dynsec
from iotfleet.settings import BrokerAgentSettings, InfluxSettings, MqttSettings
from iotfleet.stack import configs, probes

READY_TIMEOUT_S = 30.0


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not path:
        raise RuntimeError(f"{binary} is not installed; run `make test` (it installs it)")
    return path


@dataclass
class ServerProcess:
    """A server we started; only we stop it, by its pid."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def spawn_and_wait(self, ready: Callable[[], bool], what: str) -> None:
        """Start the server and poll ``ready`` until it answers (or the process dies)."""
        self.spawn()

        def check() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            return ready()

        probes.wait_until(check, timeout=READY_TIMEOUT_S, what=what)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


class _Restartable:
    """stop/restart of a server whose ``process`` we started (only we stop it)."""

    process: ServerProcess | None

    def start(self) -> _Restartable:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Broker(_Restartable):
    """A mosquitto (dynsec for the platform, files for devices) and its broker agent on free ports."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=probes.free_port)
    passwords: dict[str, str] = field(default_factory=dynsec.new_passwords)
    process: ServerProcess | None = None
    config: dict[str, Any] = field(default_factory=dict)  # more write_mosquitto_config arguments
    agent_port: int = field(default_factory=probes.free_port)
    agent_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    agent: ServerProcess | None = None
    # Runs the broker and its agent elsewhere, e.g. ``["ip", "netns", "exec", NS]`` (tests/netns_hosts.py).
    exec_prefix: list[str] = field(default_factory=list)

    def start(self) -> Broker:
        files = configs.write_mosquitto_config(
            self.state_dir, host=self.host, port=self.port, passwords=self.passwords, **self.config
        )
        if self.process is None:
            self.process = ServerProcess(
                "mosquitto",
                [*self.exec_prefix, _require("mosquitto"), "-c", str(files.config)],
                self.state_dir / "mosquitto.log",
            )
        admin = dynsec.ADMIN_USER
        self.process.spawn_and_wait(
            lambda: probes.mqtt_ok(self.host, self.port, admin, self.passwords[admin]),
            f"mosquitto on port {self.port}",
        )
        self.start_agent()
        return self

    def start_agent(self) -> None:
        # The agent's port was only free when chosen: another test's server may have taken it since
        # (parallel workers). Then it exits "address already in use", and a new port is tried.
        for attempt in range(3):
            try:
                self._start_agent()
                return
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.agent_port = probes.free_port(self.host)

    def _start_agent(self) -> None:
        if self.agent is None:
            self.agent = ServerProcess(
                "broker-agent",
                [*self.exec_prefix, sys.executable, "-m", "broker_agent.main"],
                self.state_dir / "broker-agent.log",
            )
        if self.agent.alive():
            return
        env = {
            **os.environ,
            "IOTFLEET_STATE_DIR": str(self.state_dir.parent),
            "IOTFLEET_MQTT__HOST": self.host,
            "IOTFLEET_MQTT__PORT": str(self.port),
            "IOTFLEET_BROKER_AGENT__HOST": self.host,
            "IOTFLEET_BROKER_AGENT__PORT": str(self.agent_port),
            "IOTFLEET_BROKER_AGENT__TOKEN": self.agent_token,
            "IOTFLEET_BROKER_AGENT__DEVICES_FILE": str(self.state_dir / "devices"),
            "IOTFLEET_BROKER_AGENT__BROKER_PID_FILE": str(self.state_dir / "mosquitto.pid"),
        }
        agent = self.agent
        log = agent.log_path.open("ab")
        agent.proc = subprocess.Popen(
            agent.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

        def ready() -> bool:
            if not agent.alive():
                raise RuntimeError(f"broker agent exited:\n{agent.log_tail()}")
            return probes.http_ok(f"http://{self.host}:{self.agent_port}/healthz")

        probes.wait_until(ready, timeout=READY_TIMEOUT_S, what=f"broker agent on port {self.agent_port}")

    def stop(self) -> None:
        if self.agent:
            self.agent.stop()
        super().stop()

    def restart(self) -> None:
        """Restart mosquitto only (its agent keeps running, as in the stack): sessions and queues survive."""
        if self.process:
            self.process.stop()
        self.start()

    def agent_settings(self) -> BrokerAgentSettings:
        """How a registry reaches this broker's agent."""
        return BrokerAgentSettings(host=self.host, port=self.agent_port, token=self.agent_token, poll_s=0.5)

    def settings_for(self, username: str = dynsec.ADMIN_USER) -> MqttSettings:
        """MQTT settings for one of the bootstrap accounts (admin or a service)."""
        return MqttSettings(
            host=self.host, port=self.port, username=username, password=self.passwords[username]
        )


@dataclass
class Influxd(_Restartable):
    """An influxd on free loopback ports (HTTP and RPC)."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=probes.free_port)
    rpc_port: int = field(default_factory=probes.free_port)
    process: ServerProcess | None = None
    exec_prefix: list[str] = field(default_factory=list)  # as Broker's

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Influxd:
        config = configs.write_influxdb_config(
            self.state_dir, host=self.host, port=self.port, rpc_port=self.rpc_port
        )
        if self.process is None:
            self.process = ServerProcess(
                "influxd",
                [*self.exec_prefix, _require("influxd"), "-config", str(config)],
                self.state_dir / "influxd.log",
            )
        self.process.spawn_and_wait(
            lambda: probes.http_ok(f"{self.url}/ping"), f"influxd on port {self.port}"
        )
        return self

    def settings_for(self, database: str) -> InfluxSettings:
        return InfluxSettings(url=self.url, database=database)


def env_for(broker: Broker, influxd: Influxd, database: str, state_dir: Path) -> dict[str, str]:
    """Environment for a service subprocess pointed at these servers."""
    env = dict(os.environ)
    env.update(
        {
            "IOTFLEET_STATE_DIR": str(state_dir),
            "IOTFLEET_MQTT__HOST": broker.host,
            "IOTFLEET_MQTT__PORT": str(broker.port),
            "IOTFLEET_INFLUX__URL": influxd.url,
            "IOTFLEET_INFLUX__DATABASE": database,
            "IOTFLEET_BROKER_AGENT__PORT": str(broker.agent_port),
            "IOTFLEET_BROKER_AGENT__TOKEN": broker.agent_token,
        }
    )
    return env
