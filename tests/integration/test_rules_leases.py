"""Partition leases and fenced writes against a real PostgreSQL (rules_engine/shared_store.py).

Two stores stand for two engines: one lease per (type, partition), taken over only once expired,
with the epoch bumped; a write at a stale epoch is refused and stores nothing, even in a batch
with writes that are still valid.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rules_engine.evaluator import SavedState
from rules_engine.shared_store import Fenced, SharedStore, StateWrite, StoredState
from tests.registry_harness import Postgres, postgres  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration]

TTL_S = 0.5
KEY = ("thermostat", 3)
OTHER = ("thermostat", 4)


def state(active: bool, at: int) -> StoredState:
    return StoredState(SavedState("overheat", "th-1", active, at if active else None), at)


async def scenario(url: str) -> None:
    a, b = SharedStore(url, "engine-a", TTL_S), SharedStore(url, "engine-b", TTL_S)
    await asyncio.gather(a.open(["thermostat"], 8), b.open(["thermostat"], 8))  # concurrent start
    try:
        assert await a.heartbeat(["thermostat"]) == {"thermostat": 1}
        assert await b.heartbeat(["thermostat"]) == {"thermostat": 2}
        first = await a.acquire(KEY)
        assert first is not None and first.epoch == 1 and first.previous_owner is None
        assert await b.acquire(KEY) is None  # held and not expired
        other = await a.acquire(OTHER)
        assert other is not None
        ids = await a.save(KEY, first.epoch, [state(True, 100)], [("t", b"p", b"")], [("th-1", 100)])
        assert len(ids) == 1
        assert await a.renew({KEY: first.epoch}) == {KEY}
        assert KEY not in await a.free(["thermostat"])

        deadline = time.monotonic() + 10
        while KEY not in await b.free(["thermostat"]):  # a stops renewing: its lease runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        taken = await b.acquire(KEY)
        assert taken is not None and taken.epoch == 2 and taken.previous_owner == "engine-a"
        loaded = await b.load(KEY)
        assert [(s.state.active, s.at_ts) for s in loaded.states] == [(True, 100)]
        assert loaded.seen == {"th-1": 100} and [m for _i, m in loaded.outbox] == [("t", b"p", b"")]

        # The old owner's write at epoch 1 is refused, and stores nothing.
        with pytest.raises(Fenced):
            await a.save(KEY, first.epoch, [state(False, 200)], [("t", b"late", b"")], [])
        assert await a.renew({KEY: first.epoch}) == set()
        # In a batch, only the stale write is refused (its partition OTHER is renewed again first).
        assert await a.renew({OTHER: other.epoch}) == {OTHER}
        results = await a.save_many(
            [
                StateWrite(KEY, first.epoch, [state(False, 300)], [], []),
                StateWrite(OTHER, other.epoch, [], [("t2", b"ok", b"")], []),
            ]
        )
        assert results[0] is None and results[1] is not None and len(results[1]) == 1
        after = await b.load(KEY)
        assert [(s.state.active, s.at_ts) for s in after.states] == [(True, 100)]
        assert len(after.outbox) == 1
        # The new owner writes; a clean release makes the lease free at once.
        await b.save(KEY, taken.epoch, [state(False, 400)], [], [])
        await b.release(KEY, taken.epoch)
        assert KEY in await a.free(["thermostat"])
        again = await a.acquire(KEY)
        assert again is not None and again.epoch == 3 and again.previous_owner is None
        assert [(s.state.active, s.at_ts) for s in (await a.load(KEY)).states] == [(False, 400)]

        # One burst, one statement: the same state and device twice (the later write wins), the
        # outbox ids come back per write in the order of its messages.
        burst = await a.save_many(
            [
                StateWrite(
                    KEY,
                    again.epoch,
                    [state(True, 500)],
                    [("t", b"m1", b""), ("t", b"m2", b"")],
                    [("th-1", 500)],
                ),
                StateWrite(OTHER, other.epoch, [], [("t2", b"m3", b"")], []),
                StateWrite(KEY, again.epoch, [state(False, 600)], [("t", b"m4", b"")], [("th-1", 600)]),
            ]
        )
        first_ids, other_ids, last_ids = burst
        assert first_ids is not None and other_ids is not None and last_ids is not None
        assert len(first_ids) == 2 and len(other_ids) == 1 and len(last_ids) == 1
        assert first_ids[0] < first_ids[1] < other_ids[0] < last_ids[0]
        loaded = await a.load(KEY)
        assert [(s.state.active, s.at_ts) for s in loaded.states] == [(False, 600)]
        assert loaded.seen == {"th-1": 600}
        kept = {i: m[1] for i, m in loaded.outbox}
        assert [kept[i] for i in [*first_ids, *last_ids]] == [b"m1", b"m2", b"m4"]
    finally:
        await a.close()
        await b.close()


def test_leases_expire_to_the_next_engine_and_stale_epochs_are_fenced(request: pytest.FixtureRequest) -> None:
    pg: Postgres = request.getfixturevalue("postgres")
    asyncio.run(scenario(pg.create_database()))
