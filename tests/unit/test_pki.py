"""The platform PKI (iotfleet/pki.py): CA, server certificate, device certificates, CRL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotfleet import pki
from iotfleet.errors import ConfigError
from iotfleet.settings import TlsSettings


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName)
    )


def _csr(common_name: str | None, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def test_first_call_creates_ca_server_cert_and_crl_with_private_keys(tmp_path: Path) -> None:
    made = pki.ensure_platform_pki(TlsSettings(), tmp_path, ["10.9.8.7", "broker.example"])
    folder = tmp_path / "tls"
    assert made.ca_cert_path == folder / "ca.crt" and made.ca_key_path == folder / "ca.key"
    assert made.server_cert_path == folder / "server.crt" and made.server_key_path == folder / "server.key"
    assert made.crl_path == folder / "crl.pem"
    for key in (made.ca_key_path, made.server_key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca, server = _cert(made.ca_cert_path), _cert(made.server_cert_path)
    server.verify_directly_issued_by(ca)
    assert {"localhost", "127.0.0.1", "10.9.8.7", "broker.example"} <= _sans(server)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    crl = x509.load_pem_x509_crl(made.crl_path.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_second_call_is_idempotent_and_reissues_only_when_sans_change(tmp_path: Path) -> None:
    first = pki.ensure_platform_pki(TlsSettings(), tmp_path, ["10.0.0.1"])
    ca_bytes, server_bytes = first.ca_cert_path.read_bytes(), first.server_cert_path.read_bytes()
    again = pki.ensure_platform_pki(TlsSettings(), tmp_path, ["10.0.0.1"])
    assert again == first
    assert first.server_cert_path.read_bytes() == server_bytes
    pki.ensure_platform_pki(TlsSettings(), tmp_path, ["10.0.0.2"])
    assert first.ca_cert_path.read_bytes() == ca_bytes  # the CA devices trust never changes
    renewed = _cert(first.server_cert_path)
    assert "10.0.0.2" in _sans(renewed) and "10.0.0.1" not in _sans(renewed)
    # settings' extra hosts count too
    pki.ensure_platform_pki(TlsSettings(hosts=["mqtt.example"]), tmp_path, ["10.0.0.2"])
    assert "mqtt.example" in _sans(_cert(first.server_cert_path))


def test_device_certificate_with_generated_key(tmp_path: Path) -> None:
    made = pki.ensure_platform_pki(TlsSettings(), tmp_path, [])
    issued = pki.issue_device_certificate(made, "thermo-0001", None, 30)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(_cert(made.ca_cert_path))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "thermo-0001"
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert (
        issued.fingerprint_sha256
        == cert.fingerprint(hashes.SHA256()).hex()
        == pki.fingerprint_of(issued.cert_pem)
    )
    assert issued.serial == cert.serial_number
    assert issued.key_pem is not None
    key = serialization.load_pem_private_key(issued.key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert dt.timedelta(days=29) < issued.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)


def test_device_certificate_from_csr_keeps_the_device_key(tmp_path: Path) -> None:
    made = pki.ensure_platform_pki(TlsSettings(), tmp_path, [])
    key = ec.generate_private_key(ec.SECP256R1())
    issued = pki.issue_device_certificate(made, "plug-7", _csr("plug-7", key), 10)
    assert issued.key_pem is None
    assert x509.load_pem_x509_certificate(issued.cert_pem.encode()).public_key() == key.public_key()
    # no CN in the CSR: the device id becomes the CN
    issued = pki.issue_device_certificate(made, "plug-8", _csr(None), 10)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "plug-8"


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (lambda: _csr("someone-else"), "differs from the device id"),
        (
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        (lambda: _csr("dev-1", rsa.generate_private_key(65537, 1024)), "at least 2048"),
        (lambda: _csr("dev-1", ec.generate_private_key(ec.SECP256K1())), "P-256"),
        (lambda: b"x" * (pki.MAX_CSR_BYTES + 1), "larger than"),
    ],
)
def test_bad_csr_is_refused_with_a_clear_error(tmp_path: Path, csr: object, message: str) -> None:
    made = pki.ensure_platform_pki(TlsSettings(), tmp_path, [])
    with pytest.raises(pki.PkiError, match=message):
        pki.issue_device_certificate(made, "dev-1", csr(), 10)  # type: ignore[operator]


def test_crl_lists_revoked_serials_and_is_always_newer(tmp_path: Path) -> None:
    made = pki.ensure_platform_pki(TlsSettings(), tmp_path, [])
    assert made.crl_path is not None
    a = pki.issue_device_certificate(made, "a", None, 5)
    b = pki.issue_device_certificate(made, "b", None, 5)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    before = x509.load_pem_x509_crl(made.crl_path.read_bytes()).last_update_utc
    pki.write_crl(made, [(a.serial, when)])
    first = x509.load_pem_x509_crl(made.crl_path.read_bytes())
    pki.write_crl(made, [(a.serial, when), (b.serial, when)])
    second = x509.load_pem_x509_crl(made.crl_path.read_bytes())
    assert before < first.last_update_utc < second.last_update_utc  # same second: still strictly newer
    assert second.last_update_utc <= dt.datetime.now(dt.UTC)  # never in the future (not yet valid)
    assert {e.serial_number for e in second} == {a.serial, b.serial}
    assert second.get_revoked_certificate_by_serial_number(a.serial).revocation_date_utc == when  # type: ignore[union-attr]
    assert pki.revoked_serials(made) == [(a.serial, when), (b.serial, when)]
    # a restart keeps the entries
    again = pki.ensure_platform_pki(TlsSettings(), tmp_path, [])
    assert len(pki.revoked_serials(again)) == 2


def test_bring_your_own_ca_with_key_issues_from_it(tmp_path: Path) -> None:
    own = pki.ensure_platform_pki(TlsSettings(), tmp_path / "elsewhere", [])
    assert own.ca_key_path is not None
    settings = TlsSettings(ca_cert=own.ca_cert_path, ca_key=own.ca_key_path)
    made = pki.ensure_platform_pki(settings, tmp_path / "state", [])
    assert made.ca_cert_path == own.ca_cert_path and made.ca_key_path == own.ca_key_path
    _cert(made.server_cert_path).verify_directly_issued_by(_cert(own.ca_cert_path))
    assert not (tmp_path / "state" / "tls" / "ca.crt").exists()


def test_bring_your_own_everything_without_ca_key_cannot_issue(tmp_path: Path) -> None:
    own = pki.ensure_platform_pki(TlsSettings(), tmp_path / "elsewhere", [])
    settings = TlsSettings(
        ca_cert=own.ca_cert_path, server_cert=own.server_cert_path, server_key=own.server_key_path
    )
    made = pki.ensure_platform_pki(settings, tmp_path / "state", [])
    assert made.ca_key_path is None and made.crl_path is None
    assert made.server_cert_path == own.server_cert_path
    with pytest.raises(pki.PkiError, match="no CA key"):
        pki.issue_device_certificate(made, "d", None, 1)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"ca_key": Path("/x")}, "IOTFLEET_TLS__CA_KEY"),
        ({"server_cert": Path("/x")}, "IOTFLEET_TLS__SERVER_KEY"),
        ({"server_cert": Path("/x"), "server_key": Path("/y")}, "IOTFLEET_TLS__CA_CERT"),
        ({"ca_cert": Path("/nonexistent/ca.pem"), "ca_key": Path("/x")}, "IOTFLEET_TLS__CA_CERT"),
    ],
)
def test_bad_bring_your_own_settings_fail_naming_the_setting(
    tmp_path: Path, kwargs: dict[str, Path], setting: str
) -> None:
    with pytest.raises(ConfigError, match=setting):
        pki.ensure_platform_pki(TlsSettings(**kwargs), tmp_path, [])  # type: ignore[arg-type]


def test_san_names_are_stable_and_typed() -> None:
    names = pki.san_names(["127.0.0.1", "0.0.0.0", "10.1.2.3", " "])
    assert names[1:] == ["localhost", "127.0.0.1", "10.1.2.3"]
    assert isinstance(pki._general_name("10.1.2.3"), x509.IPAddress)
    assert pki._general_name("10.1.2.3").value == ipaddress.ip_address("10.1.2.3")
