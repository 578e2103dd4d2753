"""Registry tags in telemetry queries: ``tag=site=paris`` and ``group_by=site`` for devices tagged in the registry.

Points in InfluxDB carry only the ``device_id`` tag (plus any
``IOTFLEET_INGEST__EXTRA_TAGS`` the ingest stamps on every point); a device's
tags live in the registry, where operators change them. So a tag key that
devices of the type have in the registry is resolved at query time: tag →
device ids (one indexed-by-type scan of the registry DB) → an InfluxQL filter
on ``device_id`` (device_set_condition). The current tags apply to the whole
history: a device moved from one site to another is counted at its new site,
and retagging takes effect at once, with no ingest change and no second copy
of the tags to keep in sync. A key no device of the type has in the registry is
left to InfluxDB as a point tag (what the ingest's extra tags produce).

Bounded: one request resolves to at most ``MAX_RESOLVED_DEVICES`` devices
(measured: 10,000 ids add about a second of InfluxDB planning, see
docs/benchmarks.md); beyond, a 422 asks for a narrower filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry.models import Device
from device_registry.telemetry.query import DEVICE_TAG, MAX_RESOLVED_DEVICES, QueryError


@dataclass(frozen=True)
class TagResolution:
    point_tags: list[tuple[str, str]]  # filters left to InfluxDB (point tags)
    device_ids: list[str] | None  # registry filters resolved: only these devices' points
    groups: list[tuple[str, list[str]]] | None  # group_by a registry tag: (value, its devices)


async def _registry_keys(session: AsyncSession, device_type: str, keys: set[str]) -> set[str]:
    found = set()
    for key in sorted(keys):
        hit = await session.scalar(
            select(Device.id)
            .where(Device.type == device_type, Device.tags[key].as_string().is_not(None))
            .limit(1)
        )
        if hit is not None:
            found.add(key)
    return found


async def resolve_tags(
    session: AsyncSession, device_type: str, group_by: str | None, filters: Sequence[tuple[str, str]]
) -> TagResolution:
    """Split tag filters and grouping into registry tags (resolved to devices) and point tags."""
    wanted = {key for key, _ in filters} | ({group_by} if group_by else set())
    wanted.discard(DEVICE_TAG)
    registry = await _registry_keys(session, device_type, wanted) if wanted else set()
    registry_filters = [(k, v) for k, v in filters if k in registry]
    point_tags = [(k, v) for k, v in filters if k not in registry]
    grouping = group_by if group_by in registry else None
    if not registry_filters and grouping is None:
        return TagResolution(point_tags, None, None)
    column = Device.tags[grouping].as_string() if grouping else Device.type
    stmt = select(Device.id, column).where(Device.type == device_type)
    for key, value in registry_filters:
        stmt = stmt.where(Device.tags[key].as_string() == value)
    rows = (await session.execute(stmt.order_by(Device.id).limit(MAX_RESOLVED_DEVICES + 1))).all()
    if len(rows) > MAX_RESOLVED_DEVICES:
        described = ", ".join(f"{k}={v}" for k, v in registry_filters) or f"group_by={grouping}"
        raise QueryError(
            f"{described} matches more than {MAX_RESOLVED_DEVICES:,} {device_type} devices in the registry;"
            " add a tag filter to narrow it (or stamp the tag on the points at ingest:"
            " IOTFLEET_INGEST__EXTRA_TAGS)",
            param="tag" if registry_filters else "group_by",
            max_devices=MAX_RESOLVED_DEVICES,
        )
    device_ids = [row[0] for row in rows]
    if grouping is None:
        return TagResolution(point_tags, device_ids, None)
    by_value: dict[str, list[str]] = {}
    for device_id, value in rows:
        # Like InfluxDB's GROUP BY a tag: devices without it form the group with value "".
        by_value.setdefault(value or "", []).append(device_id)
    return TagResolution(point_tags, device_ids, sorted(by_value.items()))
