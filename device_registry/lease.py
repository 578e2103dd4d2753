"""One registry replica at a time does the once-only work: a lease in the registry DB.

Every replica serves the whole API and dashboard. The work that must happen once per
deployment — the command tracker (acks, events, expiry sweep, publishing what standbys
recorded), the job rollout, the shadow (reports and delta publishing), presence, the broker
agent watcher (reconcile) and the notification sender — runs only in the replica holding the
``registry`` row of the ``leases`` table (``SingletonWork``: router lifespans register a start
and a stop; the lease runs them).

The lease (``LeaseStore``) is one conditional UPDATE per operation, on SQLite and PostgreSQL:

- *acquire*: ``SET holder=me, epoch=epoch+1, expires_at=now+ttl WHERE expires_at <= now``
  (or the recorded holder is provably dead: see ``_dead_local``);
- *renew*: ``SET expires_at=now+ttl WHERE holder=me AND epoch=my_epoch AND expires_at > now``;
- *release* (clean stop): ``SET expires_at=1970 WHERE holder=me AND epoch=my_epoch``, so a
  standby (or this replica's restart) takes it at once.

``now`` is the DB's clock on PostgreSQL (``now()``): the replicas' clocks may disagree. SQLite
is one host's file, so the one host clock is used.

Fencing — a deposed holder must not apply the writes that matter:

1. *Self-stop before expiry.* The holder renews every ``ttl/3``. It counts its term from the
   moment it SENT the last successful renewal (on its own monotonic clock), which is no later
   than the DB's ``now`` at the renewal: its local deadline ``sent + ttl - ttl/6`` therefore
   falls before the DB-side expiry, whatever the clocks' offsets (only their rates must agree,
   which NTP-disciplined clocks do to ppm). At that deadline, renewed or not, it stops the work
   (a hung DB call is abandoned: ``asyncio.wait_for``). A standby only takes an EXPIRED lease,
   so the two never work at once unless a stop takes longer than ``ttl/6``.
2. *Epoch checked in the transaction* (``Lease.fence``) of the writes where a late write would
   do harm: the tracker's batches (command transitions, alerts; then the MQTT acks), its
   expiry sweep, and each job release batch (whose commands are published after its commit). On PostgreSQL the check reads the lease row ``FOR SHARE``: a takeover's UPDATE
   waits for that transaction, and a transaction after the takeover finds another epoch and
   rolls back. On SQLite writers are serialised by the database lock.
3. *The broker fences the MQTT sessions*: the tracker's and the shadow's client ids are per
   deployment, so the new holder's CONNECT takes the session over and the broker disconnects the
   old holder's; what it had not acknowledged is redelivered to the new one.

The other job steps (start, close, expire), presence batches, shadow batches and
notification claims rely on 1 and 3: each is idempotent or monotonic (a job closed twice stays
closed; a delivery claimed twice would be sent twice, at least once, as the outbox already
allows after a crash; the shadow's messages are acked only after its commit, and its session
is fenced by the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import and_, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import func

from device_registry.models import UtcDateTime
from device_registry.models_lease import LeaseRow
from iotfleet.lifecycle import process_alive

log = logging.getLogger("registry.lease")

REGISTRY_LEASE = "registry"
RELEASED = datetime(1970, 1, 1, tzinfo=UTC)
"""``expires_at`` of a lease its holder gave back (a standby takes it at once)."""
STOP_TIMEOUT_S = 5.0
"""After losing the lease, a singleton component that has not stopped within this is abandoned (logged)."""


class Deposed(RuntimeError):
    """This replica no longer holds the lease (epoch) the transaction was fenced with."""


@dataclass(frozen=True, slots=True)
class Acquired:
    epoch: int
    previous: str
    """The former holder ('' if none ever held it)."""
    idle_s: float | None
    """Seconds since the former holder's last renewal (None if it released the lease)."""


def _dead_local(holder: str, me: str) -> bool:
    """The recorded holder is certainly dead: this very replica name (a restart of this replica:
    names are unique among live replicas), or a default name ``<this host>-<pid>`` whose process
    is gone. Lets a restarted single registry (``iotfleet up``) work at once after a kill -9
    instead of waiting for the TTL. Not applied to other hosts' names."""
    if not holder:
        return False
    if holder == me:
        return True
    prefix = f"{socket.gethostname()}-"
    if not holder.startswith(prefix):
        return False
    pid = holder[len(prefix) :]
    return pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))


class LeaseStore:
    """The lease's SQL: each operation one transaction with one conditional UPDATE."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, name: str, replica: str, ttl_s: float
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.replica = replica
        self.ttl_s = ttl_s
        bind = sessions.kw.get("bind")
        self.postgres = bind is not None and bind.dialect.name == "postgresql"

    def _now(self) -> Any:
        # PostgreSQL: the DB's clock, the one all replicas share. SQLite: this host's clock.
        return func.now() if self.postgres else literal(datetime.now(UTC), UtcDateTime())

    def _until(self) -> Any:
        ttl = timedelta(seconds=self.ttl_s)
        return func.now() + ttl if self.postgres else literal(datetime.now(UTC) + ttl, UtcDateTime())

    async def ensure(self) -> None:
        """Create the lease row if missing (the migration creates ``registry``; other names here)."""
        with contextlib.suppress(IntegrityError):  # another replica created it meanwhile
            async with self.sessions() as session, session.begin():
                if await session.get(LeaseRow, self.name) is None:
                    session.add(LeaseRow(name=self.name, holder="", epoch=0, expires_at=RELEASED))

    async def acquire(self) -> Acquired | None:
        """Take the lease if it is free, expired, or its holder is provably dead; None otherwise."""
        async with self.sessions() as session, session.begin():
            seen = (
                await session.execute(
                    select(LeaseRow.holder, LeaseRow.epoch, LeaseRow.expires_at, LeaseRow.renewed_at).where(
                        LeaseRow.name == self.name
                    )
                )
            ).one_or_none()
            if seen is None:
                return None
            holder, epoch, expires_at, renewed_at = seen
            free = LeaseRow.expires_at <= self._now()
            if _dead_local(holder, self.replica):
                # Only the term we saw: if someone else took it meanwhile, no match.
                free = or_(free, and_(LeaseRow.holder == holder, LeaseRow.epoch == epoch))
            result = await session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, free)
                .values(
                    holder=self.replica,
                    epoch=LeaseRow.epoch + 1,
                    expires_at=self._until(),
                    renewed_at=self._now(),
                )
                .returning(LeaseRow.epoch, LeaseRow.renewed_at)
            )
            won = result.one_or_none()
        if won is None:
            return None
        new_epoch, at = won
        idle = None
        if expires_at != RELEASED and renewed_at is not None and at is not None:
            idle = max(0.0, (at - renewed_at).total_seconds())
        return Acquired(int(new_epoch), holder, idle)

    async def renew(self, epoch: int) -> bool:
        """Extend our term; False if it is no longer ours (expired, or taken)."""
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.replica,
                    LeaseRow.epoch == epoch,
                    LeaseRow.expires_at > self._now(),
                )
                .values(expires_at=self._until(), renewed_at=self._now())
            )
        return int(getattr(result, "rowcount", 0) or 0) == 1

    async def release(self, epoch: int) -> bool:
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.replica, LeaseRow.epoch == epoch)
                .values(expires_at=RELEASED)
            )
        return int(getattr(result, "rowcount", 0) or 0) == 1

    async def fence(self, session: AsyncSession, epoch: int) -> None:
        """Raise ``Deposed`` unless this replica still holds ``epoch``, inside the caller's transaction.

        PostgreSQL: the lease row is read FOR SHARE, so a takeover waits for this transaction."""
        stmt = select(LeaseRow.epoch).where(
            LeaseRow.name == self.name,
            LeaseRow.holder == self.replica,
            LeaseRow.epoch == epoch,
            LeaseRow.expires_at > self._now(),
        )
        if self.postgres:
            stmt = stmt.with_for_update(read=True)
        if await session.scalar(stmt) is None:
            raise Deposed(f"lease {self.name!r} epoch {epoch} is no longer held by {self.replica!r}")


Start = Callable[[], Awaitable[None]]
Stop = Callable[[bool], Awaitable[None]]
"""Called with ``lost=True`` when the lease was lost (skip final writes: another replica owns them)."""


class SingletonWork:
    """What runs only in the lease holder: components in registration order (stopped in reverse)."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, Start, Stop]] = []
        self.running = False

    def register(self, name: str, start: Start, stop: Stop) -> None:
        self._parts.append((name, start, stop))

    async def start(self) -> None:
        self.running = True
        for name, start, _stop in self._parts:
            try:
                await start()
            except Exception:
                log.exception("singleton work %r failed to start", name)

    async def stop(self, *, lost: bool) -> None:
        self.running = False
        for name, _start, stop in reversed(self._parts):
            try:
                if lost:  # hurry: another replica may take over once our term ends
                    await asyncio.wait_for(stop(lost), STOP_TIMEOUT_S)
                else:  # a clean stop finishes its final writes, however long they take
                    await stop(lost)
            except TimeoutError:
                log.error("singleton work %r did not stop within %.0f s; abandoned", name, STOP_TIMEOUT_S)
            except Exception:
                log.exception("singleton work %r failed to stop", name)


class LeaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge(
            "registry_lease_held", "1 when this replica holds the registry lease", registry=registry
        )
        self.epoch = Gauge(
            "registry_lease_epoch",
            "Epoch (fencing token) of the lease this replica holds or last held",
            registry=registry,
        )
        self.takeovers = Counter(
            "registry_lease_takeovers",
            "Times this replica acquired the lease (each a new epoch)",
            registry=registry,
        )
        self.lost = Counter(
            "registry_lease_lost", "Times this replica lost the lease while holding it", registry=registry
        )


class Lease:
    """Holds (or waits for) the lease and runs ``work`` exactly while holding it."""

    def __init__(self, store: LeaseStore, work: SingletonWork, registry: CollectorRegistry) -> None:
        self.store = store
        self.work = work
        self.ttl_s = store.ttl_s
        self.every_s = store.ttl_s / 3
        self.margin_s = store.ttl_s / 6
        self.holding = False
        self.epoch = 0
        self.takeovers = 0
        self.holder_since: float | None = None
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self.metrics = LeaseMetrics(registry)

    @property
    def replica(self) -> str:
        return self.store.replica

    async def start(self) -> None:
        """Try once now (a lone replica starts its work before serving, as before), then keep at it."""
        await self.store.ensure()
        with contextlib.suppress(Exception):
            await self._try_acquire()
        if not self.holding:
            log.info("standby: replica %s waits for the lease (ttl %.1f s)", self.replica, self.ttl_s)
        self._task = asyncio.create_task(self._run(), name="registry-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.holding:
            await self.work.stop(lost=False)
            self.holding = False
            self.metrics.held.set(0)
            with contextlib.suppress(Exception):
                if await self.store.release(self.epoch):
                    log.info("lease released (epoch %d)", self.epoch)

    async def fence(self, session: AsyncSession) -> None:
        """In a singleton transaction: raise ``Deposed`` unless we still hold our epoch."""
        if not self.holding:
            raise Deposed("this replica does not hold the lease")
        await self.store.fence(session, self.epoch)

    async def _try_acquire(self) -> None:
        sent = time.monotonic()
        won = await asyncio.wait_for(self.store.acquire(), self.ttl_s)  # a hung DB call is abandoned
        if won is None:
            return
        self.holding, self.epoch = True, won.epoch
        self._deadline = sent + self.ttl_s - self.margin_s
        self.takeovers += 1
        self.holder_since = time.time()
        self.metrics.held.set(1)
        self.metrics.epoch.set(won.epoch)
        self.metrics.takeovers.inc()
        if won.previous and won.previous != self.replica and won.idle_s is not None:
            log.info("took over from %s after %.1f s", won.previous, won.idle_s)
        log.info("lease acquired (epoch %d) by replica %s", won.epoch, self.replica)
        await self.work.start()

    async def _lose(self, why: str) -> None:
        self.holding = False
        self.metrics.held.set(0)
        self.metrics.lost.inc()
        log.warning("lease lost (epoch %d): %s; stopping the singleton work", self.epoch, why)
        await self.work.stop(lost=True)

    async def _run(self) -> None:
        while True:
            if self.holding:
                await asyncio.sleep(max(0.0, min(self.every_s, self._deadline - time.monotonic())))
                await self._renew()
            else:
                await asyncio.sleep(self.every_s)
                try:
                    await self._try_acquire()
                except Exception as exc:  # the DB is away: stay standby, try again
                    log.debug("lease acquisition failed: %s", exc)

    async def _renew(self) -> None:
        sent = time.monotonic()
        left = self._deadline - sent
        if left <= 0:
            await self._lose("not renewed in time")
            return
        try:
            ok = await asyncio.wait_for(self.store.renew(self.epoch), left)
        except Exception as exc:  # DB error or timeout: retry until the local deadline
            if time.monotonic() >= self._deadline:
                await self._lose(f"not renewed in time ({type(exc).__name__})")
            else:
                log.warning("lease renewal failed (%s: %s); retrying", type(exc).__name__, exc)
            return
        if ok:
            self._deadline = sent + self.ttl_s - self.margin_s
        else:
            await self._lose("another replica holds it")

    def describe(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "holder": self.holding,
            "epoch": self.epoch,
            "takeovers": self.takeovers,
            "ttl_s": self.ttl_s,
        }
