"""The registry lease (device_registry/lease.py) on SQLite and on a real PostgreSQL: acquire, renew,
takeover after expiry, epochs, a deposed holder, release, and the runtime that starts/stops the work."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry import db
from device_registry.lease import REGISTRY_LEASE, Deposed, Lease, LeaseStore, SingletonWork
from device_registry.models_lease import LeaseRow
from tests.registry_harness import database_url, postgres, wait_for  # noqa: F401  (fixtures)

TTL = 0.6


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:  # noqa: F811
    engine = db.create_engine(database_url)
    await db.run_migrations(engine)
    yield db.session_factory(engine)
    await engine.dispose()


def store(sessions: async_sessionmaker[AsyncSession], replica: str, ttl_s: float = TTL) -> LeaseStore:
    return LeaseStore(sessions, name=REGISTRY_LEASE, replica=replica, ttl_s=ttl_s)


async def test_acquire_renew_expire_takeover_and_fencing(sessions: async_sessionmaker[AsyncSession]) -> None:
    a, b = store(sessions, "replica-a"), store(sessions, "replica-b")
    first = await a.acquire()
    assert first is not None and first.epoch == 1 and first.previous == ""
    assert await b.acquire() is None, "a live lease must not be taken"
    assert await b.renew(1) is False, "only the holder renews"
    assert await a.renew(1) is True
    async with sessions() as session, session.begin():
        await a.fence(session, 1)
    # a stops renewing (it died): b takes over once the lease has expired, with a new epoch.
    started = time.monotonic()
    taken = None
    while taken is None:
        assert time.monotonic() - started < TTL + 5, "b never took the expired lease"
        taken = await b.acquire()
        await asyncio.sleep(0.02)
    waited = time.monotonic() - started
    assert waited >= TTL * 0.8, f"taken after {waited:.2f} s, before the TTL ran out"
    assert taken.epoch == 2 and taken.previous == "replica-a"
    assert taken.idle_s is not None and taken.idle_s >= TTL * 0.8
    # The deposed holder can neither renew nor write fenced.
    assert await a.renew(1) is False
    with pytest.raises(Deposed):
        async with sessions() as session, session.begin():
            await a.fence(session, 1)
    async with sessions() as session, session.begin():
        await b.fence(session, 2)
    assert await a.release(1) is False, "a deposed holder cannot release the new term"
    assert await b.release(2) is True
    third = await a.acquire()
    assert third is not None and third.epoch == 3 and third.previous == "replica-b"
    assert third.idle_s is None, "a released lease is taken at once (no idle time)"


async def test_a_dead_local_holder_is_taken_over_at_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    host = socket.gethostname()
    live = store(sessions, f"{host}-{os.getpid()}", ttl_s=60)
    first = await live.acquire()
    assert first is not None
    assert await store(sessions, "other").acquire() is None, "a live holder keeps its lease until the TTL"
    assert await live.release(first.epoch)
    # A holder named by the default <hostname>-<pid> whose process is gone (a kill -9'd registry
    # restarted on the same host): taken at once, no waiting for the TTL.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()
    dead = f"{host}-{child.pid}"
    assert await store(sessions, dead, ttl_s=60).acquire() is not None
    restarted = store(sessions, f"{host}-999999999", ttl_s=60)
    won = await restarted.acquire()
    assert won is not None and won.epoch == 3 and won.previous == dead
    # The same replica name restarted (explicit IOTFLEET_REGISTRY__REPLICA): its own old term.
    again = await store(sessions, restarted.replica, ttl_s=60).acquire()
    assert again is not None and again.epoch == 4
    # Another host's holder is never presumed dead.
    assert await restarted.release(again.epoch)
    assert await store(sessions, "elsewhere-1", ttl_s=60).acquire() is not None
    assert await store(sessions, f"{host}-1", ttl_s=60).acquire() is None


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.stopped_at: datetime | None = None

    def work(self) -> SingletonWork:
        work = SingletonWork()

        async def start() -> None:
            self.events.append("start")

        async def stop(lost: bool) -> None:
            self.events.append("stop-lost" if lost else "stop")
            self.stopped_at = datetime.now(UTC)

        work.register("recorder", start, stop)
        return work


async def test_runtime_runs_the_work_only_while_holding(
    sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.lease")
    one, two = Recorder(), Recorder()
    lease_one = Lease(store(sessions, "one"), one.work(), CollectorRegistry())
    lease_two = Lease(store(sessions, "two"), two.work(), CollectorRegistry())
    await lease_one.start()
    await lease_two.start()
    try:
        assert lease_one.holding and one.events == ["start"], "the first replica works at once"
        assert not lease_two.holding and two.events == []
        # Several renewals later the standby is still a standby.
        await asyncio.sleep(TTL * 2)  # a span of time is the subject here, not a readiness wait
        assert lease_one.holding and not lease_two.holding and two.events == []
        # The holder dies (its loop stops, no release): the standby takes over within ~TTL.
        assert lease_one._task is not None
        lease_one._task.cancel()
        died = time.monotonic()
        await wait_for(lambda: lease_two.holding, what="takeover", within=TTL * 3)
        took = time.monotonic() - died
        assert two.events == ["start"] and lease_two.epoch == lease_one.epoch + 1
        assert took < TTL * 2, f"takeover took {took:.2f} s"
        assert any("took over from one" in r.message for r in caplog.records)
        assert any(f"lease acquired (epoch {lease_two.epoch})" in r.message for r in caplog.records)
        # Another replica takes the lease from under the holder (e.g. the DB row rewritten): the
        # deposed holder stops its work at its next renewal, with "lease lost".
        async with sessions() as session, session.begin():
            await session.execute(
                update(LeaseRow).where(LeaseRow.name == REGISTRY_LEASE).values(holder="intruder", epoch=99)
            )
        await wait_for(lambda: "stop-lost" in two.events, what="deposed holder stops", within=TTL)
        assert two.events == ["start", "stop-lost"]
        assert any("lease lost" in r.message for r in caplog.records)
    finally:
        lease_one.holding = False  # its loop was cancelled: nothing to stop or release
        await lease_one.stop()
        await lease_two.stop()


async def test_holder_stops_before_expiry_when_the_db_is_gone(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A holder that cannot renew stops its work before its lease would expire in the DB."""
    rec = Recorder()
    lease = Lease(store(sessions, "lonely"), rec.work(), CollectorRegistry())
    await lease.start()
    assert lease.holding

    async def unreachable() -> bool:
        raise OSError("database unreachable")

    # The DB vanishes for this replica: every renewal from now on fails.
    lease.store.renew = lambda _epoch: unreachable()  # type: ignore[method-assign]
    async with sessions() as session:
        expires_at = await session.scalar(select(LeaseRow.expires_at).where(LeaseRow.name == REGISTRY_LEASE))
    assert expires_at is not None
    await wait_for(lambda: rec.stopped_at is not None, what="work stopped", within=TTL * 2)
    stopped = rec.stopped_at
    assert rec.events == ["start", "stop-lost"] and stopped is not None
    assert stopped < expires_at, f"stopped at {stopped}, after the lease expired at {expires_at}"
    await lease.stop()
