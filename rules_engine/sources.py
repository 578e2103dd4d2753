"""Where the engine gets its rules and its device directory: the registry API, or a file.

The registry API (``GET /api/v1/rules`` and ``GET /api/v1/devices`` with the
admin key) rather than the registry's database: the engine then works the same
with SQLite or PostgreSQL behind the registry, needs no DB credentials, and
sees exactly the rules the API validated. A rules file (JSON list of rules) is
for running the engine standalone (benchmarks, demos without a registry).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
from pydantic import ValidationError

from iotfleet.errors import ConfigError
from iotfleet.settings import Settings
from rules_engine.models import StoredRule, Target

log = logging.getLogger("rules-engine.sources")


class SourceError(Exception):
    """The rules or devices could not be fetched (retried later; the engine keeps what it has)."""


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    device_type: str
    device_id: str
    tags: Mapping[str, str] = field(default_factory=dict)


class RuleSource(Protocol):
    def fetch_rules(self) -> list[StoredRule]: ...

    def fetch_devices(self) -> list[DeviceEntry] | None:
        """Every device with its tags, or None if this source has no directory."""
        ...

    def close(self) -> None: ...


def parse_rules(items: Iterable[Any]) -> list[StoredRule]:
    """Parse served rules; a rule that does not parse is skipped with a log line (not fatal)."""
    rules = []
    for item in items:
        if isinstance(item, dict) and item.get("invalid"):
            # Flagged by the registry: a row stored before today's bounds, served without its definition.
            log.warning("rule %r skipped: %s", item.get("name"), item["invalid"])
            continue
        try:
            rules.append(StoredRule.model_validate(item))
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            log.warning("rule %r skipped: %s", name, exc.errors()[0].get("msg"))
    return rules


class FileSource:
    """Rules from a JSON file: a list of rules (``id`` defaults to the name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise ConfigError(f"IOTFLEET_RULES__RULES_FILE: {path} does not exist")

    def fetch_rules(self) -> list[StoredRule]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SourceError(f"cannot read rules file {self.path}: {exc}") from exc
        if not isinstance(data, list):
            raise SourceError(f"rules file {self.path} must hold a JSON list of rules")
        return parse_rules({"id": r.get("name"), **r} if isinstance(r, dict) else r for r in data)

    def fetch_devices(self) -> list[DeviceEntry] | None:
        return None

    def close(self) -> None:
        pass


def admin_key(settings: Settings) -> str:
    if settings.rules.api_key is not None:
        return settings.rules.api_key.get_secret_value()
    path = settings.state_dir / "admin-api-key"
    try:
        return path.read_text().strip()
    except OSError:
        raise ConfigError(
            f"IOTFLEET_RULES__API_KEY: not set and {path} is not readable (IOTFLEET_STATE_DIR)"
        ) from None


class RegistrySource:
    """Rules and devices from the registry's REST API (paginated by cursor)."""

    PAGE = 1000

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 5.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistrySource:
        host = settings.registry.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # a bind-all address is not a destination
        return cls(f"http://{host}:{settings.registry.port}", admin_key(settings))

    def _pages(self, path: str, params: dict[str, Any] | None = None) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        for _ in range(10_000):  # bounded: 10M items
            query = {"limit": self.PAGE, **(params or {})}
            if cursor:
                query["cursor"] = cursor
            try:
                response = self._http.get(path, params=query)
            except httpx.HTTPError as exc:
                raise SourceError(f"registry unreachable ({exc!r})") from exc
            if response.status_code != 200:
                raise SourceError(
                    f"registry answered {response.status_code} on {path}: {response.text[:200]}"
                )
            body = response.json()
            items.extend(body.get("items", []))
            cursor = body.get("next_cursor")
            if not cursor:
                break
        return items

    def fetch_rules(self) -> list[StoredRule]:
        return parse_rules(self._pages("/api/v1/rules"))

    def fetch_devices(self) -> list[DeviceEntry] | None:
        return [
            DeviceEntry(d["type"], d["id"], d.get("tags") or {})
            for d in self._pages("/api/v1/devices")
            if d.get("enabled", True)
        ]

    def close(self) -> None:
        self._http.close()


class Directory:
    """Devices by id and type with their tags: the scope of schedule rules and tag targets."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceEntry] = {}

    def replace(self, entries: Iterable[DeviceEntry]) -> None:
        self.devices = {e.device_id: e for e in entries}

    def seen(self, device_type: str, device_id: str) -> None:
        """A device heard on the wire but not (yet) in the registry's list: known, no tags."""
        if device_id not in self.devices:
            self.devices[device_id] = DeviceEntry(device_type, device_id)

    def tags(self, device_id: str) -> Mapping[str, str]:
        entry = self.devices.get(device_id)
        return entry.tags if entry is not None else {}

    def of_type(
        self, device_type: str, ids: Iterable[str] | None = None, tags: Mapping[str, str] | None = None
    ) -> list[DeviceEntry]:
        wanted = set(ids) if ids is not None else None
        return [
            e
            for e in self.devices.values()
            if e.device_type == device_type
            and (wanted is None or e.device_id in wanted)
            and all(e.tags.get(k) == v for k, v in (tags or {}).items())
        ]

    def resolve(self, target: Target | None, scope_type: str, source_device: str | None) -> list[DeviceEntry]:
        """The devices a command goes to: the triggering device, or the target's selection."""
        if target is None:
            if source_device is None:
                return []
            entry = self.devices.get(source_device)
            return [entry if entry is not None else DeviceEntry(scope_type, source_device)]
        device_type = target.device_type or scope_type
        if target.devices is not None:
            # Named devices need not be in the directory yet: they are addressed by id.
            return [self.devices.get(d) or DeviceEntry(device_type, d) for d in target.devices]
        pair = target.tag_pair()
        if pair is not None:
            return self.of_type(device_type, tags={pair[0]: pair[1]})
        assert target.same_tag is not None
        value = self.tags(source_device).get(target.same_tag) if source_device else None
        if value is None:
            return []
        return self.of_type(device_type, tags={target.same_tag: value})
