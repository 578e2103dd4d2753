"""`iotfleet up --roles`, `iotfleet secrets export|import`, `iotfleet systemd`: what each host runs and shares."""

from __future__ import annotations

import json
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from iotfleet import tls_clients
from iotfleet.cli import build_settings, main, make_parser
from iotfleet.errors import ConfigError, StackError
from iotfleet.settings import MqttSettings, load_settings
from iotfleet.stack import shared_secrets, systemd_units
from iotfleet.stack.configs import write_influxdb_config
from iotfleet.stack.supervisor import Stack

BROKER_HOST = "127.0.0.1"  # --listen needs an address of this host; loopback stands for the LAN one


def stack_for(argv: list[str]) -> Stack:
    return Stack(build_settings(make_parser().parse_args(argv)))


def part_names(stack: Stack) -> list[str]:
    return [p.name for p in stack.parts()]


def broker_host_stack(state: Path) -> Stack:
    return stack_for(["up", "--roles", "broker,influxdb", "--listen", BROKER_HOST, "--state-dir", str(state)])


def service_host_argv(state: Path) -> list[str]:
    return ["up", "--roles", "registry,ingest,rules", "--state-dir", str(state)]


REMOTE_ENV = {
    "IOTFLEET_MQTT__HOST": BROKER_HOST,
    "IOTFLEET_MQTT__PORT": "8883",
    "IOTFLEET_MQTT__TLS": "true",
    "IOTFLEET_INFLUX__URL": f"https://{BROKER_HOST}:8086",
    "IOTFLEET_BROKER_AGENT__URL": f"https://{BROKER_HOST}:9105",
}


# --- role selection ----------------------------------------------------------------------------


def test_default_is_every_role_and_every_part_as_before(tmp_path: Path) -> None:
    stack = stack_for(["up", "--state-dir", str(tmp_path)])
    assert stack.settings.stack.roles == "all"
    names = part_names(stack)
    assert names[:4] == ["mosquitto", "broker-agent", "influxd", "registry"]
    assert "rules-engine" in names and sum(n.startswith("ingest-") for n in names) >= 4
    ingest = next(p for p in stack.parts() if p.kind == "ingest")
    # single host: unchanged (plain subscription, replica 0, no TLS settings passed)
    assert ingest.env["IOTFLEET_INGEST__SHARED_SUBSCRIPTION"] == "false"
    assert "IOTFLEET_INGEST__REPLICA" not in ingest.env and "IOTFLEET_MQTT__TLS" not in ingest.env
    agent = next(p for p in stack.parts() if p.kind == "agent")
    assert agent.host == "127.0.0.1" and "IOTFLEET_BROKER_AGENT__TLS_CERTFILE" not in agent.env


def test_roles_are_normalised_and_unknown_ones_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(stack={"roles": " rules , broker"}).stack.roles == "broker,rules"
    assert load_settings(stack={"roles": "broker,all"}).stack.roles == "all"
    monkeypatch.setenv("IOTFLEET_STACK__ROLES", "influxdb,broker")
    assert load_settings().stack.role_set() == {"broker", "influxdb"}
    monkeypatch.setenv("IOTFLEET_STACK__ROLES", "broker,mqtt")
    with pytest.raises(ConfigError, match=r"IOTFLEET_STACK__ROLES: .*unknown role\(s\) mqtt"):
        load_settings()


def test_broker_host_runs_broker_agent_and_influxd_over_tls_on_listen(tmp_path: Path) -> None:
    stack = broker_host_stack(tmp_path)
    parts = {p.name: p for p in stack.parts()}
    assert list(parts) == ["mosquitto", "broker-agent", "influxd"]
    assert parts["influxd"].host == BROKER_HOST
    assert stack.influx_url() == f"https://{BROKER_HOST}:8086"
    agent = parts["broker-agent"]
    assert agent.host == BROKER_HOST and agent.env["IOTFLEET_BROKER_AGENT__HOST"] == BROKER_HOST
    assert agent.env["IOTFLEET_BROKER_AGENT__TLS_CERTFILE"].endswith("tls/server.crt")
    assert agent.env["IOTFLEET_MQTT__HOST"] == "127.0.0.1"  # it probes its own broker on loopback
    assert stack.agent_url().startswith(f"https://{BROKER_HOST}:")
    stack.write_part_configs()
    influx_conf = (tmp_path / "influxdb" / "influxdb.conf").read_text()
    assert f'bind-address = "{BROKER_HOST}:8086"' in influx_conf and "https-enabled = true" in influx_conf


def test_a_service_host_needs_the_remote_endpoints_and_says_which(tmp_path: Path) -> None:
    stack = stack_for(service_host_argv(tmp_path))
    with pytest.raises(StackError) as caught:
        stack.check_remote_endpoints()
    message = str(caught.value)
    for setting in ("IOTFLEET_MQTT__HOST", "IOTFLEET_INFLUX__URL", "IOTFLEET_BROKER_AGENT__URL"):
        assert setting in message
    assert "iotfleet secrets import" in message
    with pytest.raises(StackError, match="iotfleet secrets import"):
        stack.parts()  # never new passwords where the broker is not


def test_rules_alone_needs_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLEET_MQTT__HOST", BROKER_HOST)
    with pytest.raises(StackError, match="IOTFLEET_REGISTRY__HOST"):
        stack_for(["up", "--roles", "rules", "--state-dir", str(tmp_path)]).check_remote_endpoints()


def test_influxdb_alone_needs_nothing(tmp_path: Path) -> None:
    stack = stack_for(["up", "--roles", "influxdb", "--state-dir", str(tmp_path)])
    stack.check_remote_endpoints()
    assert part_names(stack) == ["influxd"]
    assert not (tmp_path / "secrets.json").exists()


# --- secrets -----------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_round_trip_makes_a_service_host_startable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broker_state, service_state, exported = tmp_path / "h1", tmp_path / "h2", tmp_path / "s.json"
    main_exit(
        [
            *("secrets", "export", "--state-dir", str(broker_state), "--roles", "broker,influxdb"),
            *("--listen", BROKER_HOST, "--out", str(exported)),
        ]
    )
    assert mode(exported) == 0o600
    data = json.loads(exported.read_text())
    broker = Stack(load_settings(state_dir=broker_state))
    assert data["service_passwords"] == broker.service_passwords()
    assert data["broker_agent_token"] == broker.agent_token()
    assert data["endpoints"]["mqtt_host"] == BROKER_HOST
    assert data["endpoints"]["influx_url"] == f"https://{BROKER_HOST}:8086"
    out = capsys.readouterr()
    assert data["admin_api_key"] not in out.out + out.err  # never printed unless asked

    main_exit(["secrets", "import", "--state-dir", str(service_state), str(exported)])
    err = capsys.readouterr().err
    assert f"IOTFLEET_MQTT__HOST={BROKER_HOST}" in err and "IOTFLEET_MQTT__TLS=true" in err
    assert data["admin_api_key"] not in err
    for name in ("secrets.json", "broker-agent-token", "admin-api-key", "tls/ca.key"):
        assert mode(service_state / name) == 0o600, name
    assert (service_state / "tls" / "ca.crt").read_text() == (broker_state / "tls" / "ca.crt").read_text()

    for key, value in REMOTE_ENV.items():
        monkeypatch.setenv(key, value)
    host2 = stack_for(service_host_argv(service_state))
    host2.check_remote_endpoints()
    parts = {p.name: p for p in host2.parts()}
    assert "mosquitto" not in parts and "influxd" not in parts
    registry = parts["registry"].env
    assert registry["IOTFLEET_MQTT__PASSWORD"] == data["service_passwords"]["iotfleet-registry"]
    assert registry["IOTFLEET_BROKER_AGENT__TOKEN"] == data["broker_agent_token"]
    assert registry["IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY"] == data["admin_api_key"]
    ca = str((service_state / "tls" / "ca.crt").resolve())
    assert registry["IOTFLEET_MQTT__TLS"] == "true" and registry["IOTFLEET_MQTT__CA_FILE"] == ca
    assert registry["IOTFLEET_INFLUX__CA_FILE"] == ca and registry["IOTFLEET_BROKER_AGENT__CA_FILE"] == ca
    ingest = next(p for p in parts.values() if p.kind == "ingest").env
    assert ingest["IOTFLEET_INGEST__SHARED_SUBSCRIPTION"] == "true"  # replicas across hosts
    assert ingest["IOTFLEET_INGEST__REPLICA"] != "0"

    # a different deployment's file is refused unless --force
    other = tmp_path / "other.json"
    main_exit(["secrets", "export", "--state-dir", str(tmp_path / "h3"), "--out", str(other)])
    with pytest.raises(StackError, match="--force"):
        shared_secrets.import_secrets(host2, other)
    shared_secrets.import_secrets(host2, other, force=True)
    assert json.loads((service_state / "secrets.json").read_text()) != data["service_passwords"]


def main_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0


def test_replica_names_differ_between_state_dirs(tmp_path: Path) -> None:
    a = stack_for(["up", "--roles", "ingest", "--state-dir", str(tmp_path / "a")]).replica_name()
    b = stack_for(["up", "--roles", "ingest", "--state-dir", str(tmp_path / "b")]).replica_name()
    assert a != b and len(a) <= 32
    assert a == stack_for(["up", "--roles", "ingest", "--state-dir", str(tmp_path / "a")]).replica_name()


# --- systemd -----------------------------------------------------------------------------------


def test_systemd_units_of_the_broker_host(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "units"
    main_exit(
        [
            *("systemd", "--state-dir", str(state), "--roles", "broker,influxdb"),
            *("--listen", BROKER_HOST, "--out", str(out)),
        ]
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "iotfleet-broker-agent.env",
        "iotfleet-broker-agent.service",
        "iotfleet-influxd.service",
        "iotfleet-mosquitto.service",
        "iotfleet.target",
    ]
    mosquitto = (out / "iotfleet-mosquitto.service").read_text()
    assert f"ExecStart={Path('/usr/sbin/mosquitto')}" in mosquitto or "mosquitto -c" in mosquitto.replace(
        '"', ""
    )
    assert str(state / "mosquitto" / "mosquitto.conf") in mosquitto
    assert (state / "mosquitto" / "mosquitto.conf").exists() and (
        state / "influxdb" / "influxdb.conf"
    ).exists()
    agent = (out / "iotfleet-broker-agent.service").read_text()
    for line in (
        "Restart=always",
        "Wants=network-online.target",
        "PartOf=iotfleet.target",
        "WantedBy=iotfleet.target",
        f"EnvironmentFile={(out / 'iotfleet-broker-agent.env').resolve()}",
    ):
        assert line in agent.splitlines(), line
    after = next(line for line in agent.splitlines() if line.startswith("After="))
    assert after.split("=", 1)[1].split() == [
        "network-online.target",
        "iotfleet-mosquitto.service",
        "iotfleet-influxd.service",
    ]
    assert f'Environment="IOTFLEET_BROKER_AGENT__HOST={BROKER_HOST}"' in agent
    token = (state / "broker-agent-token").read_text().strip()
    assert token not in agent  # secrets only in the 0600 EnvironmentFile
    env_file = out / "iotfleet-broker-agent.env"
    assert mode(env_file) == 0o600 and f'IOTFLEET_BROKER_AGENT__TOKEN="{token}"' in env_file.read_text()
    target = (out / "iotfleet.target").read_text()
    assert "Wants=iotfleet-mosquitto.service iotfleet-broker-agent.service iotfleet-influxd.service" in target
    assert_systemd_accepts(out)


def assert_systemd_accepts(out: Path) -> None:
    """systemd's own parser on the units (syntax, absolute executables that exist), where installed.

    Only the files are checked: nothing runs under systemd here (no systemd as PID 1)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    units = sorted(str(p) for p in out.iterdir() if p.suffix in (".service", ".target"))
    done = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_systemd_units_quote_what_systemd_would_expand() -> None:
    assert systemd_units._quote_arg("/a b/%i") == '"/a b/%%i"'
    assert systemd_units._quote_env("X", 'a"b%') == '"X=a\\"b%%"'
    assert systemd_units.is_secret("IOTFLEET_MQTT__PASSWORD") and not systemd_units.is_secret(
        "IOTFLEET_BROKER_AGENT__TLS_KEYFILE"
    )


def test_systemd_fails_fast_like_up(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="IOTFLEET_MQTT__HOST"):
        systemd_units.write_units(stack_for(service_host_argv(tmp_path)), tmp_path / "units")
    assert not (tmp_path / "units").exists()


# --- TLS of the services' clients --------------------------------------------------------------


def test_mqtt_tls_context_from_settings(tmp_path: Path) -> None:
    assert tls_clients.mqtt_context(MqttSettings()) is None
    assert tls_clients.mqtt_server_hostname(MqttSettings()) is None
    with pytest.raises(ConfigError, match="IOTFLEET_MQTT__CA_FILE"):
        tls_clients.mqtt_context(MqttSettings(tls=True, ca_file=tmp_path / "missing.pem"))
    stack = broker_host_stack(tmp_path)
    ca = stack.write_part_configs().ca_cert_path
    named = MqttSettings(host="10.0.0.9", tls=True, ca_file=ca, tls_server_name="broker.example")
    context = tls_clients.mqtt_context(named)
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname and getattr(context, "server_name", None) == "broker.example"
    assert tls_clients.mqtt_server_hostname(named) == "broker.example"
    assert tls_clients.mqtt_server_hostname(MqttSettings(host="h", tls=True)) == "h"
    assert tls_clients.http_verify("http://x", ca, "S") is True
    assert isinstance(tls_clients.http_verify("https://x", ca, "S"), ssl.SSLContext)


def test_influxdb_config_without_tls_is_plain(tmp_path: Path) -> None:
    conf = write_influxdb_config(tmp_path, host="127.0.0.1", port=8086, rpc_port=8088).read_text()
    assert "https-enabled = false" in conf and 'bind-address = "127.0.0.1:8086"' in conf


def test_systemd_units_carry_this_shells_settings_secrets_in_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, out = tmp_path / "state", tmp_path / "units"
    main_exit(["secrets", "export", "--state-dir", str(tmp_path / "h1"), "--out", str(tmp_path / "s.json")])
    main_exit(["secrets", "import", "--state-dir", str(state), str(tmp_path / "s.json")])
    for key, value in REMOTE_ENV.items():
        monkeypatch.setenv(key, value)
    database_url = "postgresql+asyncpg://registry:s3cret@db-host/registry"
    monkeypatch.setenv("IOTFLEET_REGISTRY__DATABASE_URL", database_url)
    monkeypatch.setenv("IOTFLEET_INGEST__BATCH_MAX_READINGS", "1234")
    main_exit(["systemd", "--state-dir", str(state), "--roles", "registry,ingest", "--out", str(out)])
    registry = (out / "iotfleet-registry.service").read_text()
    assert "s3cret" not in registry and "IOTFLEET_MQTT__TLS=true" in registry
    assert f'IOTFLEET_REGISTRY__DATABASE_URL="{database_url}"' in (out / "iotfleet-registry.env").read_text()
    # no local broker or InfluxDB: started after the network only
    after = next(line for line in registry.splitlines() if line.startswith("After="))
    assert after == "After=network-online.target"
    ingest = next(out.glob("iotfleet-ingest-*.service")).read_text()
    assert 'Environment="IOTFLEET_INGEST__BATCH_MAX_READINGS=1234"' in ingest
    assert not list(out.glob("iotfleet-rules*")) and not list(out.glob("iotfleet-mosquitto*"))
    assert_systemd_accepts(out)


def test_cleartext_across_hosts_is_warned_about() -> None:
    from iotfleet.stack.roles import cleartext_warnings

    split = load_settings(stack={"roles": "registry,ingest"}, mqtt={"host": "10.0.0.1"})
    warnings = cleartext_warnings(split, "http://10.0.0.1:8086", "http://10.0.0.1:9105")
    assert len(warnings) == 3 and "IOTFLEET_MQTT__TLS=true" in warnings[0]
    secured = load_settings(stack={"roles": "registry,ingest"}, mqtt={"host": "10.0.0.1", "tls": True})
    assert cleartext_warnings(secured, "https://10.0.0.1:8086", "https://10.0.0.1:9105") == []
    assert cleartext_warnings(load_settings(), "http://127.0.0.1:8086", "http://127.0.0.1:9105") == []
