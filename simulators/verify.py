"""End-to-end loss accounting: what each device sent vs. what the platform stored, by ``seq``.

Each device knows how many seqs it took, which of them it expects the platform
to reject (its own injected faults), which it never sent (offline buffer
overflow) and which the broker never acknowledged. After the run we read back
the stored ``seq`` of every device and report, per device and in total:
missing (expected but not stored), duplicates (a seq stored more than once)
and faulty readings that were stored anyway.

Two sources: the registry API (``GET /api/v1/devices/{id}/telemetry``, one
request per device, paged) and InfluxDB directly over the v1 API (one query
per device type, ``GROUP BY device_id``), which is what a 10,000-device run
uses. ``auto`` tries the API on one device and falls back to InfluxDB.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from iotfleet.influx import InfluxClient, InfluxError, quote_identifier, series_rows
from iotfleet.settings import InfluxSettings


class VerifyError(Exception):
    pass


@dataclass
class DeviceCheck:
    id: str
    type: str
    expected: int
    stored: int
    missing: list[int]
    missing_unacked: list[int]
    duplicates: list[int]
    stored_despite_fault: list[int]


@dataclass
class VerifyResult:
    source: str
    devices: int = 0
    expected: int = 0
    stored: int = 0
    missing: int = 0
    missing_unacked: int = 0
    duplicates: int = 0
    stored_despite_fault: int = 0
    devices_with_missing: int = 0
    waited_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicates == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "devices": self.devices,
            "expected": self.expected,
            "stored": self.stored,
            "missing": self.missing,
            "missing_never_acked_by_broker": self.missing_unacked,
            "duplicates": self.duplicates,
            "stored_despite_fault": self.stored_despite_fault,
            "devices_with_missing": self.devices_with_missing,
            "waited_s": round(self.waited_s, 1),
            "ok": self.ok,
            "samples": self.samples,
        }


def _ranges(seqs: Iterable[int]) -> str:
    """'3-7,9' for readable samples."""
    out: list[str] = []
    items = sorted(seqs)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def check_device(outcome: dict[str, Any], stored: list[int]) -> DeviceCheck:
    first, end = outcome.get("first_seq", 0), outcome["seqs"]
    rejected = set(outcome["rejected"])
    expected = set(range(first, end)) - rejected - set(outcome["dropped"])
    # Seqs outside this run's range are an earlier run's (same ids): not ours to judge.
    counts = Counter(s for s in stored if first <= s < end)
    missing = sorted(expected - counts.keys())
    unacked = set(outcome["unacked"])
    return DeviceCheck(
        id=outcome["id"],
        type=outcome["type"],
        expected=len(expected),
        stored=sum(counts.values()),
        missing=missing,
        missing_unacked=[s for s in missing if s in unacked],
        duplicates=sorted(s for s, n in counts.items() if n > 1),
        stored_despite_fault=sorted(rejected & counts.keys()),
    )


def summarize(source: str, checks: list[DeviceCheck], waited_s: float) -> VerifyResult:
    result = VerifyResult(source=source, waited_s=waited_s)
    for c in checks:
        result.devices += 1
        result.expected += c.expected
        result.stored += c.stored
        result.missing += len(c.missing)
        result.missing_unacked += len(c.missing_unacked)
        result.duplicates += len(c.duplicates)
        result.stored_despite_fault += len(c.stored_despite_fault)
        if c.missing:
            result.devices_with_missing += 1
        if (c.missing or c.duplicates) and len(result.samples) < 10:
            result.samples.append(
                {
                    "device": c.id,
                    "missing": _ranges(c.missing),
                    "never_acked": _ranges(c.missing_unacked),
                    "duplicates": _ranges(c.duplicates),
                }
            )
    return result


PAD_MS = 2_000


def device_window(outcome: dict[str, Any], start_ms: int, end_ms: int) -> tuple[int, int]:
    """The stored-time range of this run's readings of one device: the run, shifted by its clock skew.

    Bounded tightly so that an earlier run of the same devices (same ids, seq from 0
    again) is not mistaken for duplicates.
    """
    skew = int(outcome.get("skew_ms", 0))
    return start_ms + min(skew, 0) - PAD_MS, end_ms + max(skew, 0) + PAD_MS


class InfluxSource:
    """Stored seqs per device straight from InfluxDB (one query per device type)."""

    name = "influxdb"

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings

    async def stored(
        self, outcomes: list[dict[str, Any]], start_ms: int, end_ms: int
    ) -> dict[str, list[int]]:
        windows = {o["id"]: device_window(o, start_ms, end_ms) for o in outcomes}
        wanted = set(windows)
        types = sorted({o["type"] for o in outcomes})
        out: dict[str, list[int]] = {device_id: [] for device_id in wanted}
        rp = quote_identifier(self.settings.retention_policy)
        low = min((w[0] for w in windows.values()), default=start_ms)
        high = max((w[1] for w in windows.values()), default=end_ms)
        async with InfluxClient(self.settings) as client:
            for device_type in types:
                statement = (
                    f'SELECT "seq" FROM {rp}.{quote_identifier(device_type)} '
                    f'WHERE time >= {low}ms AND time <= {high}ms GROUP BY "device_id"'
                )
                try:
                    results = await client.query(statement)
                except InfluxError as exc:
                    if "database not found" in str(exc):
                        return out  # nothing was ever written there: everything is missing
                    raise
                for row in series_rows(results):
                    device_id = row.get("device_id")
                    seq = row.get("seq")
                    if not (
                        isinstance(device_id, str) and device_id in wanted and isinstance(seq, int | float)
                    ):
                        continue
                    lo, hi = windows[device_id]
                    if lo <= int(row.get("time", lo)) <= hi:
                        out[device_id].append(int(seq))
        return out


class ApiSource:
    """Stored seqs per device through the registry's telemetry endpoint (raw points, paged)."""

    name = "registry-api"

    def __init__(self, base_url: str, api_key: str, concurrency: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency

    async def _device(
        self, client: httpx.AsyncClient, device_id: str, start_ms: int, end_ms: int
    ) -> list[int]:
        seqs: list[int] = []
        cursor: str | None = None
        for _ in range(10_000):  # bounded paging
            params: dict[str, Any] = {"fields": "seq", "start": start_ms, "end": end_ms, "limit": 10_000}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
            if response.status_code != 200:
                raise VerifyError(
                    f"telemetry API answered {response.status_code} for {device_id}: {response.text[:200]}"
                )
            body = response.json()
            points = body.get("points") or body.get("items") or body.get("data") or []
            for point in points:
                values = point.get("fields", point) if isinstance(point, dict) else {}
                seq = values.get("seq")
                if isinstance(seq, int | float):
                    seqs.append(int(seq))
            cursor = body.get("next_cursor")
            if not cursor or not points:
                return seqs
        return seqs

    async def stored(
        self, outcomes: list[dict[str, Any]], start_ms: int, end_ms: int
    ) -> dict[str, list[int]]:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limit = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30.0) as client:

            async def one(outcome: dict[str, Any]) -> tuple[str, list[int]]:
                lo, hi = device_window(outcome, start_ms, end_ms)
                async with limit:
                    return outcome["id"], await self._device(client, outcome["id"], lo, hi)

            pairs = await asyncio.gather(*(one(o) for o in outcomes))
        return dict(pairs)


def _in_run(outcomes: list[dict[str, Any]], stored: dict[str, list[int]]) -> int:
    return sum(
        1 for o in outcomes for seq in stored.get(o["id"], ()) if o.get("first_seq", 0) <= seq < o["seqs"]
    )


async def pick_source(
    mode: str, influx: InfluxSettings, api_url: str | None, api_key: str | None, probe: dict[str, Any]
) -> InfluxSource | ApiSource:
    """``api``, ``influx`` or ``auto`` (the API if its telemetry endpoint answers, else InfluxDB)."""
    if mode == "influx":
        return InfluxSource(influx)
    if mode == "api":
        if not api_url or not api_key:
            raise VerifyError("--verify-source api needs the registry URL and an API key")
        return ApiSource(api_url, api_key)
    if api_url and api_key:
        api = ApiSource(api_url, api_key)
        try:
            now = int(time.time() * 1000)
            await api.stored([probe], now - 60_000, now)
            return api
        except (VerifyError, httpx.HTTPError, ValueError):
            pass
    return InfluxSource(influx)


async def verify(
    source: InfluxSource | ApiSource,
    outcomes: list[dict[str, Any]],
    *,
    start_ms: int,
    end_ms: int,
    settle_timeout_s: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Wait until the platform stored what it should (or stops progressing), then compare per device."""
    # Polling through the API costs a request per device: watch the first 50 only.
    expected_subset = outcomes if isinstance(source, InfluxSource) else outcomes[:50]
    target = sum(
        o["seqs"] - o.get("first_seq", 0) - len(set(o["rejected"])) - len(o["dropped"])
        for o in expected_subset
    )
    started = time.monotonic()
    deadline = started + settle_timeout_s
    last, last_change = -1, started
    while True:
        try:
            have = _in_run(expected_subset, await source.stored(expected_subset, start_ms, end_ms))
        except (InfluxError, VerifyError, httpx.HTTPError) as exc:
            raise VerifyError(f"cannot read stored telemetry from {source.name}: {exc}") from exc
        now = time.monotonic()
        if on_progress is not None:
            on_progress(f"verify: {have:,}/{target:,} readings stored ({source.name})")
        if have >= target:
            break
        if have != last:
            last, last_change = have, now
        # The ingest flushes in batches: give up only once nothing has arrived for a while.
        if now >= deadline or now - last_change > max(10.0, settle_timeout_s / 3):
            break
        await asyncio.sleep(1.0)
    waited = time.monotonic() - started
    stored = await source.stored(outcomes, start_ms, end_ms)
    checks = [check_device(o, stored.get(o["id"], [])) for o in outcomes]
    return summarize(source.name, checks, waited)
