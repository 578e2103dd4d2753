"""The ingest journal on a real file system: group commit, torn tails, checkpoint, bounded disk, lock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from iotfleet.errors import ConfigError
from iotfleet.influx import InfluxError
from telemetry_ingest.journal import Drainer, Journal, JournalMetrics, Position
from telemetry_ingest.metrics import IngestMetrics


def open_journal(path: Path, max_bytes: int = 1 << 20, segment_bytes: int = 1 << 16) -> Journal:
    journal = Journal(path, max_bytes=max_bytes, segment_bytes=segment_bytes)
    journal.open()
    return journal


def read_all(journal: Journal, start: Position | None = None) -> list[bytes]:
    position = start or journal.checkpoint
    out: list[bytes] = []
    while True:
        records, position = journal.read(position, 4096)
        if not records:
            return out
        out.extend(body for _, body in records)


def test_appends_are_read_back_in_order_across_segments(tmp_path: Path) -> None:
    async def scenario() -> None:
        journal = open_journal(tmp_path, segment_bytes=1000)
        bodies = [f"m,device_id=d{i} v={i} {i}\n".encode() for i in range(300)]
        # concurrent appends (grouped into few fsyncs), in three rounds (three segments at least)
        for part in (bodies[:100], bodies[100:200], bodies[200:]):
            await asyncio.gather(*(journal.append(b) for b in part))
        assert read_all(journal) == bodies
        journal.close()

    asyncio.run(scenario())
    assert len(list(tmp_path.glob("*.seg"))) > 1


def test_torn_tail_is_cut_and_checkpoint_survives_reopen(tmp_path: Path) -> None:
    async def write() -> int:
        journal = open_journal(tmp_path)
        for i in range(10):
            await journal.append(f"m v={i} {i}\n".encode())
        records, after = journal.read(journal.checkpoint, 60)  # a few records
        await journal.advance(after)
        journal.close()
        return len(records)

    drained = asyncio.run(write())
    segment = next(tmp_path.glob("*.seg"))
    with segment.open("ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a record cut short by a kill -9

    async def scenario() -> None:
        reopened = open_journal(tmp_path)
        rest = read_all(reopened)
        assert [int(line.split()[-1]) for line in rest] == list(range(drained, 10))
        await reopened.append(b"m v=10 10\n")  # appends after the cut tail frame correctly
        assert read_all(reopened)[-1] == b"m v=10 10\n"
        reopened.close()

    asyncio.run(scenario())


def test_second_process_on_the_same_journal_fails_fast(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    with pytest.raises(ConfigError, match="IOTFLEET_INGEST__JOURNAL__DIRECTORY"):
        open_journal(tmp_path)
    journal.close()


class FlakyInflux:
    """A stand-in for InfluxDB's /write that is down until told otherwise (unit level only)."""

    def __init__(self) -> None:
        self.up = False
        self.bodies: list[bytes] = []

    async def write(self, lines: bytes | str, *, database: str | None = None, precision: str = "ms") -> None:
        if not self.up:
            raise InfluxError("connection refused", retryable=True)
        assert isinstance(lines, bytes)
        self.bodies.append(lines)

    async def ensure_database(self) -> None:
        return None


def test_full_journal_blocks_appends_until_drained(tmp_path: Path) -> None:
    async def scenario() -> None:
        journal = open_journal(tmp_path, max_bytes=4000, segment_bytes=500)
        influx = FlakyInflux()
        metrics = IngestMetrics("thermostat")
        states: list[bool] = []
        drainer = Drainer(
            journal,
            influx,
            concurrency=2,
            read_bytes=300,
            on_refused=lambda *_a: None,
            on_state=lambda ok, _why: states.append(ok),
            metrics=metrics,
            journal_metrics=JournalMetrics("thermostat", metrics.registry),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(drainer.run(stop))
        lines = [f"m v={i} {i}\n".encode() for i in range(400)]
        appends = [asyncio.create_task(journal.append(line)) for line in lines]
        await asyncio.sleep(0.5)
        blocked = sum(not a.done() for a in appends)
        assert blocked > 0, "a full journal must hold appends back"
        assert journal.disk_bytes <= 4000
        assert journal.health()["journal_full"]
        influx.up = True
        await asyncio.wait_for(asyncio.gather(*appends), 30)
        stop.set()  # the drainer still writes everything journaled before it returns
        await asyncio.wait_for(task, 10)
        written = b"".join(influx.bodies).splitlines(keepends=True)
        # everything, once (the order of concurrent appends and writes does not matter: the pipeline
        # acks in arrival order itself, and points are keyed by series + timestamp)
        assert sorted(written) == sorted(lines)
        assert False in states and states[-1] is True
        journal.close()

    asyncio.run(scenario())


def test_record_checksum_guards_against_bit_rot(tmp_path: Path) -> None:
    async def write() -> None:
        journal = open_journal(tmp_path)
        await journal.append(b"m v=1 1\n")
        await journal.append(b"m v=2 2\n")
        journal.close()

    asyncio.run(write())
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # corrupt the last record's body
    segment.write_bytes(bytes(data))
    reopened = open_journal(tmp_path)
    assert read_all(reopened) == [b"m v=1 1\n"]  # the bad record (and anything after) is cut
    reopened.close()
    assert os.path.getsize(segment) < len(data)
