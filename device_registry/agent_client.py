"""The registry's client of the broker agent (``iotfleet-broker-agent``): device entries over HTTP.

The registry is the system of record; the agent, on the broker's host, owns the
broker's device password file. A call returns once the agent wrote the file and
the broker reloaded it, so a created device can connect and a removed or
re-keyed one has been kicked. Only hashes travel, never passwords.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from device_registry.broker_admin import BrokerError
from iotfleet import broker_files, tls_clients
from iotfleet.settings import BrokerAgentSettings

log = logging.getLogger("registry.agent")


class BrokerRefused(BrokerError):
    """The agent refused the change as invalid (422): retrying will not help."""


class AgentClient:
    def __init__(
        self, settings: BrokerAgentSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        token = settings.token.get_secret_value() if settings.token else ""
        self.base_url = settings.base_url()
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=settings.timeout_s,
            verify=tls_clients.http_verify(self.base_url, settings.ca_file, "IOTFLEET_BROKER_AGENT__CA_FILE"),
            transport=transport,
        )
        self.boot_id: str | None = None
        self.last_error: str | None = "not reached yet"
        self.calls = 0

    @property
    def reachable(self) -> bool:
        return self.last_error is None

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            self.last_error = f"broker agent at {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            raise BrokerError(self.last_error) from None
        if response.status_code >= 400:
            detail = _detail(response)
            if response.status_code in (401, 403):
                self.last_error = f"broker agent refused the registry's token ({detail})"
            if response.status_code == 422:
                raise BrokerRefused(f"broker agent refused it: {detail}")
            raise BrokerError(f"broker agent answered {response.status_code}: {detail}")
        self.last_error = None
        self.calls += 1
        result: dict[str, Any] = response.json()
        return result

    async def apply(
        self, upsert: Mapping[str, broker_files.DeviceEntry], remove: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Add/replace entries (id → type and hash) and remove ids; returns after the broker reloaded."""
        body = {
            "upsert": [{"id": i, "type": e.device_type, "hash": e.password_hash} for i, e in upsert.items()],
            "remove": list(remove),
        }
        result = await self._call("POST", "/v1/changes", body)
        if not result.get("reloaded", False):
            log.warning("broker agent wrote the change but the broker did not confirm a reload (down?)")
        return result

    async def devices(self) -> tuple[str, dict[str, str]]:
        """(agent boot id, id → fingerprint of type and hash) of every entry the broker has."""
        result = await self._call("GET", "/v1/devices")
        return str(result["boot_id"]), dict(result["devices"])

    async def health(self) -> dict[str, Any]:
        """The agent's /healthz body (its boot id tells the registry it restarted)."""
        try:
            response = await self.http.get("/healthz")
            body: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = f"broker agent at {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            raise BrokerError(self.last_error) from None
        self.last_error = (
            None if body.get("status") == "ok" else f"broker agent degraded: {body.get('error')}"
        )
        return body


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text[:200]))
    except ValueError:
        return response.text[:200]
