"""Benchmark: where presence transitions live for 100,000 devices — registry table vs InfluxDB measurement.

Same data, same run, on the same machine: 100,000 devices x 4 transitions
(connected, will, connected, timeout) over the last 4 hours = 400,000 rows,
written in batches of 10,000 (one presence flush of a flapping fleet), then
the question the API asks: one device's timeline over the last 24 h (200 random
devices, sequential, after a warm-up), and retention (deleting the oldest
quarter). Peers:

- registry table ``presence_transitions`` (SQLite here, the registry default),
  through the registry's own model and migrations, index on (device_id, at);
- InfluxDB 1.6 measurement ``presence`` (tag device_id, fields online/cause)
  on the v1 API, one series per device.

Starts its own influxd on free loopback ports and a SQLite file in a temp dir.

    .venv/bin/python bench/presence_store.py --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import delete, insert, select  # noqa: E402

from bench.queries import machine  # noqa: E402
from bench.report import replace_section  # noqa: E402
from device_registry import db  # noqa: E402
from device_registry.models import PresenceTransition  # noqa: E402
from iotfleet.influx import InfluxClient, encode_point  # noqa: E402
from iotfleet.settings import InfluxSettings  # noqa: E402
from tests.harness import Influxd  # noqa: E402

SECTION_TITLE = "Presence transitions: registry table vs InfluxDB (100,000 devices)"
DEVICES = 100_000
CAUSES = (("connected", True), ("will", False), ("connected", True), ("timeout", False))
BATCH = 10_000
LOOKUPS = 200


def device_id(i: int) -> str:
    return f"pr-{i:06d}"


def disk_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def sqlite_bytes(root: Path) -> int:
    return disk_bytes(root.glob("registry.db*"))


def tree_bytes(root: Path) -> int:
    return disk_bytes(root.rglob("*"))


def rows(now_ms: int) -> list[tuple[str, int, bool, str]]:
    """(device, epoch ms, online, cause), in time order like the flusher writes them."""
    out: list[tuple[str, int, bool, str]] = []
    for step, (cause, online) in enumerate(CAUSES):
        base = now_ms - (len(CAUSES) - step) * 3_600_000
        out.extend((device_id(i), base + i, online, cause) for i in range(DEVICES))
    return out


async def timed(name: str, action: Callable[[], Awaitable[object]], runs: int = 1) -> float:
    """Seconds for ``runs`` calls (one warm-up first when repeated)."""
    if runs > 1:
        await action()
    started = time.perf_counter()
    for _ in range(runs):
        await action()
    elapsed = time.perf_counter() - started
    print(f"  {name}: {elapsed:.2f} s", flush=True)
    return elapsed


async def run(root: Path) -> dict[str, float]:
    now_ms = time.time_ns() // 1_000_000
    data = rows(now_ms)
    picks = [device_id(random.randrange(DEVICES)) for _ in range(LOOKUPS)]
    day_ago = datetime.fromtimestamp(now_ms / 1000, UTC) - timedelta(days=1)
    cutoff_ms = now_ms - 3 * 3_600_000  # the oldest quarter (the first step) is older
    out: dict[str, float] = {"rows": len(data)}

    # --- registry table --------------------------------------------------------------------
    url = f"sqlite+aiosqlite:///{root / 'registry.db'}"
    engine = db.create_engine(url)
    await db.run_migrations(engine)
    sessions = db.session_factory(engine)
    print(f"registry table: writing {len(data):,} transitions …", flush=True)

    async def write_table() -> None:
        for start in range(0, len(data), BATCH):
            async with sessions() as session:
                await session.execute(
                    insert(PresenceTransition),
                    [
                        {
                            "device_id": d,
                            "at": datetime.fromtimestamp(ms / 1000, UTC),
                            "online": o,
                            "cause": c,
                        }
                        for d, ms, o, c in data[start : start + BATCH]
                    ],
                )
                await session.commit()

    out["table_write_s"] = await timed("write", write_table)
    t = PresenceTransition

    async def table_lookups() -> None:
        async with sessions() as session:
            for device in picks:
                stmt = select(t).where(t.device_id == device, t.at >= day_ago).order_by(t.at, t.id).limit(200)
                found = (await session.scalars(stmt)).all()
                assert len(found) == len(CAUSES)

    out["table_lookup_ms"] = await timed(f"{LOOKUPS} timelines", table_lookups, runs=3) / 3 / LOOKUPS * 1000

    async def table_prune() -> None:
        async with sessions() as session:
            cutoff = datetime.fromtimestamp(cutoff_ms / 1000, UTC)
            result = await session.execute(delete(t).where(t.at < cutoff))
            await session.commit()
            assert getattr(result, "rowcount", 0) == DEVICES

    out["table_prune_s"] = await timed("prune the oldest quarter", table_prune)
    await engine.dispose()
    out["table_bytes"] = sqlite_bytes(root)

    # --- InfluxDB measurement --------------------------------------------------------------
    influxd = Influxd(root / "influxd").start()
    try:
        settings = InfluxSettings(url=influxd.url, database="bench_presence", timeout_s=300)
        async with InfluxClient(settings) as client:
            await client.ensure_database()
            rss_before = psutil.Process(influxd.process.pid).memory_info().rss if influxd.process else 0
            print(f"influxdb: writing {len(data):,} transitions …", flush=True)

            async def write_influx() -> None:
                for start in range(0, len(data), BATCH):
                    lines = [
                        encode_point("presence", {"device_id": d}, {"online": o, "cause": c}, ms)
                        for d, ms, o, c in data[start : start + BATCH]
                    ]
                    await client.write("\n".join(lines))

            out["influx_write_s"] = await timed("write", write_influx)

            async def influx_lookups() -> None:
                since = now_ms - 86_400_000
                for device in picks:
                    results = await client.query(
                        'SELECT "online", "cause" FROM "presence" WHERE "device_id" = $d'
                        f" AND time >= {since}ms ORDER BY time LIMIT 200",
                        params={"d": device},
                    )
                    values = results[0]["series"][0]["values"]
                    assert len(values) == len(CAUSES)

            out["influx_lookup_ms"] = (
                await timed(f"{LOOKUPS} timelines", influx_lookups, runs=3) / 3 / LOOKUPS * 1000
            )

            async def influx_prune() -> None:
                await client.query(f'DELETE FROM "presence" WHERE time < {cutoff_ms}ms')

            out["influx_prune_s"] = await timed("prune the oldest quarter", influx_prune)
            rss_after = psutil.Process(influxd.process.pid).memory_info().rss if influxd.process else 0
            out["influx_rss_growth"] = rss_after - rss_before
            out["influx_bytes"] = tree_bytes(root / "influxd")
    finally:
        influxd.stop()
    return out


def render(r: dict[str, float]) -> str:
    load1, load5, load15 = os.getloadavg()
    n = int(r["rows"])

    def ratio(table: float, influx: float) -> str:
        return f"{table / influx:.2f}"

    return f"""Machine: {machine()}. Load average at the end: {load1:.1f}, {load5:.1f}, {load15:.1f} (shared machine,
other sessions running).

Command: `.venv/bin/python bench/presence_store.py --write-docs` (own influxd and SQLite file in a temp dir).

Data: {DEVICES:,} devices x {len(CAUSES)} transitions = {n:,} rows, written in batches of {BATCH:,} (one
presence flush). Timeline: one device's last 24 h, {LOOKUPS} random devices sequentially (mean of 3 passes after
a warm-up). Prune: delete the oldest quarter ({DEVICES:,} rows).

| what | registry table (SQLite) | InfluxDB measurement | table / InfluxDB |
|---|---|---|---|
| write {n:,} rows | {r["table_write_s"]:.1f} s ({n / r["table_write_s"]:,.0f} rows/s) | {r["influx_write_s"]:.1f} s ({n / r["influx_write_s"]:,.0f} rows/s) | {ratio(r["table_write_s"], r["influx_write_s"])} |
| one device's timeline | {r["table_lookup_ms"]:.2f} ms | {r["influx_lookup_ms"]:.2f} ms | {ratio(r["table_lookup_ms"], r["influx_lookup_ms"])} |
| prune {DEVICES:,} rows | {r["table_prune_s"]:.2f} s | {r["influx_prune_s"]:.2f} s | {ratio(r["table_prune_s"], r["influx_prune_s"])} |
| footprint | {r["table_bytes"] / 2**20:.0f} MiB file | +{r["influx_rss_growth"] / 2**20:.0f} MiB RSS (one series per device), {r["influx_bytes"] / 2**20:.0f} MiB on disk | |

Chosen: the registry table. The timeline is read per device (an index lookup the registry DB answers
without a network hop, on SQLite and PostgreSQL alike), transitions are written in the same transaction
as the devices' `online` flag (so the history and the fleet count cannot disagree), the registry works
when InfluxDB is down, and a device id as an InfluxDB tag makes one series per device (100,000 series
held in influxd's in-memory index). Retention: `IOTFLEET_REGISTRY__PRESENCE_HISTORY_DAYS` (30), pruned hourly
through the index on `at`.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iotfleet-bench-presence-") as tmp:
        results = asyncio.run(run(Path(tmp)))
    body = render(results)
    print(body)
    if args.write_docs:
        replace_section(SECTION_TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
