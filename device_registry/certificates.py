"""Certificate devices in the registry: issuing from the platform CA, and the CRL rebuilt from the DB.

A certificate device (``auth: certificate``) gets one X.509 client certificate (CN = device id)
from the platform CA (iotfleet/pki.py); the broker's device file pins its SHA-256 (the device's
``password_hash`` column holds that entry, ``x509:<sha256>``). Revocation has two layers:

- the device plugin: the entry is removed or replaced, so the broker kicks the live session at the
  agent's reload and refuses that certificate from then on (CONNACK 135);
- the CRL (``<state_dir>/tls/crl.pem``, the broker's ``crlfile``): rewritten BEFORE the agent's
  change, so the same SIGHUP reloads it and the TLS handshake itself refuses the certificate.

The CRL is always rebuilt from the DB: certificates revoked for good (device deleted, certificate
rotated; table ``revoked_certificates``, kept until they expire) plus the certificates of disabled
certificate devices (held: enabling the device takes them off the CRL again). If the agent's change
fails, the CRL is rebuilt from the DB again, so it never says more than the DB. Changes in flight
(CRL written, DB not yet committed) are held in ``PendingRevocations``, so two concurrent
revocations cannot each write a CRL without the other's certificate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry.models import Device, RevokedCertificate, utcnow
from device_registry.problems import Problem
from iotfleet import pki
from iotfleet.pki import IssuedCertificate, PkiError, PlatformPki

log = logging.getLogger("registry.certificates")

CERTIFICATE = "certificate"


@dataclass
class PendingRevocations:
    """Per device id: a serial about to be revoked or held (``add``) or taken off the CRL (``drop``)."""

    add: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    drop: dict[str, int] = field(default_factory=dict)

    def settle(self, device_id: str) -> None:
        """The change is committed to the DB (or abandoned): the DB says it from now on."""
        self.add.pop(device_id, None)
        self.drop.pop(device_id, None)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _platform(platform: PlatformPki | None) -> PlatformPki:
    if platform is None or platform.ca_key_path is None or not platform.ca_key_path.exists():
        where = platform.ca_key_path if platform is not None else None
        raise Problem(
            409,
            "certificate devices need the platform CA and its key"
            + (f" (not found at {where})" if where else "")
            + ": start the stack once (iotfleet up makes it) or set IOTFLEET_TLS__CA_CERT and IOTFLEET_TLS__CA_KEY",
            slug="no-platform-ca",
            title="No platform CA to issue certificates",
        )
    return platform


def issue(
    platform: PlatformPki | None, requests: Iterable[tuple[str, str | None]], valid_days: int
) -> list[IssuedCertificate]:
    """One certificate per (device id, CSR or None); CPU-bound (~1 ms each): call it off the event loop."""
    ca = _platform(platform)
    issued = []
    for device_id, csr in requests:
        try:
            issued.append(
                pki.issue_device_certificate(ca, device_id, csr.encode() if csr else None, valid_days)
            )
        except PkiError as exc:
            raise Problem(
                422,
                f"device {device_id!r}: {exc}",
                slug="certificate-not-issued",
                title="Certificate not issued",
                device_id=device_id,
            ) from None
    return issued


async def crl_entries(session: AsyncSession) -> list[tuple[int, datetime]]:
    """What the CRL lists now: unexpired certificates revoked for good, and those of disabled devices."""
    now = utcnow()
    revoked = await session.execute(
        select(RevokedCertificate.serial, RevokedCertificate.revoked_at).where(
            RevokedCertificate.not_after > now
        )
    )
    held = await session.execute(
        select(Device.cert_serial, Device.updated_at).where(
            Device.auth == CERTIFICATE, Device.enabled.is_(False), Device.cert_serial.is_not(None)
        )
    )
    entries = [(int(serial, 16), at) for serial, at in revoked.all()]
    entries += [(int(serial, 16), at) for serial, at in held.all() if serial]
    return entries


async def write_crl(platform: PlatformPki | None, session: AsyncSession, pending: PendingRevocations) -> None:
    """Rewrite the broker's CRL: the DB's entries plus the pending additions, minus the pending drops.

    Ends the session's read transaction (the broker agent is called next, with no DB transaction open).
    """
    if platform is None or platform.ca_key_path is None or platform.crl_path is None:
        await session.rollback()
        return
    entries = await crl_entries(session)
    await session.rollback()
    dropped = set(pending.drop.values())
    merged = {serial: at for serial, at in [*entries, *pending.add.values()] if serial not in dropped}
    await asyncio.to_thread(pki.write_crl, platform, sorted(merged.items()))


async def rebuild_crl(
    platform: PlatformPki | None, session: AsyncSession, pending: PendingRevocations
) -> None:
    """The CRL as the DB (and the changes still in flight) say: at start, and after a failed change."""
    if platform is None or platform.ca_key_path is None or not platform.ca_key_path.exists():
        return
    try:
        await write_crl(platform, session, pending)
    except Exception as exc:  # the plugin still refuses what the DB revoked; the next change retries
        log.error("could not rewrite the CRL %s: %s", platform.crl_path, exc)
