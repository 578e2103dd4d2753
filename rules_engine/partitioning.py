"""Partitioned engines, the pure part: which partition a device is in, how many an engine takes,
the hand-over buffer, and the replay rule that rebuilds windows without firing twice.

No I/O here (the leases and the shared state are rules_engine/shared_store.py; the engine wires
both): each piece is unit-tested alone.

Partitioning: within a device type, ``crc32(device_id) % partitions`` (stable across processes,
hosts and Python versions, unlike ``hash()``). A lease is per (device type, partition), so
engines serving different type subsets share one lease table.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PartitionKey = tuple[str, int]
"""(device type, partition number)."""


def partition_of(device_id: str, partitions: int) -> int:
    return zlib.crc32(device_id.encode()) % partitions


def fair_share(total: int, live_engines: int) -> int:
    """The most partitions one engine holds: ceil(total / live engines) (one engine: all of them)."""
    return math.ceil(total / max(1, live_engines))


@dataclass(frozen=True, slots=True)
class LeasePlan:
    release: list[PartitionKey]
    acquire: list[PartitionKey]


def plan_leases(
    held: Iterable[PartitionKey],
    free: Iterable[PartitionKey],
    live_by_type: dict[str, int],
    partitions: int,
) -> LeasePlan:
    """Per device type: give back what is above the fair share, take free ones up to it.

    ``free``: leases nobody holds or whose holder let them expire. Releasing one at a time
    per round keeps hand-overs gradual when an engine joins (each one replays a buffer).
    """
    held_by_type: dict[str, list[PartitionKey]] = {}
    for key in held:
        held_by_type.setdefault(key[0], []).append(key)
    free_by_type: dict[str, list[PartitionKey]] = {}
    for key in free:
        free_by_type.setdefault(key[0], []).append(key)
    release: list[PartitionKey] = []
    acquire: list[PartitionKey] = []
    for device_type, live in live_by_type.items():
        share = fair_share(partitions, live)
        mine = sorted(held_by_type.get(device_type, []))
        if len(mine) > share:
            release.append(mine[-1])
        elif len(mine) < share:
            acquire += sorted(free_by_type.get(device_type, []))[: share - len(mine)]
    return LeasePlan(release, acquire)


@dataclass(frozen=True, slots=True)
class Buffered:
    """One raw telemetry message of a partition this engine does not own (acked at once)."""

    arrived: float  # monotonic seconds
    arrival_ms: int  # wall clock, for readings without their own ts
    key: PartitionKey
    device_id: str
    payload: bytes


class HandoverBuffer:
    """Recent raw messages of other engines' partitions, bounded by age, count and bytes (oldest dropped).

    One deque for all partitions: appends are O(1) and the bounds are global; a takeover scans it
    once (rare) and removes what it replays, so nothing is replayed twice.
    """

    def __init__(
        self,
        max_age_s: float,
        max_items: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        """Larger payloads are not kept: the admission refuses them, so a replay would too."""
        self.clock = clock
        self.items: deque[Buffered] = deque()
        self.bytes = 0
        self.dropped = 0
        """Messages dropped by the count or byte bound before their age ran out (a metric)."""

    def __len__(self) -> int:
        return len(self.items)

    def add(self, arrival_ms: int, key: PartitionKey, device_id: str, payload: bytes) -> None:
        now = self.clock()
        self.expire(now)
        size = len(payload)
        if (
            self.max_items <= 0
            or (self.max_payload_bytes is not None and size > self.max_payload_bytes)
            or (self.max_bytes is not None and size > self.max_bytes)
        ):
            self.dropped += 1
            return
        while len(self.items) >= self.max_items or (
            self.max_bytes is not None and self.bytes + size > self.max_bytes
        ):
            self.bytes -= len(self.items.popleft().payload)
            self.dropped += 1
        self.items.append(Buffered(now, arrival_ms, key, device_id, payload))
        self.bytes += size

    def expire(self, now: float | None = None) -> None:
        oldest = (self.clock() if now is None else now) - self.max_age_s
        items = self.items
        while items and items[0].arrived < oldest:
            self.bytes -= len(items.popleft().payload)

    def take(self, keys: set[PartitionKey]) -> list[Buffered]:
        """Remove and return (in arrival order) the messages of these partitions."""
        self.expire()
        taken = [b for b in self.items if b.key in keys]
        if taken:
            self.items = deque(b for b in self.items if b.key not in keys)
            self.bytes -= sum(len(b.payload) for b in taken)
        return taken


def replay_split(ts: int, fence: int | None) -> bool:
    """True if a replayed reading at ``ts`` may fire: newer than the last transition the previous
    owner stored for its device (``fence``). Older ones only warm windows: that owner already
    acted on them (replaying hot → fire, cool → clear against the stored "inactive" would fire
    the first one again)."""
    return fence is None or ts > fence
