"""The platform's PKI: a private CA, the server certificate, device certificates and the CRL.

Public API (used by ``iotfleet up``, the registry and the simulator):

- ``ensure_platform_pki(tls_settings, state_dir, hosts) -> PlatformPki`` — idempotent. On the
  first call it creates a private CA (``ca.crt``, ``ca.key``) and one server certificate shared
  by the broker and the API (``server.crt``, ``server.key``) under ``<state_dir>/tls/``, plus an
  empty CRL (``crl.pem``); keys are written mode 0600. The server certificate's SANs are the host
  name, ``localhost``, ``127.0.0.1``, the ``hosts`` given and ``IOTFLEET_TLS__HOSTS``; it is
  re-issued when the SANs asked for change, when it expires within 30 days or when it was not
  signed by the current CA. Bring your own through settings (``IOTFLEET_TLS__CA_CERT`` /
  ``__CA_KEY`` / ``__SERVER_CERT`` / ``__SERVER_KEY`` / ``__CRL``): given files are used as they
  are, never rewritten. Without a CA key the platform cannot issue device certificates (PkiError).
- ``platform_pki_paths(tls_settings, state_dir) -> PlatformPki`` — the same paths without creating
  or checking anything (for ``iotfleet status`` and the registry, which must not re-issue).
- ``PlatformPki`` — frozen dataclass: ``ca_cert_path``, ``ca_key_path`` (None for a BYO CA
  without its key), ``server_cert_path``, ``server_key_path``, ``crl_path`` (None when there is
  neither a CA key nor a BYO CRL).
- ``issue_device_certificate(pki, device_id, csr_pem, valid_days) -> IssuedCertificate`` — an
  ECDSA P-256 client certificate (~1 ms) with CN = device id, EKU clientAuth. With a CSR the
  device keeps its key (``key_pem`` None); without, the platform generates the key and returns it
  once. A CSR whose subject CN differs from the device id is REFUSED (PkiError naming both): a
  device that asked for another identity must learn it did not get it. A CSR without a CN is fine.
- ``IssuedCertificate`` — ``cert_pem``, ``key_pem``, ``fingerprint_sha256`` (hex of the DER's
  SHA-256: what the broker pins), ``serial``, ``not_after`` (aware UTC).
- ``write_crl(pki, revoked)`` — rewrite ``crl.pem`` (atomic) listing ``(serial, revoked_at)``
  pairs. Its thisUpdate is always later than the previous CRL's and never in the future (backdated
  by up to an hour): Mosquitto's SIGHUP ADDS the file's CRL to its OpenSSL store, and OpenSSL uses
  the newest valid CRL of a CA only if its thisUpdate is strictly later (one-second resolution).
- ``fingerprint_of(cert_pem)`` — the SHA-256 fingerprint of a PEM certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotfleet.errors import ConfigError, IotfleetError
from iotfleet.settings import TlsSettings

TLS_DIR = "tls"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CRL = "crl.pem"
CA_COMMON_NAME = "iotfleet platform CA"
RENEW_BEFORE = dt.timedelta(days=30)
BACKDATE = dt.timedelta(minutes=5)  # tolerate a device clock a little behind
MAX_CSR_BYTES = 16 * 1024
CRL_BACKDATE = dt.timedelta(hours=1)
_CRL_LOCK = threading.Lock()  # read the previous CRL's thisUpdate and write the next one as one step


class PkiError(IotfleetError, ValueError):
    """A certificate cannot be issued (bad CSR, no CA key) or the PKI files are unusable."""


@dataclass(frozen=True)
class PlatformPki:
    ca_cert_path: Path
    ca_key_path: Path | None
    server_cert_path: Path
    server_key_path: Path
    crl_path: Path | None
    crl_days: int = 365

    @property
    def can_issue(self) -> bool:
        return self.ca_key_path is not None


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: str
    key_pem: str | None
    fingerprint_sha256: str
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Temp file + fsync + rename: a reader (the broker on SIGHUP) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # unique: writers in several threads
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _read_cert(path: Path, setting: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot read a PEM certificate from {path}: {exc}") from None


def _read_key(path: Path, setting: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{setting}: cannot read an unencrypted PEM private key from {path}: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{setting}: {path} holds a {type(key).__name__}; an EC or RSA key is needed")
    return key


def san_names(hosts: Sequence[str]) -> list[str]:
    """The server certificate's SANs, in a stable order: host name, localhost, 127.0.0.1, then hosts."""
    names: list[str] = []
    for raw in (socket.gethostname(), "localhost", "127.0.0.1", *hosts):
        name = raw.strip()
        if name and name not in names and name not in ("0.0.0.0", "::"):
            names.append(name)
    return names


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cert_sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName)
    )


def _make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_builder(
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    days: int,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _server_cert_current(
    cert_path: Path, key_path: Path, ca_cert: x509.Certificate, sans: Sequence[str]
) -> bool:
    if not cert_path.exists() or not key_path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return (
        _cert_sans(cert) == set(sans)
        and cert.not_valid_after_utc - _now() > RENEW_BEFORE
        and _signed_by(cert, ca_cert)
    )


def platform_pki_paths(tls_settings: TlsSettings, state_dir: Path) -> PlatformPki:
    """Where the PKI files are (or will be) for these settings; nothing is read or written."""
    tls, folder = tls_settings, state_dir / TLS_DIR
    ca_cert = tls.ca_cert or folder / CA_CERT
    ca_key = tls.ca_key if tls.ca_cert is not None else folder / CA_KEY
    server_cert = tls.server_cert or folder / SERVER_CERT
    server_key = tls.server_key or folder / SERVER_KEY
    crl = tls.crl or (folder / CRL if ca_key is not None else None)
    return PlatformPki(ca_cert, ca_key, server_cert, server_key, crl, tls.crl_days)


def ensure_platform_pki(tls_settings: TlsSettings, state_dir: Path, hosts: Sequence[str]) -> PlatformPki:
    """Make (or check) the CA, server certificate and CRL; see the module docstring."""
    tls = tls_settings
    folder = state_dir / TLS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if tls.ca_key is not None and tls.ca_cert is None:
        raise ConfigError("IOTFLEET_TLS__CA_KEY is set without IOTFLEET_TLS__CA_CERT")
    if (tls.server_cert is None) != (tls.server_key is None):
        raise ConfigError(
            "IOTFLEET_TLS__SERVER_CERT and IOTFLEET_TLS__SERVER_KEY go together: set both or neither"
        )
    if tls.server_cert is not None and tls.ca_cert is None:
        raise ConfigError(
            "IOTFLEET_TLS__SERVER_CERT is set without IOTFLEET_TLS__CA_CERT (the CA devices must trust)"
        )

    # The CA: bring-your-own, or ours (made once).
    ca_key_path: Path | None
    if tls.ca_cert is not None:
        ca_cert_path = tls.ca_cert
        ca_cert = _read_cert(ca_cert_path, "IOTFLEET_TLS__CA_CERT")
        ca_key_path = tls.ca_key
        if ca_key_path is not None:
            ca_key = _read_key(ca_key_path, "IOTFLEET_TLS__CA_KEY")
            if ca_key.public_key() != ca_cert.public_key():
                raise ConfigError("IOTFLEET_TLS__CA_KEY does not belong to IOTFLEET_TLS__CA_CERT")
        elif tls.server_cert is None:
            raise ConfigError(
                "IOTFLEET_TLS__CA_CERT without IOTFLEET_TLS__CA_KEY needs IOTFLEET_TLS__SERVER_CERT and"
                " IOTFLEET_TLS__SERVER_KEY (the platform cannot sign its own server certificate)"
            )
    else:
        ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
        if not (ca_cert_path.exists() and ca_key_path.exists()):
            ca_cert, new_ca_key = _make_ca(tls.ca_days)
            _write(ca_key_path, _key_pem(new_ca_key), 0o600)
            _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        ca_cert = _read_cert(ca_cert_path, "state dir tls/ca.crt")

    # The server certificate: bring-your-own, or ours (re-issued when out of date).
    if tls.server_cert is not None and tls.server_key is not None:
        server_cert_path, server_key_path = tls.server_cert, tls.server_key
        _read_cert(server_cert_path, "IOTFLEET_TLS__SERVER_CERT")
        _read_key(server_key_path, "IOTFLEET_TLS__SERVER_KEY")
    else:
        assert ca_key_path is not None  # checked above
        server_cert_path, server_key_path = folder / SERVER_CERT, folder / SERVER_KEY
        sans = san_names([*hosts, *tls.hosts])
        if not _server_cert_current(server_cert_path, server_key_path, ca_cert, sans):
            issue_server_certificate(
                ca_cert_path=ca_cert_path,
                ca_key_path=ca_key_path,
                cert_path=server_cert_path,
                key_path=server_key_path,
                sans=sans,
                tls=tls,
            )

    # The CRL: ours when we hold the CA key (the broker requires one to check client certificates).
    crl_path: Path | None = tls.crl
    pki = PlatformPki(ca_cert_path, ca_key_path, server_cert_path, server_key_path, crl_path, tls.crl_days)
    if crl_path is None and ca_key_path is not None:
        pki = PlatformPki(
            ca_cert_path, ca_key_path, server_cert_path, server_key_path, folder / CRL, tls.crl_days
        )
        _refresh_crl(pki)
    return pki


def issue_server_certificate(
    *,
    ca_cert_path: Path,
    ca_key_path: Path,
    cert_path: Path,
    key_path: Path,
    sans: Sequence[str],
    tls: TlsSettings,
) -> None:
    """(Re-)issue the server certificate with a fresh key (key first, then the cert: see rotation docs)."""
    ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])])
    cert = (
        _leaf_builder(
            ca_cert, subject, key.public_key(), tls.server_cert_days, ExtendedKeyUsageOID.SERVER_AUTH
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # Both files are replaced by rename; a broker reloading between the two renames would see a
    # mismatched pair and keep its old context (Mosquitto logs the error), so SIGHUP after both.
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _file_stamp(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    return _load_ca_cached(cert_path, key_path, _file_stamp(cert_path), _file_stamp(key_path))


@lru_cache(maxsize=4)
def _load_ca_cached(
    cert_path: Path, key_path: Path, _cert_stamp: int, _key_stamp: int
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    # Cached per file version: the simulator issues 10,000 certificates in a row.
    return _read_cert(cert_path, "CA certificate"), _read_key(key_path, "CA key")


def _csr_public_key(csr_pem: bytes, device_id: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"the CSR is not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not verify (it was not signed by its own key)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and names[0].value != device_id:
        raise PkiError(
            f"the CSR's subject CN {names[0].value!r} differs from the device id {device_id!r}:"
            " the certificate's CN is the device's identity (leave the CN out or set it to the device id)"
        )
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise PkiError(f"the CSR's EC key is on {key.curve.name}; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"the CSR's RSA key has {key.key_size} bits; at least 2048 are needed")
        return key
    raise PkiError(f"the CSR's key type {type(key).__name__} is not supported; use ECDSA P-256 or RSA")


def issue_device_certificate(
    pki: PlatformPki, device_id: str, csr_pem: bytes | None, valid_days: int
) -> IssuedCertificate:
    """A client certificate for ``device_id`` (CN), from its CSR or with a key generated here."""
    if pki.ca_key_path is None:
        raise PkiError(
            "the platform has no CA key (IOTFLEET_TLS__CA_KEY unset with a bring-your-own CA):"
            " it cannot issue device certificates"
        )
    if valid_days < 1:
        raise PkiError("valid_days must be at least 1")
    ca_cert, ca_key = _load_ca(pki.ca_cert_path, pki.ca_key_path)
    key: ec.EllipticCurvePrivateKey | None = None
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if csr_pem is None:
        key = _new_key()
        public_key = key.public_key()
    else:
        public_key = _csr_public_key(csr_pem, device_id)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    cert = _leaf_builder(ca_cert, subject, public_key, valid_days, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
        ca_key, hashes.SHA256()
    )
    return IssuedCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=_key_pem(key).decode() if key is not None else None,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
    )


def fingerprint_of(cert_pem: str | bytes) -> str:
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA256()).hex()


def _previous_crl(path: Path) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_crl(pki: PlatformPki, revoked: Iterable[tuple[int, dt.datetime]]) -> Path:
    """Rewrite the CRL with exactly these ``(serial, revoked_at)`` entries; return its path."""
    if pki.ca_key_path is None or pki.crl_path is None:
        raise PkiError("the platform has no CA key: it cannot sign a CRL (bring your own: IOTFLEET_TLS__CRL)")
    with _CRL_LOCK:
        return _write_crl_locked(pki, pki.crl_path, pki.ca_key_path, revoked)


def _write_crl_locked(
    pki: PlatformPki, crl_path: Path, ca_key_path: Path, revoked: Iterable[tuple[int, dt.datetime]]
) -> Path:
    ca_cert, ca_key = _load_ca(pki.ca_cert_path, ca_key_path)
    now = _now()
    # thisUpdate: strictly later than the previous CRL's, never in the future (a CRL not yet valid
    # fails every handshake), so backdated by up to CRL_BACKDATE: bursts of revocations within one
    # second still get distinct, increasing thisUpdates (OpenSSL keeps the newest of one CA's CRLs).
    last_update = now - CRL_BACKDATE
    previous = _previous_crl(crl_path)
    if previous is not None and previous.last_update_utc >= last_update:
        last_update = min(previous.last_update_utc + dt.timedelta(seconds=1), now)
    # One list to the constructor: add_revoked_certificate copies the builder each time (quadratic).
    entries = [
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at).build()
        for serial, revoked_at in revoked
    ]
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject,
        last_update=last_update,
        next_update=now + dt.timedelta(days=pki.crl_days),
        revoked_certificates=entries,
    )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl_path


def revoked_serials(pki: PlatformPki) -> list[tuple[int, dt.datetime]]:
    """The entries of the current CRL (empty when there is none)."""
    if pki.crl_path is None:
        return []
    crl = _previous_crl(pki.crl_path)
    if crl is None:
        return []
    return [(entry.serial_number, entry.revocation_date_utc) for entry in crl]


def _refresh_crl(pki: PlatformPki) -> None:
    """Write an empty CRL if there is none, re-sign one that expires soon or is not the CA's (same entries).

    An expired CRL makes OpenSSL refuse every client certificate, so it is re-signed at every
    start well before its nextUpdate.
    """
    assert pki.crl_path is not None and pki.ca_key_path is not None
    crl = _previous_crl(pki.crl_path)
    ca_cert, _ = _load_ca(pki.ca_cert_path, pki.ca_key_path)
    if crl is not None and crl.issuer == ca_cert.subject and crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        next_update = crl.next_update_utc
        if next_update is not None and next_update - _now() > RENEW_BEFORE:
            return
        write_crl(pki, revoked_serials(pki))
        return
    write_crl(pki, [])
