"""The job rollout: one asyncio task in the registry stepping every active job, the DB its only memory.

Each step of a job: start it when its ``start_at`` came; count its executions per
state (one grouped query); finish what is overdue (per-device timeout, deadline);
abort it when its abort rule holds; release the next executions its rate allows
(one transaction per batch: the action kind records what each device gets, the
executions become ``released``; publishing happens after the commit); complete it
when nothing is left to release or to wait for.

Restart safety: everything is in the DB. A kill -9 between the commit and the
publish leaves commands ``queued``, which the command tracker republishes (same
ids) when it connects; a kill before the commit releases nothing, and the next run
releases the same executions with the same ids (uuid5 of job and device). The rate
limit also holds across restarts: besides the in-memory token bucket (smooth
pacing), no more than the rate is released in any 60 s, counted in the DB.

One runner per registry deployment (as the tracker): replicas would double the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry.job_actions import ActionKind
from device_registry.lease import Deposed
from device_registry.models import Device
from device_registry.models_jobs import ExecutionStatus, JobExecution, JobRow, JobStatus
from device_registry.models_rules import CommandRow, CommandStatus
from device_registry.schemas_jobs import AbortRule, JobCounts, Rollout
from iotfleet.settings import JobsSettings

log = logging.getLogger("registry.jobs")

ACTIVE = [JobStatus.scheduled.value, JobStatus.in_progress.value]
MAX_ACTIVE_JOBS = 100  # stepped per round; more wait for a slot (oldest first)
PENDING = ("queued", "sent", "delivered")
FAILED = ("failed", "expired")


def now() -> datetime:
    return datetime.now(UTC)


# What an execution shows: its command's state once it has one; "released" without a command is in flight.
execution_state = func.coalesce(
    CommandRow.status,
    case(
        (JobExecution.status == ExecutionStatus.released.value, CommandStatus.sent.value),
        else_=JobExecution.status,
    ),
)


@dataclass
class Tally:
    counts: JobCounts
    unreleased: int
    released: int
    released_last_minute: int = 0

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Tally:
        return cls(JobCounts.model_validate(summary["counts"]), 0, int(summary["released"]))

    def summary(self) -> dict[str, Any]:
        return {"counts": self.counts.model_dump(), "released": self.released}

    @property
    def finished(self) -> int:
        c = self.counts
        return c.succeeded + c.failed + c.expired

    @property
    def failed(self) -> int:
        return self.counts.failed + self.counts.expired

    @property
    def pending(self) -> int:
        """Released and not finished."""
        c = self.counts
        return c.queued + c.sent + c.delivered - self.unreleased


async def progress(session: AsyncSession, jobs: Sequence[JobRow]) -> dict[str, Tally]:
    """Each job's tally: its frozen summary once settled, else counted (one query for all the others)."""
    settled = {job.id: Tally.from_summary(job.summary) for job in jobs if job.summary is not None}
    counted = await tally(session, [job.id for job in jobs if job.summary is None])
    return {**settled, **counted}


async def tally(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, Tally]:
    """Counts per state of the jobs' executions: one grouped query (an index range per job)."""
    if not job_ids:
        return {}
    stmt = (
        select(
            JobExecution.job_id,
            JobExecution.status,
            execution_state,
            func.count(),
            func.count(JobExecution.released_at),
        )
        .outerjoin(CommandRow, CommandRow.id == JobExecution.command_id)
        .where(JobExecution.job_id.in_(list(job_ids)))
        .group_by(JobExecution.job_id, JobExecution.status, execution_state)
    )
    raw: dict[str, dict[str, int]] = {job_id: {} for job_id in job_ids}
    tallies = {job_id: Tally(JobCounts(), 0, 0) for job_id in job_ids}
    for job_id, own, state, count, released in (await session.execute(stmt)).all():
        raw[job_id][state] = raw[job_id].get(state, 0) + count
        if own == ExecutionStatus.queued.value:
            tallies[job_id].unreleased += count
        tallies[job_id].released += released
    for job_id, states in raw.items():
        tallies[job_id].counts = JobCounts(**{k: v for k, v in states.items() if k in JobCounts.model_fields})
    return tallies


def abort_reason(rule: AbortRule | None, tally: Tally) -> str | None:
    if rule is None or tally.finished < rule.min_finished:
        return None
    pct = 100.0 * tally.failed / tally.finished
    if pct > rule.failure_pct:
        return (
            f"aborted: {tally.failed} of {tally.finished} finished executions failed ({pct:.1f} % >"
            f" {rule.failure_pct:g} %)"
        )
    return None


@dataclass
class _Bucket:
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)


class JobRunner:
    def __init__(
        self,
        settings: JobsSettings,
        sessions: async_sessionmaker[AsyncSession],
        kinds: Mapping[str, ActionKind],
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.kinds = kinds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buckets: dict[str, _Bucket] = {}
        self.fence: Callable[[AsyncSession], Awaitable[None]] | None = None
        """Raises ``lease.Deposed`` in a release transaction if this replica no longer holds the lease."""
        self.m_released = Counter(
            "registry_job_executions_released", "Job executions released to devices", registry=registry
        )
        self.m_jobs = Counter(
            "registry_jobs_finished", "Jobs finished, by outcome", ["status"], registry=registry
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def wake(self) -> None:
        """Step now (a job was created or canceled) instead of at the next tick."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.step_all()
            except Deposed as exc:
                log.warning("job rollout stopped: %s", exc)  # the lease's stop follows
                return
            except Exception:
                # The DB is down or locked: the jobs are where the DB says; try again shortly.
                log.exception("job rollout step failed; retrying")
                busy = False
                await asyncio.sleep(1.0)
            if busy:
                await asyncio.sleep(0)  # let API requests and the tracker in between batches
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.tick_s)
            self._wake.clear()

    async def step_all(self) -> bool:
        """Step every active job once; True when some job has more to release right away."""
        async with self.sessions() as session:
            jobs = list(
                (
                    await session.scalars(
                        select(JobRow)
                        .where(JobRow.status.in_(ACTIVE))
                        .order_by(JobRow.created_at, JobRow.id)
                        .limit(MAX_ACTIVE_JOBS)
                    )
                ).all()
            )
        busy = False
        for job in jobs:
            busy = await self.step(job) or busy
        await self.settle()
        live = {job.id for job in jobs}
        for job_id in [j for j in self._buckets if j not in live]:
            del self._buckets[job_id]
        return busy

    async def settle(self) -> None:
        """Freeze the counts of ended jobs whose executions can no longer change (none in flight)."""
        at = now()
        async with self.sessions() as session:
            ended = list(
                (
                    await session.scalars(
                        select(JobRow)
                        .where(JobRow.status.not_in(ACTIVE), JobRow.summary.is_(None))
                        .order_by(JobRow.completed_at)
                        .limit(MAX_ACTIVE_JOBS)
                    )
                ).all()
            )
        for job in ended:
            if at >= job.deadline:  # what a canceled/aborted job left in flight expires with it
                async with self.sessions() as session, session.begin():
                    await self.kinds[job.action_kind].overdue(session, job, at, True)
            async with self.sessions() as session, session.begin():
                counted = (await tally(session, [job.id]))[job.id]
                if counted.pending == 0:
                    await session.execute(
                        update(JobRow).where(JobRow.id == job.id).values(summary=counted.summary())
                    )

    async def step(self, job: JobRow) -> bool:
        at = now()
        if job.status == JobStatus.scheduled.value:
            if job.start_at > at:
                return False
            if not await self._move(job, JobStatus.scheduled, JobStatus.in_progress, started_at=at):
                return False
            log.info("job %s started (%d executions)", job.id, job.total)
        kind = self.kinds[job.action_kind]
        deadline_passed = at >= job.deadline
        if deadline_passed or job.timeout_s is not None:
            async with self.sessions() as session, session.begin():
                await kind.overdue(session, job, at, deadline_passed)
        if deadline_passed:
            await self._close(job, JobStatus.completed, ExecutionStatus.expired, "the deadline passed")
            return False
        async with self.sessions() as session:
            current = (await tally(session, [job.id]))[job.id]
        reason = abort_reason(AbortRule.model_validate(job.abort) if job.abort else None, current)
        if reason is not None:
            await self._close(job, JobStatus.aborted, ExecutionStatus.canceled, reason)
            return False
        if current.unreleased == 0:
            if current.pending == 0:
                await self._close(job, JobStatus.completed, None, None)
            return False
        if not kind.ready():
            return False
        rollout = Rollout.model_validate(job.rollout)
        allowance = await self._allowance(job, rollout, current.counts.succeeded, at)
        if allowance <= 0:
            return False
        batch = min(allowance, self.settings.release_batch)
        released = await self._release(job, kind, batch)
        bucket = self._buckets.get(job.id)
        if bucket is not None:
            bucket.tokens -= released
        return released == batch and current.unreleased > released

    async def _allowance(self, job: JobRow, rollout: Rollout, succeeded: int, at: datetime) -> int:
        rate = rollout.rate(succeeded)
        if rate is None:
            return self.settings.release_batch
        per_s = rate / 60.0
        bucket = self._buckets.setdefault(job.id, _Bucket())
        mono = time.monotonic()
        # Capacity: one tick's worth plus one, so pacing keeps the rate without bursting past it.
        bucket.tokens = min(bucket.tokens + per_s * (mono - bucket.at), per_s * self.settings.tick_s + 1.0)
        bucket.at = mono
        allowance = int(bucket.tokens)
        if allowance <= 0:
            return 0
        async with self.sessions() as session:
            recent = await session.scalar(
                select(func.count()).where(
                    JobExecution.job_id == job.id, JobExecution.released_at > at - timedelta(seconds=60)
                )
            )
        return min(allowance, int(rate) - int(recent or 0))

    async def _release(self, job: JobRow, kind: ActionKind, limit: int) -> int:
        async with kind.guard():
            return await self._release_guarded(job, kind, limit)

    async def _release_guarded(self, job: JobRow, kind: ActionKind, limit: int) -> int:
        at = now()
        async with self.sessions() as session, session.begin():
            # Still running? (Also takes the job's row lock first: a concurrent cancel waits for this batch.)
            still = await session.execute(
                update(JobRow)
                .where(JobRow.id == job.id, JobRow.status == JobStatus.in_progress.value)
                .values(status=JobStatus.in_progress.value)
            )
            if not _rowcount(still):
                return 0
            if self.fence is not None:  # a deposed lease holder releases nothing
                await self.fence(session)
            rows = (
                await session.execute(
                    select(JobExecution.device_id, Device.type, Device.enabled)
                    .outerjoin(Device, Device.id == JobExecution.device_id)
                    .where(JobExecution.job_id == job.id, JobExecution.status == ExecutionStatus.queued.value)
                    .order_by(JobExecution.device_id)
                    .limit(limit)
                )
            ).all()
            ready = [r.device_id for r in rows if r.type == job.device_type and r.enabled]
            gone = [r.device_id for r in rows if not (r.type == job.device_type and r.enabled)]
            released = await kind.release(session, job, ready, at)
            changes: list[dict[str, Any]] = [
                {
                    "job_id": job.id,
                    "device_id": device_id,
                    "status": ExecutionStatus.released.value,
                    "command_id": command_id,
                    "released_at": at,
                }
                for device_id, command_id in released.command_ids.items()
                if device_id not in released.finished
            ]
            changes += [
                {
                    "job_id": job.id,
                    "device_id": device_id,
                    "status": outcome.value,
                    "released_at": at,
                    "detail": detail,
                }
                for device_id, (outcome, detail) in released.finished.items()
            ]
            changes += [
                {
                    "job_id": job.id,
                    "device_id": device_id,
                    "status": ExecutionStatus.failed.value,
                    "detail": "the device was deleted or disabled before its turn",
                }
                for device_id in gone
            ]
            if changes:
                await session.execute(update(JobExecution), changes)
        released.after_commit()
        self.m_released.inc(len(released.command_ids))
        return len(rows)

    async def _move(self, job: JobRow, old: JobStatus, new: JobStatus, **values: Any) -> bool:
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(JobRow)
                .where(JobRow.id == job.id, JobRow.status == old.value)
                .values(status=new.value, **values)
            )
        if _rowcount(result):
            job.status = new.value
            for key, value in values.items():
                setattr(job, key, value)
            return True
        return False

    async def _close(
        self, job: JobRow, status: JobStatus, unreleased_to: ExecutionStatus | None, detail: str | None
    ) -> None:
        await close_job(self.sessions, job.id, status, unreleased_to, detail)
        self.m_jobs.labels(status.value).inc()
        self._buckets.pop(job.id, None)
        log.info("job %s %s%s", job.id, status.value, f": {detail}" if detail else "")


async def close_job(
    sessions: async_sessionmaker[AsyncSession],
    job_id: str,
    status: JobStatus,
    unreleased_to: ExecutionStatus | None,
    detail: str | None,
) -> bool:
    """End an active job (completed, canceled, aborted); its unreleased executions become ``unreleased_to``.

    False when the job was not active any more (another request or step ended it first).
    """
    at = now()
    async with sessions() as session, session.begin():
        result = await session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status.in_(ACTIVE))
            .values(status=status.value, completed_at=at, detail=detail)
        )
        if not _rowcount(result):
            return False
        if unreleased_to is not None:
            await session.execute(
                update(JobExecution)
                .where(JobExecution.job_id == job_id, JobExecution.status == ExecutionStatus.queued.value)
                .values(status=unreleased_to.value)
                .execution_options(synchronize_session=False)
            )
    return True


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
