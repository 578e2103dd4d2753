"""Devices over TLS (issue #17) against the real Mosquitto, device plugin, broker agent, registry and ingest.

One world per module: a platform PKI made by iotfleet.pki, a broker whose device-facing TLS listeners
(password port, certificate port) bind the "listen" address — the host end of a veth pair into a
network namespace this module creates (a remote host), or loopback without root — and a plain listener
on loopback for the platform's services. Refusals are asserted exactly: the CONNACK reason code, or
the TLS alert with which the broker refused the handshake.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import pki
from iotfleet.mqtt_wire import encode_varint
from iotfleet.settings import TlsSettings
from iotfleet.stack import configs, probes
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess, device_rows
from tests.registry_harness import RegistryProcess

pytestmark = pytest.mark.integration

HAVE_NETNS = os.geteuid() == 0 and shutil.which("ip") is not None


@contextmanager
def _remote_host() -> Iterator[tuple[str, str] | None]:
    """A network namespace joined by a veth pair: (namespace, host-side address); removed even on failure."""
    if not HAVE_NETNS:
        yield None
        return
    tag = secrets.token_hex(3)
    ns, here, there = f"iotf-t17-{tag}", f"vt17a{tag}", f"vt17b{tag}"
    net = int(tag, 16) % 250
    local, remote = f"10.217.{net}.1", f"10.217.{net}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", ns)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{local}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{remote}/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, local
    finally:
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


@dataclass
class World:
    state: Path
    listen: str
    namespace: str | None
    platform: pki.PlatformPki
    tls: configs.TlsListeners
    broker: Broker
    influxd: Influxd
    database: str
    registry: RegistryProcess
    api: httpx.Client

    def provision(self, auth: str = "password", csr: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "thermostat", "id": f"th-{secrets.token_hex(4)}", "auth": auth}
        if csr is not None:
            body["csr"] = csr
        response = self.api.post("/api/v1/devices", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_influxd: Influxd) -> Iterator[World]:
    state = tmp_path_factory.mktemp("tls-world")
    database = f"tls_{secrets.token_hex(4)}"
    with _remote_host() as remote:
        listen = remote[1] if remote else "127.0.0.1"
        platform = pki.ensure_platform_pki(TlsSettings(), state, [listen])
        port, cert_port, wss_port = probes.free_ports(3, host=listen)
        tls = configs.TlsListeners(platform, listen, port, cert_port, wss_port)
        broker = Broker(state / "mosquitto", config={"tls": tls})
        registry: RegistryProcess | None = None
        ingest: IngestProcess | None = None
        try:
            broker.start()
            ingest = IngestProcess(broker, session_influxd, database, state / "ingest").start()
            registry = RegistryProcess(broker, state_dir=state).start()
            with registry.client() as api:
                yield World(
                    state, listen, remote[0] if remote else None, platform, tls, broker,
                    session_influxd, database, registry, api,
                )  # fmt: skip
        finally:
            if registry is not None:
                registry.stop()
            if ingest is not None and ingest.proc is not None:
                ingest.proc.terminate()
                ingest.proc.wait(timeout=15)
            broker.stop()


# --- clients ----------------------------------------------------------------------------------------


def _context(
    world: World, cert_pem: str | None = None, key_pem: str | None = None, tmp: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(world.platform.ca_cert_path))
    if cert_pem is not None and key_pem is not None and tmp is not None:
        cert_file, key_file = tmp / f"{secrets.token_hex(4)}.crt", tmp / f"{secrets.token_hex(4)}.key"
        cert_file.write_text(cert_pem)
        key_file.write_text(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _connect_v5(client_id: str, username: str | None, password: str | None) -> bytes:
    def utf8(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", 30) + b"\x00" + utf8(client_id)
    body += (utf8(username) if username is not None else b"") + (
        utf8(password) if password is not None else b""
    )
    return b"\x10" + encode_varint(len(body)) + body


def connect_outcome(  # noqa: PLR0917  (a device's connect parameters, in MQTT's order)
    host: str,
    port: int,
    ctx: ssl.SSLContext | None,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
) -> int | str:
    """The CONNACK reason code (MQTT 5), the TLS alert the broker refused with, or "closed" (no CONNACK).

    Over TLS 1.2, where the server checks the client certificate inside the handshake, so its alert
    is what wrap_socket raises. (With TLS 1.3 the client's handshake ends before the server's check,
    and the alert can be lost to a reset when the client has already sent its CONNECT.)
    """
    if ctx is not None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            sock: socket.socket = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
            sock.sendall(_connect_v5(client_id, username, password))
            data = sock.recv(16)
        except ssl.SSLError as exc:
            return str(exc.reason) if exc.reason else repr(exc)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
    if len(data) < 4 or data[0] != 0x20:
        return "closed"
    return data[3]


@dataclass
class TlsDevice:
    """A paho MQTT 5 client over TLS recording what the broker answered."""

    device: dict[str, Any]
    host: str
    port: int
    ctx: ssl.SSLContext
    password: bool = True
    transport: str = "tcp"
    client: mqtt.Client = field(init=False)
    connack: int | None = None
    disconnected_at: float | None = None
    acks: dict[int, int] = field(default_factory=dict)
    subacks: list[int] = field(default_factory=list)
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    _event: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        creds = self.device["credentials"]
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=creds["client_id"],
            protocol=mqtt.MQTTv5,
            transport=self.transport,  # type: ignore[arg-type]
            reconnect_on_failure=False,
        )
        if self.password:
            self.client.username_pw_set(creds["username"], creds["password"])
        self.client.tls_set_context(self.ctx)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _notify(self) -> None:
        with self._event:
            self._event.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = int(reason.value)
        self._notify()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.disconnected_at = time.monotonic()
        self._notify()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self.acks[mid] = int(reason.value)
        self._notify()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        self.subacks.extend(int(r.value) for r in reasons)
        self._notify()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.append(message)
        self._notify()

    def wait(self, check: Any, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._event:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.device['id']}: {what} not within {timeout} s")
                self._event.wait(left)

    def connect(self) -> TlsDevice:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")
        return self

    def publish(self, topic: str, payload: str) -> int:
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.acks, f"PUBACK on {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        before = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: len(self.subacks) > before, f"SUBACK on {topic}")
        return self.subacks[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _reading(seq: int) -> str:
    return json.dumps(
        {
            "ts": int(time.time() * 1000),
            "seq": seq,
            "temperature_c": 21.5,
            "humidity_pct": 40.0,
            "setpoint_c": 21.0,
            "mode": "heat",
        }
    )


def _device_client(world: World, device: dict[str, Any], tmp: Path) -> TlsDevice:
    creds = device["credentials"]
    if creds["auth"] == "certificate":
        key = creds["private_key"]
        assert key is not None
        ctx = _context(world, creds["certificate"], key, tmp)
        return TlsDevice(device, world.listen, world.tls.cert_port, ctx, password=False)
    return TlsDevice(device, world.listen, world.tls.port, _context(world))


def _csr(common_name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["password", "certificate", "certificate+csr"])
def test_round_trip_over_tls(world: World, mode: str, tmp_path: Path) -> None:
    """Telemetry stored by the ingest; a command from the API received, acked and tracked to succeeded."""
    if mode == "certificate+csr":
        device_id = f"th-{secrets.token_hex(4)}"
        csr, key_pem = _csr(device_id)
        response = world.api.post(
            "/api/v1/devices", json={"type": "thermostat", "id": device_id, "auth": "certificate", "csr": csr}
        )
        assert response.status_code == 201, response.text
        device = response.json()
        assert device["credentials"]["private_key"] is None  # the device kept its key
        device["credentials"]["private_key"] = key_pem
    else:
        device = world.provision(mode)
    creds = device["credentials"]
    assert device["auth"] == creds["auth"] == mode.split("+", maxsplit=1)[0]
    if creds["auth"] == "certificate":
        assert creds["password"] is None and len(creds["certificate_fingerprint"]) == 64
        cert = x509.load_pem_x509_certificate(creds["certificate"].encode())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device["id"]
    client = _device_client(world, device, tmp_path).connect()
    try:
        assert client.connack == 0
        topics = device["topics"]
        assert client.subscribe(topics["commands"]) == 1
        assert client.publish(topics["telemetry"], _reading(1)) in (0, 16)
        rows: list[dict[str, Any]] = []

        def stored() -> bool:
            rows[:] = device_rows(world.influxd, world.database, "thermostat", device["id"])
            return bool(rows)

        probes.wait_until(stored, timeout=20, what="the reading stored by the ingest")
        assert rows[0]["seq"] == 1

        sent = world.api.post(
            f"/api/v1/devices/{device['id']}/commands", json={"name": "set_mode", "args": {"mode": "cool"}}
        )
        assert sent.status_code == 202, sent.text
        command_id = sent.json()["id"]
        client.wait(lambda: client.messages, "the command")
        command = json.loads(client.messages[0].payload)
        assert command["id"] == command_id and command["name"] == "set_mode"
        ack = json.dumps({"id": command_id, "status": "succeeded", "detail": "ok"})
        assert client.publish(topics["acks"], ack) in (0, 16)

        def succeeded() -> bool:
            return world.api.get(f"/api/v1/commands/{command_id}").json()["status"] == "succeeded"

        probes.wait_until(succeeded, timeout=15, what="command succeeded")
        # Isolation as for password devices: another device's topics are refused.
        assert (
            client.publish(topics["telemetry"].replace(device["id"], "th-someone-else"), _reading(2)) == 135
        )
        assert client.subscribe(topics["commands"].replace(device["id"], "th-someone-else")) == 135
    finally:
        client.close()


def _expired_certificate(world: World, device_id: str) -> tuple[str, str]:
    assert world.platform.ca_key_path is not None
    ca_cert = x509.load_pem_x509_certificate(world.platform.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(world.platform.ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )


def test_refusals_are_exact(world: World, tmp_path: Path) -> None:
    a = world.provision("certificate")
    b = world.provision("certificate")
    pw = world.provision("password")
    a_id, b_id = a["id"], b["id"]
    a_ctx = _context(world, a["credentials"]["certificate"], a["credentials"]["private_key"], tmp_path)
    host, port, cert_port = world.listen, world.tls.port, world.tls.cert_port
    assert connect_outcome(host, cert_port, a_ctx, a_id) == 0  # the baseline: A as A

    # Certificate of device A presented as device B (client id and username B): CONNACK 135.
    assert connect_outcome(host, cert_port, a_ctx, b_id, username=b_id) == 135
    assert connect_outcome(host, cert_port, a_ctx, b_id) == 135
    # A certificate device cannot use a password instead, nor its certificate on the password port
    # (Mosquitto asks for client certificates only where require_certificate is true).
    assert connect_outcome(host, port, _context(world), a_id, username=a_id, password="x") == 135
    assert connect_outcome(host, port, a_ctx, a_id) == 135

    # A certificate from another CA (CN = a real certificate device): the handshake fails.
    foreign = trustme.CA().issue_cert(a_id)
    foreign_ctx = _context(
        world, foreign.cert_chain_pems[0].bytes().decode(), foreign.private_key_pem.bytes().decode(), tmp_path
    )
    assert connect_outcome(host, cert_port, foreign_ctx, a_id) == "TLSV1_ALERT_UNKNOWN_CA"
    # An expired certificate from our CA.
    expired_ctx = _context(world, *_expired_certificate(world, a_id), tmp=tmp_path)
    assert connect_outcome(host, cert_port, expired_ctx, a_id) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    # No certificate at all on the certificate port.
    assert connect_outcome(
        host, cert_port, _context(world), pw["id"], pw["id"], pw["credentials"]["password"]
    ) == ("SSLV3_ALERT_HANDSHAKE_FAILURE")
    # Plain text on either device port: no CONNACK, the broker drops the connection.
    assert connect_outcome(host, port, None, pw["id"], pw["id"], pw["credentials"]["password"]) == "closed"
    assert connect_outcome(host, cert_port, None, a_id) == "closed"
    # The password device over TLS: fine; with a wrong password: 135.
    assert (
        connect_outcome(host, port, _context(world), pw["id"], pw["id"], pw["credentials"]["password"]) == 0
    )
    assert connect_outcome(host, port, _context(world), pw["id"], pw["id"], "wrong") == 135

    # A rotated certificate is revoked: the CRL (reloaded by the agent's SIGHUP) fails the handshake.
    rotated = world.api.post(f"/api/v1/devices/{a_id}/rotate-credentials")
    assert rotated.status_code == 200, rotated.text
    assert connect_outcome(host, cert_port, a_ctx, a_id) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    new = rotated.json()["credentials"]
    new_ctx = _context(world, new["certificate"], new["private_key"], tmp_path)
    assert connect_outcome(host, cert_port, new_ctx, a_id) == 0
    # Deleted: revoked as well.
    b_ctx = _context(world, b["credentials"]["certificate"], b["credentials"]["private_key"], tmp_path)
    assert world.api.delete(f"/api/v1/devices/{b_id}").status_code == 204
    assert connect_outcome(host, cert_port, b_ctx, b_id) == "SSLV3_ALERT_CERTIFICATE_REVOKED"


def test_bad_csr_and_csr_without_certificate_are_422(world: World) -> None:
    csr, _ = _csr("somebody-else")
    response = world.api.post(
        "/api/v1/devices",
        json={"type": "thermostat", "id": "th-csr-mismatch", "auth": "certificate", "csr": csr},
    )
    assert response.status_code == 422 and "differs from the device id" in response.json()["detail"]
    response = world.api.post("/api/v1/devices", json={"type": "thermostat", "csr": csr})
    assert response.status_code == 422
    assert world.api.get("/api/v1/devices/th-csr-mismatch").status_code == 404


@pytest.mark.parametrize("action", ["disable", "rotate"])
def test_revocation_kicks_within_one_second(world: World, action: str, tmp_path: Path) -> None:
    device = world.provision("certificate")
    client = _device_client(world, device, tmp_path).connect()
    try:
        assert client.connack == 0
        started = time.monotonic()
        path = "disable" if action == "disable" else "rotate-credentials"
        response = world.api.post(f"/api/v1/devices/{device['id']}/{path}")
        assert response.status_code == 200, response.text
        client.wait(lambda: client.disconnected_at is not None, "kicked", timeout=5)
        assert client.disconnected_at is not None
        kicked_after = client.disconnected_at - started
        print(f"{action}: kicked {kicked_after * 1000:.0f} ms after the API call began")
        assert kicked_after < 1.0
    finally:
        client.close()
    creds = device["credentials"]
    ctx = _context(world, creds["certificate"], creds["private_key"], tmp_path)
    assert (
        connect_outcome(world.listen, world.tls.cert_port, ctx, device["id"])
        == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    )
    if action == "disable":
        # Disabling holds the certificate; enabling takes it off the CRL again.
        assert world.api.post(f"/api/v1/devices/{device['id']}/enable").status_code == 200
        assert connect_outcome(world.listen, world.tls.cert_port, ctx, device["id"]) == 0


def test_server_certificate_rotation_keeps_the_fleet_connected(world: World, tmp_path: Path) -> None:
    """Re-issue the server certificate, SIGHUP: connected devices stay; new handshakes get the new one."""
    device = world.provision("password")
    client = _device_client(world, device, tmp_path).connect()
    try:
        before = x509.load_pem_x509_certificate(world.platform.server_cert_path.read_bytes()).serial_number
        pki.ensure_platform_pki(
            TlsSettings(hosts=[f"rotated-{secrets.token_hex(2)}.example"]), world.state, [world.listen]
        )
        after = x509.load_pem_x509_certificate(world.platform.server_cert_path.read_bytes()).serial_number
        assert after != before
        assert world.broker.process is not None
        os.kill(world.broker.process.pid, signal.SIGHUP)

        def served_serial() -> int:
            with (
                socket.create_connection((world.listen, world.tls.port), timeout=5) as raw,
                _context(world).wrap_socket(raw, server_hostname=world.listen) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

        probes.wait_until(
            lambda: served_serial() == after, timeout=5, what="the new server certificate served"
        )
        assert client.publish(device["topics"]["telemetry"], _reading(7)) in (0, 16)
        assert client.disconnected_at is None  # the live TLS session was not dropped
    finally:
        client.close()


@pytest.mark.skipif(not HAVE_NETNS, reason="needs root and iproute2 (a network namespace as a remote host)")
def test_remote_host_reaches_tls_listener_but_not_plain(world: World, tmp_path: Path) -> None:
    assert world.namespace is not None
    device = world.provision("certificate")
    creds = device["credentials"]
    (tmp_path / "dev.crt").write_text(creds["certificate"])
    (tmp_path / "dev.key").write_text(creds["private_key"])
    netns = ["ip", "netns", "exec", world.namespace]
    pub = [
        "mosquitto_pub", "-V", "mqttv5", "-q", "1", "-h", world.listen, "-i", device["id"],
        "-t", device["topics"]["telemetry"], "-m", _reading(3),
    ]  # fmt: skip
    tls = [
        "--cafile",
        str(world.platform.ca_cert_path),
        "--cert",
        str(tmp_path / "dev.crt"),
        "--key",
        str(tmp_path / "dev.key"),
    ]
    done = subprocess.run(
        [*netns, *pub, "-p", str(world.tls.cert_port), *tls],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    probes.wait_until(
        lambda: bool(device_rows(world.influxd, world.database, "thermostat", device["id"])),
        timeout=20,
        what="the remote device's reading stored",
    )
    # The plain listener is on loopback only: from the remote host neither its port on the listen
    # address nor "127.0.0.1" (the namespace's own loopback) reaches it.
    for host in (world.listen, "127.0.0.1"):
        plain = [*netns, *[a if a != world.listen else host for a in pub], "-p", str(world.broker.port)]
        done = subprocess.run(plain, capture_output=True, text=True, timeout=20, check=False)
        assert done.returncode != 0 and "refused" in (done.stderr + done.stdout).lower(), done.stderr


def test_password_device_over_secure_websockets(world: World) -> None:
    device = world.provision("password")
    client = TlsDevice(
        device, world.listen, world.tls.websockets_port, _context(world), transport="websockets"
    )
    client.connect()
    try:
        assert client.connack == 0
        assert client.publish(device["topics"]["telemetry"], _reading(1)) in (0, 16)
        probes.wait_until(
            lambda: bool(device_rows(world.influxd, world.database, "thermostat", device["id"])),
            timeout=20,
            what="the reading sent over wss stored",
        )
    finally:
        client.close()


def test_concurrent_revocations_both_reach_the_crl(world: World, tmp_path: Path) -> None:
    """Two devices disabled at once: neither CRL write may drop the other's certificate."""
    devices = [world.provision("certificate") for _ in range(4)]

    answers: dict[str, str] = {}

    def disable(device: dict[str, Any]) -> None:
        with world.registry.client() as api:
            response = api.post(f"/api/v1/devices/{device['id']}/disable")
            answers[device["id"]] = f"{response.status_code} {response.text[:300]}"

    threads = [threading.Thread(target=disable, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(answer.startswith("200 ") for answer in answers.values()) and len(answers) == 4, answers
    for device in devices:
        creds = device["credentials"]
        ctx = _context(world, creds["certificate"], creds["private_key"], tmp_path)
        outcome = connect_outcome(world.listen, world.tls.cert_port, ctx, device["id"])
        assert outcome == "SSLV3_ALERT_CERTIFICATE_REVOKED", (device["id"], outcome)
