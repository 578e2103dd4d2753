"""Settings of every service: pydantic-settings, env prefix ``IOTFLEET_``, nested with ``__``.

``load_settings()`` is called in each ``main()`` and the result passed down; no
module reads the environment at import time. Example:
``IOTFLEET_MQTT__PORT=1884 IOTFLEET_INFLUX__URL=http://127.0.0.1:8087 iotfleet up``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotfleet.errors import ConfigError

ENV_PREFIX = "IOTFLEET_"
ENV_NESTED = "__"

Port = Annotated[int, Field(ge=1, le=65535)]

ROLES = ("broker", "influxdb", "registry", "ingest", "rules")
"""What one host may run (``iotfleet up --roles``): broker = mosquitto + the broker agent,
influxdb = influxd, registry = the API, ingest = one ingest per device type, rules = the rules engine."""


class MqttSettings(BaseModel):
    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(
        86_400, ge=0, description="How long the broker keeps a service's session (and its backlog) offline"
    )
    # TLS for the platform's own MQTT clients when the broker is on another host (docs/deployment.md):
    # the services then use the broker's TLS listener (IOTFLEET_TLS__PORT on IOTFLEET_STACK__LISTEN).
    tls: bool = Field(False, description="Connect to the broker over TLS (verifying its certificate)")
    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) the broker's certificate must chain to; default: system CAs"
    )
    tls_server_name: str | None = Field(
        None, description="Name checked against the broker's certificate (and sent as SNI); default: host"
    )


class InfluxSettings(BaseModel):
    url: str = "http://127.0.0.1:8086"
    database: str = Field("iotfleet", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    retention_policy: str = Field("raw", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    retention: str = Field(
        "30d", pattern=r"^(INF|\d+[mhdw])$", description="Duration of the retention policy"
    )
    username: str | None = Field(None, description="InfluxDB 1.x basic auth")
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="InfluxDB 2.x/3.x token (v1 compatibility API)")
    timeout_s: float = Field(10.0, gt=0)
    ca_file: Path | None = Field(
        None,
        description="CA certificate (PEM) an https:// url's certificate must chain to; default: system CAs",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class RegistrySettings(BaseModel):
    host: str = "127.0.0.1"
    port: Port = 8000
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default: SQLite file registry.db in the state dir"
    )
    bootstrap_admin_key: SecretStr | None = Field(
        None, description="An admin API key ensured at start (the stack passes the one it created)"
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Largest request body (413 beyond): a 10,000-device bulk with names and tags is ~2 MB",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite only: FULL fsyncs every commit (survives an OS crash); NORMAL (WAL) may roll the"
        " last commits back after an OS crash or power loss, for ~5-10 ms less per API write",
    )

    presence_history_days: int = Field(
        30, ge=1, le=3650, description="Presence transitions older than this are deleted (checked hourly)"
    )
    # HTTPS (API + dashboard) for operators beyond loopback. The plain listener above stays for
    # the platform's own clients on loopback (rules engine, simulator, the CLI); `iotfleet up
    # --listen ADDRESS` sets https_host to ADDRESS and the certificate to the platform's.
    https_host: str | None = Field(
        None,
        description="Address of the HTTPS listener (API + dashboard); unset: no HTTPS listener"
        " (`iotfleet up --listen ADDRESS` sets it)",
    )
    https_port: Port = Field(8443, description="Port of the HTTPS listener")
    tls_certfile: Path | None = Field(
        None,
        description="Server certificate chain (PEM) of the HTTPS listener; the stack's: <state_dir>/tls/",
    )
    tls_keyfile: Path | None = Field(None, description="Its private key (PEM)")
    # Replicas (device_registry/lease.py): every replica serves the API; the once-only work
    # (command tracker, job rollout, shadow, presence, reconcile watcher, notification sender)
    # runs in the one holding the DB lease.
    replica: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=200,
        description="This replica's name in the lease table (default: <hostname>-<pid>, unique per process)",
    )
    lease_ttl_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="How long the lease holds without renewal (renewed every third of it); a standby takes"
        " over within about this after the holder dies. Default: 5 s on PostgreSQL, 30 s on SQLite",
    )

    def lease_ttl(self, database_url: str) -> float:
        """The lease TTL in seconds: the setting, else 5 s on PostgreSQL, 30 s on SQLite (one host:
        a restarted replica reclaims a dead holder's lease at once, see lease.py)."""
        if self.lease_ttl_s is not None:
            return self.lease_ttl_s
        return 5.0 if database_url.startswith("postgresql") else 30.0


class JournalSettings(BaseModel):
    """The ingest's local write-ahead journal (telemetry_ingest/journal.py)."""

    enabled: bool = Field(
        True,
        description="Ack a reading once it is fsync'd in the ingest's local journal (not once InfluxDB has it),"
        " so neither an InfluxDB outage nor a slow InfluxDB leaves a backlog in the broker, whose"
        " persistence is a periodic snapshot",
    )
    directory: Path | None = Field(
        None, description="Default: <state_dir>/ingest-journal/<client id> (one per replica, locked)"
    )
    max_bytes: int = Field(
        2 * 1024**3,
        ge=64 * 1024**2,
        description="Disk bound of the journal; when full the ingest stops acking (backpressure into the broker)",
    )
    drain_read_bytes: int = Field(
        1024**2,
        ge=64 * 1024,
        le=64 * 1024**2,
        description="Bytes of journal per InfluxDB write (memory bound)",
    )


class IngestSettings(BaseModel):
    device_type: str | None = None
    batch_max_readings: int = Field(5_000, ge=1, le=100_000)
    batch_max_age_ms: int = Field(200, ge=1, le=60_000)
    # The telemetry admission limits (iotfleet/admission.py). Every consumer of telemetry reads
    # these same settings (the ingest, the rules engine, the registry's presence follower), so
    # what the ingest refuses no other service acts on; the broker's message size limit is
    # derived from max_payload_bytes (iotfleet/stack/configs.py).
    max_payload_bytes: int = Field(
        256 * 1024, ge=64, le=64 * 1024 * 1024, description="Larger telemetry payloads are refused unparsed"
    )
    max_depth: int = Field(8, ge=2, le=64, description="Deeper JSON nesting is refused (readings are flat)")
    max_readings_per_payload: int = Field(
        1_000, ge=1, le=100_000, description="Longer arrays of readings are refused before validation"
    )
    max_future_s: int = Field(300, ge=0, description="Readings further in the future are rejected")
    max_past_s: int = Field(30 * 86_400, ge=0, description="Readings older than this are rejected")
    buffer_max_readings: int = Field(200_000, ge=1_000, description="Bound on readings held unacked")
    receive_maximum: int = Field(
        10_000, ge=1, le=65_535, description="MQTT 5 receive maximum: unacked messages in flight"
    )
    extra_tags: dict[str, str] = Field(default_factory=dict, description="Tags added to every point")
    replica: str = Field(
        "0",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Replica name: the MQTT client id is ingest-{type}-{replica}; keep it stable across"
        " restarts (the persistent session and its unacked messages belong to it), unique per replica",
    )
    client_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="MQTT client id, overriding ingest-{type}-{replica} (same stability rules)",
    )
    transport: Literal["fast", "paho"] = Field(
        "fast", description="MQTT receive path: the asyncio one of telemetry_ingest or paho-mqtt's"
    )
    shared_subscription: bool = Field(
        True,
        description="Subscribe via $share/ingest-{type}/ so replicas split the load. Mosquitto 2.0 does not"
        " restore shared subscriptions after a broker restart (non-shared ones survive): a single-replica"
        " deployment that must not depend on devices resending after PUBACK 0x10 can turn this off",
    )
    batch_linger_ms: int = Field(
        5,
        ge=0,
        le=60_000,
        description="When no InfluxDB write is in flight, close a batch after this long instead of"
        " batch_max_age_ms (0: size and age only)",
    )
    write_concurrency: int = Field(2, ge=1, le=16, description="InfluxDB writes in flight at once")
    deadletter_payload_chars: int = Field(
        1024, ge=0, le=1_000_000, description="Characters of the original payload kept in a dead letter"
    )
    deadletter_max_errors: int = Field(
        20, ge=1, le=10_000, description="Errors listed in a dead letter; the rest is counted (errors_cut)"
    )
    drain_timeout_s: float = Field(
        10.0, gt=0, description="On stop, how long to wait for InfluxDB to take what was received"
    )
    journal: JournalSettings = JournalSettings()


def _default_replica() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:48] or "engine"


class RulesSettings(BaseModel):
    reload_poll_s: float = Field(
        30.0, gt=0, description="Re-fetch rules and devices this often even without a change notice"
    )
    client_id: str = Field(
        "iotfleet-rules",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="MQTT client id; stable across restarts (the persistent session queues readings)",
    )
    api_key: SecretStr | None = Field(
        None, description="Registry API key (admin); default: <state_dir>/admin-api-key"
    )
    rules_file: Path | None = Field(
        None, description="Load rules from this JSON file instead of the registry (standalone, benchmarks)"
    )
    state_file: Path | None = Field(
        None, description="Firing state store (SQLite); default <state_dir>/rules-engine.sqlite"
    )
    command_ttl_s: int = Field(300, ge=1, le=30 * 86_400, description="Default TTL of commands rules send")
    tick_s: float = Field(1.0, gt=0, le=60, description="How often absence/presence deadlines are checked")
    receive_maximum: int = Field(1_000, ge=1, le=65_535, description="MQTT 5 receive maximum")
    tracker_sweep_s: float = Field(
        1.0, gt=0, le=60, description="Registry: how often queued/sent commands past their TTL are expired"
    )
    # Several engines (docs/rules.md, "Running several engines"); 0 = one engine evaluates everything.
    partitions: int = Field(
        0,
        ge=0,
        le=4096,
        description="Partitions per device type (crc32(device id) % N), each owned by one engine at a"
        " time through a lease in the shared store; 0 = one unpartitioned engine (the default)",
    )
    shared_store_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL of the leases and the partitions' firing state (required when"
        " partitions > 0), e.g. postgresql://user:pw@db:5432/iotfleet",
    )
    replica: str = Field(
        default_factory=_default_replica,
        pattern=r"^[A-Za-z0-9_.-]{1,48}$",
        description="This engine's name among several (lease owner; its MQTT client id is"
        " <client_id>-<replica>); default: the host name. Stable across restarts",
    )
    lease_ttl_s: float = Field(
        5.0, ge=0.5, le=300, description="A partition lease not renewed for this long is taken over"
    )
    device_types: list[str] | None = Field(
        None, description="Device types this engine evaluates (default: all); partitioned mode only"
    )
    handover_buffer_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Readings of partitions owned by other engines are kept this long, to rebuild"
        " windows on a takeover (must exceed lease_ttl_s)",
    )
    handover_buffer_max: int = Field(
        100_000, ge=0, le=10_000_000, description="At most this many buffered messages (oldest dropped)"
    )
    handover_buffer_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        le=64 * 1024 * 1024 * 1024,
        description="At most this many payload bytes buffered (oldest dropped): devices choose their"
        " payloads' size, so a count alone does not bound the memory",
    )

    @model_validator(mode="after")
    def _partitioned_needs_a_store(self) -> RulesSettings:
        if self.partitions > 0 and self.shared_store_url is None:
            raise ValueError(
                "IOTFLEET_RULES__SHARED_STORE_URL is required when IOTFLEET_RULES__PARTITIONS > 0"
            )
        if self.partitions > 0 and self.handover_buffer_s <= self.lease_ttl_s:
            raise ValueError(
                "IOTFLEET_RULES__HANDOVER_BUFFER_S must exceed IOTFLEET_RULES__LEASE_TTL_S (the readings"
                " of a dead engine's partitions arrive while its lease runs out)"
            )
        if self.device_types is not None:
            from iotfleet.catalogue import DEVICE_TYPES

            unknown = sorted(set(self.device_types) - set(DEVICE_TYPES))
            if unknown:
                raise ValueError(f"IOTFLEET_RULES__DEVICE_TYPES: unknown device types {unknown}")
        return self


class JobsSettings(BaseModel):
    """The registry's job rollout (``device_registry.job_runner``): one task releasing executions in batches."""

    tick_s: float = Field(0.5, gt=0, le=60, description="How often active jobs are stepped when idle")
    release_batch: int = Field(
        1_000,
        ge=1,
        le=10_000,
        description="Executions released (commands recorded + published) per DB transaction",
    )
    max_targets: int = Field(
        100_000, ge=1, le=1_000_000, description="Devices one job may target (larger targets: 422)"
    )
    default_deadline_s: int = Field(
        86_400,
        ge=60,
        le=30 * 86_400,
        description="A job's deadline when the request names none (after its start)",
    )


class NotificationsSettings(BaseModel):
    """Alert notifications (``device_registry.notifications``): webhooks and e-mail, from an outbox."""

    send: bool = Field(
        True, description="False: deliveries are recorded in the outbox but this registry sends none"
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="How often due deliveries are looked for when idle")
    concurrency: int = Field(8, ge=1, le=256, description="Deliveries sent at once")
    timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one webhook call or SMTP session")
    retry_base_s: float = Field(
        10.0, gt=0, le=3600, description="First retry after this; doubles per attempt (full jitter)"
    )
    retry_max_s: float = Field(1800.0, gt=0, le=86_400, description="Longest wait between two attempts")
    retry_for_s: int = Field(
        86_400, ge=60, le=30 * 86_400, description="A delivery is retried this long, then marked failed"
    )
    attempts_kept: int = Field(20, ge=1, le=1000, description="Attempts kept per delivery (the newest)")
    smtp_host: str | None = Field(None, description="SMTP server for e-mail channels (none: refused)")
    smtp_port: Port = 25
    smtp_starttls: bool = Field(False, description="Upgrade the SMTP session with STARTTLS")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    mail_from: str = Field("iotfleet@localhost", max_length=254, description="From address of alert e-mails")


class BrokerAgentSettings(BaseModel):
    """The broker-side agent that owns the broker's device password and ACL files.

    The registry (the client) and the agent (the server) read the same section: the
    registry reaches the agent at ``url`` (default ``http://host:port``) with ``token``.
    """

    host: str = "127.0.0.1"
    port: Port = 8099
    url: str | None = Field(
        None, description="Where the registry reaches the agent; default http://host:port"
    )
    token: SecretStr | None = Field(
        None, description="Bearer token the registry presents to the agent (required by both)"
    )
    devices_file: Path | None = Field(
        None,
        description="The device file the broker's device plugin reads; default <state_dir>/mosquitto/devices",
    )
    broker_pid_file: Path | None = Field(
        None,
        description="The broker's pid_file (the agent SIGHUPs that pid); default <state_dir>/mosquitto/mosquitto.pid",
    )
    batch_window_ms: int = Field(
        5, ge=0, le=1_000, description="Changes arriving within this window share one file write and reload"
    )
    reload_timeout_s: float = Field(
        10.0, gt=0, description="How long the agent waits for the broker to confirm a reload"
    )
    timeout_s: float = Field(60.0, gt=0, description="Registry side: timeout of one call to the agent")
    poll_s: float = Field(
        5.0,
        gt=0,
        description="Registry side: how often it checks the agent (a restarted agent is reconciled)",
    )
    ca_file: Path | None = Field(
        None, description="Registry side: CA certificate (PEM) of an https:// agent url; default: system CAs"
    )
    tls_certfile: Path | None = Field(
        None, description="Agent side: serve HTTPS with this certificate chain (PEM); unset: plain HTTP"
    )
    tls_keyfile: Path | None = Field(None, description="Agent side: the private key of tls_certfile (PEM)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    def base_url(self) -> str:
        scheme = "https" if self.tls_certfile is not None else "http"
        return self.url or f"{scheme}://{self.host}:{self.port}"


class HealthSettings(BaseModel):
    """Where a background service serves /healthz and /metrics (0: no HTTP endpoint)."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)


class StackSettings(BaseModel):
    """Used by ``iotfleet up``: how the local stack's processes are started."""

    mosquitto_bin: str = "mosquitto"
    influxd_bin: str = "influxd"
    influx_rpc_port: Port = 8088
    service_port_base: int = Field(
        9100,
        ge=1024,
        le=65000,
        description="Health/metrics ports of rules (base), ingest (base+1, …) and the broker agent (next)",
    )
    ready_timeout_s: float = Field(60.0, gt=0)
    broker_autosave_changes: int = Field(
        1_000,
        ge=1,
        description="Mosquitto snapshots its database every this many queued messages, retained messages and"
        " subscription changes (autosave_on_changes): a broker kill -9 loses at most this many minus one;"
        " each snapshot rewrites the whole database (sizing: mosquitto/README.md)",
    )
    device_rate_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="Bytes a second one device may publish (0: no limit); beyond its burst the broker's device"
        " plugin refuses its publishes (PUBACK 135): one flooding device cannot fill the broker or delay others",
    )
    device_burst_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description="Bytes one device may publish at once above its rate (e.g. a backlog after a reconnect)",
    )
    listen: str = Field(
        "127.0.0.1",
        description="Address of the broker's device-facing TLS listeners (iotfleet up --listen); the plain"
        " MQTT listener stays on loopback for the platform's own services",
    )
    roles: str = Field(
        "all",
        description="What this host runs (iotfleet up --roles): a comma-separated subset of broker, influxdb,"
        " registry, ingest, rules, or all (docs/deployment.md)",
    )

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in (*ROLES, "all")]
        if unknown or not names:
            raise ValueError(
                f"unknown role(s) {', '.join(unknown) or '(none)'}: use {', '.join(ROLES)} or all"
            )
        if "all" in names:
            return "all"
        return ",".join(role for role in ROLES if role in names)

    def role_set(self) -> frozenset[str]:
        """The roles this host runs (all of them by default)."""
        return frozenset(ROLES) if self.roles == "all" else frozenset(self.roles.split(","))


class TlsSettings(BaseModel):
    """The platform PKI (iotfleet/pki.py) and the broker's device-facing TLS listeners.

    By default ``iotfleet up`` makes a private CA and a server certificate under
    ``<state_dir>/tls/``; set ``ca_cert`` (+ ``ca_key``) and/or ``server_cert`` + ``server_key``
    to bring your own.
    """

    port: Port = Field(8883, description="MQTT over TLS for password devices (no client certificate asked)")
    cert_port: Port = Field(
        8884,
        description="MQTT over TLS for certificate devices (client certificate required): Mosquitto 2.0.11 asks"
        " for a client certificate only on a listener with require_certificate true, so one port cannot serve"
        " both auth modes",
    )
    websockets_port: int = Field(
        0, ge=0, le=65535, description="MQTT over secure WebSockets for password clients (0: off)"
    )
    min_version: Literal["tlsv1.2", "tlsv1.3"] = Field("tlsv1.2", description="Oldest TLS version accepted")
    hosts: list[str] = Field(
        default_factory=list,
        description="Extra names/addresses in the server certificate's SANs (the host name, localhost,"
        " 127.0.0.1 and the --listen address are always in)",
    )
    ca_cert: Path | None = Field(None, description="Bring-your-own CA certificate (PEM)")
    ca_key: Path | None = Field(
        None, description="Its private key; without it the platform cannot issue device certificates"
    )
    server_cert: Path | None = Field(None, description="Bring-your-own server certificate chain (PEM)")
    server_key: Path | None = Field(None, description="Its private key (PEM)")
    crl: Path | None = Field(None, description="Bring-your-own CRL (PEM) when the platform has no CA key")
    ca_days: int = Field(3650, ge=1, le=36500, description="Validity of a generated CA")
    server_cert_days: int = Field(
        397, ge=1, le=3650, description="Validity of a generated server certificate"
    )
    device_cert_days: int = Field(365, ge=1, le=36500, description="Validity of an issued device certificate")
    crl_days: int = Field(
        365,
        ge=1,
        le=3650,
        description="nextUpdate of the generated CRL (refreshed at start and on revocation)",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="ignore", validate_default=True
    )

    state_dir: Path = Field(Path(".iotfleet"), description="Where the stack keeps configs, data and logs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    registry: RegistrySettings = RegistrySettings()
    ingest: IngestSettings = IngestSettings()
    rules: RulesSettings = RulesSettings()
    jobs: JobsSettings = JobsSettings()
    notifications: NotificationsSettings = NotificationsSettings()
    health: HealthSettings = HealthSettings()
    broker_agent: BrokerAgentSettings = BrokerAgentSettings()
    stack: StackSettings = StackSettings()
    tls: TlsSettings = TlsSettings()

    def agent_files(self) -> tuple[Path, Path]:
        """The broker agent's device file and the broker's pid file (defaults under the state dir)."""
        folder = self.state_dir / "mosquitto"
        agent = self.broker_agent
        return (agent.devices_file or folder / "devices", agent.broker_pid_file or folder / "mosquitto.pid")

    def registry_database_url(self) -> str:
        if self.registry.database_url:
            return self.registry.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'registry.db').resolve()}"


def env_name(loc: tuple[int | str, ...]) -> str:
    """The env var that sets the setting at ``loc``: ('mqtt', 'port') → IOTFLEET_MQTT__PORT."""
    return ENV_PREFIX + ENV_NESTED.join(str(part).upper() for part in loc)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (plus overrides); raise ConfigError naming each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{env_name(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
