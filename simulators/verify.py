"""End-to-end loss accounting: what each device sent vs. what the platform stored, by ``seq``.

Each device knows how many seqs it took, which of them it expects the platform
to reject (its own injected faults), which it never sent (offline buffer
overflow) and which the broker never acknowledged. After the run we read back
the stored ``seq`` of every device and report, per device and in total:
missing (expected but not stored), duplicates (a seq stored more than once)
and faulty readings that were stored anyway.

Two sources: the registry API (``GET /api/v1/devices/{id}/telemetry``, one
request per device, paged) and InfluxDB directly over the v1 API (one
streamed query per device type, ``GROUP BY device_id``), which is what a
large run uses. ``auto`` takes the API for up to 1,000 devices if it answers,
else InfluxDB. Memory is bounded per device (a bitmap of its run's seqs),
never per reading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from iotfleet.influx import InfluxClient, InfluxError, quote_identifier, series_rows
from iotfleet.settings import InfluxSettings
from iotfleet.tls_clients import http_verify


class VerifyError(Exception):
    pass


class SeqLedger:
    """The seqs of one device's run that were found stored: a bitmap over [first, end).

    Bounded memory at any fleet size: one bit per reading taken (100,000
    devices reporting every 30 s for 10 minutes: 20 bits each), a second
    bitmap only for a device that has a seq stored twice, and no Python object
    per reading.
    """

    __slots__ = ("end", "first", "seen", "stored", "twice")

    def __init__(self, first: int, end: int) -> None:
        self.first = first
        self.end = max(first, end)
        self.seen = bytearray((self.end - first + 7) // 8)
        self.twice: bytearray | None = None
        self.stored = 0  # points found for seqs of this run (duplicates counted each time)

    def add(self, seq: int) -> None:
        if not self.first <= seq < self.end:
            return  # an earlier run's seq (same ids): not ours to judge
        i = seq - self.first
        byte, mask = i >> 3, 1 << (i & 7)
        self.stored += 1
        if self.seen[byte] & mask:
            if self.twice is None:
                self.twice = bytearray(len(self.seen))
            self.twice[byte] |= mask
        else:
            self.seen[byte] |= mask

    def has(self, seq: int) -> bool:
        i = seq - self.first
        return 0 <= i < self.end - self.first and bool(self.seen[i >> 3] & (1 << (i & 7)))

    def duplicated(self, seq: int) -> bool:
        i = seq - self.first
        return (
            self.twice is not None
            and 0 <= i < self.end - self.first
            and bool(self.twice[i >> 3] & (1 << (i & 7)))
        )


def ledger_for(outcome: dict[str, Any]) -> SeqLedger:
    return SeqLedger(int(outcome.get("first_seq", 0)), int(outcome["seqs"]))


SAMPLE_SEQS = 200  # per device and kind: enough to read a pattern, bounded when everything is missing


@dataclass
class DeviceCheck:
    """One device's verdict: counts, and the first ``SAMPLE_SEQS`` seqs of each kind."""

    id: str
    type: str
    expected: int
    stored: int
    missing: list[int]
    missing_unacked: list[int]
    duplicates: list[int]
    stored_despite_fault: list[int]
    missing_count: int = 0
    missing_unacked_count: int = 0
    duplicates_count: int = 0
    stored_despite_fault_count: int = 0


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


class _Sampled:
    """A count and the first few members."""

    __slots__ = ("count", "sample")

    def __init__(self) -> None:
        self.count = 0
        self.sample: list[int] = []

    def add(self, seq: int) -> None:
        self.count += 1
        if len(self.sample) < SAMPLE_SEQS:
            self.sample.append(seq)


def check_device(outcome: dict[str, Any], stored: SeqLedger | Iterable[int]) -> DeviceCheck:
    """Compare what one device took with what was stored (a ledger, or the stored seqs)."""
    if isinstance(stored, SeqLedger):
        ledger = stored
    else:
        ledger = ledger_for(outcome)
        for seq in stored:
            ledger.add(seq)
    rejected = set(outcome["rejected"])  # injected faults only: small
    dropped = set(outcome["dropped"])
    unacked = set(outcome["unacked"])
    missing, missing_unacked, duplicates, despite = _Sampled(), _Sampled(), _Sampled(), _Sampled()
    expected = 0
    for seq in range(ledger.first, ledger.end):
        if ledger.duplicated(seq):
            duplicates.add(seq)
        if seq in rejected:
            if ledger.has(seq):
                despite.add(seq)
            continue
        if seq in dropped:
            continue
        expected += 1
        if not ledger.has(seq):
            missing.add(seq)
            if seq in unacked:
                missing_unacked.add(seq)
    return DeviceCheck(
        id=outcome["id"],
        type=outcome["type"],
        expected=expected,
        stored=ledger.stored,
        missing=missing.sample,
        missing_unacked=missing_unacked.sample,
        duplicates=duplicates.sample,
        stored_despite_fault=despite.sample,
        missing_count=missing.count,
        missing_unacked_count=missing_unacked.count,
        duplicates_count=duplicates.count,
        stored_despite_fault_count=despite.count,
    )


def summarize(source: str, checks: Iterable[DeviceCheck], waited_s: float) -> VerifyResult:
    result = VerifyResult(source=source, waited_s=waited_s)
    for c in checks:
        result.devices += 1
        result.expected += c.expected
        result.stored += c.stored
        result.missing += c.missing_count
        result.missing_unacked += c.missing_unacked_count
        result.duplicates += c.duplicates_count
        result.stored_despite_fault += c.stored_despite_fault_count
        if c.missing_count:
            result.devices_with_missing += 1
        if (c.missing_count or c.duplicates_count) and len(result.samples) < 10:
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


Ledgers = dict[str, SeqLedger]


class InfluxSource:
    """Stored seqs straight from InfluxDB: one streamed (chunked) query per device type.

    The response is read chunk by chunk (``chunked=true``, 10,000 points each)
    into the devices' ledgers, so a 100,000-device run never holds its points
    in memory. A cheap ``count()`` per type tells when the ingest has caught up.
    """

    name = "influxdb"
    CHUNK = 10_000

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings

    def _span(self, outcomes: list[dict[str, Any]], start_ms: int, end_ms: int) -> tuple[int, int]:
        windows = [device_window(o, start_ms, end_ms) for o in outcomes]
        return min((w[0] for w in windows), default=start_ms), max((w[1] for w in windows), default=end_ms)

    async def count(self, outcomes: list[dict[str, Any]], start_ms: int, end_ms: int) -> int:
        """Points stored in the run's time span for the run's types (other writers included)."""
        low, high = self._span(outcomes, start_ms, end_ms)
        rp = quote_identifier(self.settings.retention_policy)
        total = 0
        async with InfluxClient(self.settings) as client:
            for device_type in sorted({o["type"] for o in outcomes}):
                statement = (
                    f'SELECT count("seq") FROM {rp}.{quote_identifier(device_type)} '
                    f"WHERE time >= {low}ms AND time <= {high}ms"
                )
                try:
                    rows = list(series_rows(await client.query(statement)))
                except InfluxError as exc:
                    if "database not found" in str(exc):
                        return 0
                    raise
                total += int(rows[0].get("count") or 0) if rows else 0
        return total

    async def fill(
        self, outcomes: list[dict[str, Any]], ledgers: Ledgers, start_ms: int, end_ms: int
    ) -> None:
        windows = {o["id"]: device_window(o, start_ms, end_ms) for o in outcomes}
        low, high = self._span(outcomes, start_ms, end_ms)
        rp = quote_identifier(self.settings.retention_policy)
        settings = self.settings
        headers: dict[str, str] = {}
        auth: httpx.BasicAuth | None = None
        if settings.token is not None:
            headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        elif settings.username:
            password = settings.password.get_secret_value() if settings.password else ""
            auth = httpx.BasicAuth(settings.username, password)
        timeout = httpx.Timeout(settings.timeout_s, read=max(settings.timeout_s, 300.0))
        verify = http_verify(settings.url, settings.ca_file, "IOTFLEET_INFLUX__CA_FILE")  # HTTPS: our CA
        async with httpx.AsyncClient(
            base_url=settings.url, headers=headers, auth=auth, timeout=timeout, verify=verify
        ) as http:
            for device_type in sorted({o["type"] for o in outcomes}):
                statement = (
                    f'SELECT "seq" FROM {rp}.{quote_identifier(device_type)} '
                    f'WHERE time >= {low}ms AND time <= {high}ms GROUP BY "device_id"'
                )
                form = {
                    "q": statement,
                    "db": settings.database,
                    "epoch": "ms",
                    "chunked": "true",
                    "chunk_size": str(self.CHUNK),
                }
                async with http.stream("POST", "/query", data=form) as response:
                    if response.status_code != 200:
                        body = (await response.aread())[:500].decode("utf-8", "replace")
                        if "database not found" in body:
                            return  # nothing was ever written there: everything is missing
                        raise InfluxError(f"InfluxDB query refused ({response.status_code}): {body}")
                    async for line in response.aiter_lines():
                        if line.strip():
                            _fill_chunk(orjson.loads(line), ledgers, windows)


def _fill_chunk(chunk: dict[str, Any], ledgers: Ledgers, windows: dict[str, tuple[int, int]]) -> None:
    for result in chunk.get("results", []):
        if "error" in result:
            if "database not found" in str(result["error"]):
                return
            raise InfluxError(f"InfluxQL error: {result['error']}", status=400, retryable=False)
        for series in result.get("series", []):
            device_id = (series.get("tags") or {}).get("device_id")
            if not isinstance(device_id, str) or device_id not in ledgers:
                continue
            ledger = ledgers[device_id]
            lo, hi = windows[device_id]
            columns = series["columns"]
            t_at, seq_at = columns.index("time"), columns.index("seq")
            for values in series.get("values", []):
                seq = values[seq_at]
                if isinstance(seq, int | float) and lo <= values[t_at] <= hi:
                    ledger.add(int(seq))


class ApiSource:
    """Stored seqs per device through the registry's telemetry endpoint (raw points, paged)."""

    name = "registry-api"

    def __init__(self, base_url: str, api_key: str, concurrency: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency

    async def _device(
        self, client: httpx.AsyncClient, device_id: str, start_ms: int, end_ms: int, ledger: SeqLedger
    ) -> None:
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
                    ledger.add(int(seq))
            cursor = body.get("next_cursor")
            if not cursor or not points:
                return

    async def fill(
        self, outcomes: list[dict[str, Any]], ledgers: Ledgers, start_ms: int, end_ms: int
    ) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limit = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30.0) as client:

            async def one(outcome: dict[str, Any]) -> None:
                lo, hi = device_window(outcome, start_ms, end_ms)
                async with limit:
                    await self._device(client, outcome["id"], lo, hi, ledgers[outcome["id"]])

            await asyncio.gather(*(one(o) for o in outcomes))

    async def count(self, outcomes: list[dict[str, Any]], start_ms: int, end_ms: int) -> int:
        ledgers = {o["id"]: ledger_for(o) for o in outcomes}
        await self.fill(outcomes, ledgers, start_ms, end_ms)
        return sum(ledger.stored for ledger in ledgers.values())


# The API costs one request per device (and page): above this many devices `auto` reads InfluxDB.
API_MAX_DEVICES = 1_000


async def pick_source(  # noqa: PLR0917 (one argument per setting)
    mode: str,
    influx: InfluxSettings,
    api_url: str | None,
    api_key: str | None,
    probe: dict[str, Any],
    devices: int = 1,
) -> InfluxSource | ApiSource:
    """``api``, ``influx`` or ``auto`` (the API if its telemetry endpoint answers and the fleet is
    small, else InfluxDB)."""
    if mode == "influx":
        return InfluxSource(influx)
    if mode == "api":
        if not api_url or not api_key:
            raise VerifyError("--verify-source api needs the registry URL and an API key")
        return ApiSource(api_url, api_key)
    if api_url and api_key and devices <= API_MAX_DEVICES:
        api = ApiSource(api_url, api_key)
        try:
            now = int(time.time() * 1000)
            await api.count([{**probe, "first_seq": 0, "seqs": 1}], now - 60_000, now)
            return api
        except (VerifyError, httpx.HTTPError, ValueError):
            pass
    return InfluxSource(influx)


def expected_count(outcomes: Iterable[dict[str, Any]]) -> int:
    return sum(
        o["seqs"] - o.get("first_seq", 0) - len(set(o["rejected"])) - len(o["dropped"]) for o in outcomes
    )


async def verify(
    source: InfluxSource | ApiSource,
    outcomes: list[dict[str, Any]],
    *,
    start_ms: int,
    end_ms: int,
    settle_timeout_s: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Wait until the platform stored what it should (or stops progressing), then compare per device.

    Waiting uses a cheap count (InfluxDB: points in the run's span; the API: the
    first 50 devices); the comparison reads every stored seq once into per-device
    bitmaps. If that still finds readings missing while time is left, the ingest
    may be behind: wait for the count to move and compare again.
    """
    subset = outcomes if isinstance(source, InfluxSource) else outcomes[:50]
    target = expected_count(subset)
    started = time.monotonic()
    deadline = started + settle_timeout_s
    quiet_s = max(10.0, settle_timeout_s / 3)
    last, last_change = -1, started
    result: VerifyResult | None = None
    while True:
        try:
            have = await source.count(subset, start_ms, end_ms)
        except (InfluxError, VerifyError, httpx.HTTPError) as exc:
            raise VerifyError(f"cannot read stored telemetry from {source.name}: {exc}") from exc
        now = time.monotonic()
        if on_progress is not None:
            on_progress(f"verify: {have:,}/{target:,} readings stored ({source.name})")
        if have != last:
            last, last_change = have, now
        gave_up = now >= deadline or now - last_change > quiet_s
        if have >= target or gave_up:
            result = await _compare(source, outcomes, start_ms, end_ms, time.monotonic() - started)
            if result.ok or gave_up:
                return result
        await asyncio.sleep(1.0)


async def _compare(
    source: InfluxSource | ApiSource,
    outcomes: list[dict[str, Any]],
    start_ms: int,
    end_ms: int,
    waited_s: float,
) -> VerifyResult:
    ledgers = {o["id"]: ledger_for(o) for o in outcomes}
    try:
        await source.fill(outcomes, ledgers, start_ms, end_ms)
    except (InfluxError, VerifyError, httpx.HTTPError) as exc:
        raise VerifyError(f"cannot read stored telemetry from {source.name}: {exc}") from exc
    return summarize(source.name, (check_device(o, ledgers[o["id"]]) for o in outcomes), waited_s)
