"""Where the fleet's credentials come from: the registry API (bulk) or a saved credentials file.

A credentials file lets a tester rerun the same fleet (same ids, same series
in InfluxDB) without provisioning again, and lets tests run without the
registry (they create the devices through the broker's dynsec admin topic and
write the file). Format (JSON)::

    {"format": "iotfleet-simulator-credentials/1",
     "devices": [{"id": "...", "type": "thermostat", "username": "...",
                  "password": "...", "client_id": "..."}, ...]}
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson

from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import IotfleetError
from simulators.fleet import DeviceCredentials

FILE_FORMAT = "iotfleet-simulator-credentials/1"
BULK_LIMIT = 10_000  # the registry's per-request maximum


class ProvisioningError(IotfleetError):
    """The fleet could not be provisioned or its credentials file is unusable."""


def spread(total: int, types: list[str] | None = None) -> dict[str, int]:
    """``total`` devices spread as evenly as possible over ``types`` (default: every catalogue type)."""
    names = list(types or DEVICE_TYPES)
    base, extra = divmod(total, len(names))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(names)}


def load_credentials(path: Path) -> list[DeviceCredentials]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ProvisioningError(f"credentials file {path} does not exist") from None
    except orjson.JSONDecodeError as exc:
        raise ProvisioningError(f"credentials file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ProvisioningError(f"credentials file {path}: expected format {FILE_FORMAT!r}")
    out = []
    for index, item in enumerate(data.get("devices", [])):
        try:
            out.append(
                DeviceCredentials(
                    id=item["id"],
                    type=item["type"],
                    username=item.get("username", item["id"]),
                    password=item.get("password") or "",
                    client_id=item.get("client_id", item["id"]),
                    next_seq=int(item.get("next_seq", 0)),
                    cert_file=item.get("cert_file"),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ProvisioningError(
                f"credentials file {path}: device #{index} needs id, type and password (or cert_file)"
            ) from None
        if not out[-1].password and out[-1].cert_file is None:
            raise ProvisioningError(
                f"credentials file {path}: device #{index} has neither password nor cert_file"
            )
        if out[-1].type not in DEVICE_TYPES:
            raise ProvisioningError(f"credentials file {path}: unknown device type {out[-1].type!r}")
    return out


def save_credentials(path: Path, devices: list[DeviceCredentials]) -> None:
    """Write 0600: the file holds device passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = orjson.dumps({"format": FILE_FORMAT, "devices": [d.as_dict() for d in devices]})
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(body)
    tmp.replace(path)


def record_next_seqs(path: Path, outcomes: list[dict[str, Any]]) -> None:
    """After a run: store where each device's seq counter goes on, for the next run of the same file."""
    if not path.exists():
        return
    next_seq = {o["id"]: int(o["seqs"]) for o in outcomes}
    devices = [
        dataclasses.replace(d, next_seq=next_seq.get(d.id, d.next_seq)) for d in load_credentials(path)
    ]
    save_credentials(path, devices)


def select(devices: list[DeviceCredentials], counts: Mapping[str, int]) -> list[DeviceCredentials]:
    """The first ``counts[type]`` devices of each type; the rest stay unused."""
    taken: dict[str, int] = dict.fromkeys(counts, 0)
    out = []
    for device in devices:
        if taken.get(device.type, 0) < counts.get(device.type, 0):
            taken[device.type] += 1
            out.append(device)
    return out


def missing_counts(devices: list[DeviceCredentials], counts: Mapping[str, int]) -> dict[str, int]:
    have: dict[str, int] = {}
    for device in devices:
        have[device.type] = have.get(device.type, 0) + 1
    return {t: n - have.get(t, 0) for t, n in counts.items() if n > have.get(t, 0)}


class RegistryProvisioner:
    """Creates devices with ``POST /api/v1/devices/bulk`` (≤10,000 per request)."""

    def __init__(
        self, base_url: str, api_key: str, *, timeout_s: float = 600.0, cafile: Path | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        # an https:// API: the platform CA (an SSLContext: httpx deprecates a path string)
        self.verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(cafile)) if cafile is not None else True
        )

    def provision(
        self,
        counts: Mapping[str, int],
        *,
        run_id: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        cert_dir: Path | None = None,
    ) -> list[DeviceCredentials]:
        """Create the devices; with ``cert_dir``, as certificate devices (auth "certificate") whose
        key and certificate, returned once by the registry, are kept in ``cert_dir/<id>.pem`` (0600)."""
        run = run_id or secrets.token_hex(3)
        wanted: list[dict[str, Any]] = []
        for device_type, n in counts.items():
            for i in range(n):
                wanted.append(
                    {
                        "id": f"sim-{run}-{device_type.replace('_', '-')}-{i:05d}",
                        "type": device_type,
                        "name": f"simulated {device_type} {i}",
                        "tags": {"simulator": "iotfleet", "run": run},
                        **({"auth": "certificate"} if cert_dir is not None else {}),
                    }
                )
        out: list[DeviceCredentials] = []
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(
            base_url=self.base_url, headers=headers, timeout=self.timeout_s, verify=self.verify
        ) as client:
            for start in range(0, len(wanted), BULK_LIMIT):
                chunk = wanted[start : start + BULK_LIMIT]
                try:
                    response = client.post("/api/v1/devices/bulk", json={"devices": chunk})
                except httpx.HTTPError as exc:
                    raise ProvisioningError(
                        f"registry API at {self.base_url} unreachable ({exc!r}); is the stack up"
                        " (`iotfleet up`)? Or pass --credentials FILE with saved credentials"
                    ) from None
                if response.status_code in (401, 403):
                    raise ProvisioningError(
                        f"registry refused the API key ({response.status_code}); pass --api-key or check"
                        " <state_dir>/admin-api-key"
                    )
                if response.status_code != 201:
                    raise ProvisioningError(
                        f"bulk provisioning failed ({response.status_code}): {response.text[:500]}"
                    )
                for item in response.json().get("devices", []):
                    cred = item.get("credentials") or {}
                    cert_file = None
                    if cert_dir is not None:
                        cert_file = str(save_certificate(cert_dir, item["id"], cred))
                    out.append(
                        DeviceCredentials(
                            id=item["id"],
                            type=item["type"],
                            username=cred.get("username", item["id"]),
                            password=cred.get("password") or "",
                            client_id=cred.get("client_id", item["id"]),
                            cert_file=cert_file,
                        )
                    )
                if on_progress is not None:
                    on_progress(len(out), len(wanted))
        return out


def save_certificate(cert_dir: Path, device_id: str, credentials: Mapping[str, Any]) -> Path:
    """Write a certificate device's key and certificate (PEM, one file, 0600): what it presents over TLS."""
    key, cert = credentials.get("private_key"), credentials.get("certificate")
    if not key or not cert:
        raise ProvisioningError(
            f"the registry returned no certificate and key for certificate device {device_id!r}: does it"
            " support auth=certificate (a platform CA with its key)?"
        )
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = cert_dir / f"{device_id}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(key).rstrip("\n") + "\n" + str(cert))
    return path


def read_api_key(state_dir: Path) -> str | None:
    """The admin API key of a stack started by ``iotfleet up`` from ``state_dir``."""
    path = state_dir / "admin-api-key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_stack_secrets(state_dir: Path) -> dict[str, str]:
    """MQTT passwords of the platform's accounts, written by ``iotfleet up`` (secrets.json)."""
    try:
        data = orjson.loads((state_dir / "secrets.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
