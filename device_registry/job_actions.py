"""What a job does to each device: one class per action kind, the rollout engine knows none of them.

An action kind (the single key of a job's ``action``) provides:

- ``ready()``: whether releasing can reach devices now (the rollout waits while not);
- ``validate(device_type, spec)`` at creation: the normalised spec to store, or a
  422 ``Problem`` (the command kind reuses the single-device command check);
- ``release(session, job, device_ids, at)`` inside the runner's transaction that marks
  those executions released: create what each device needs and return its
  ``Released`` (per-device ``command_id`` or None, plus an ``after_commit`` hook that
  may publish — never before the commit, so a crash in between leaves nothing sent
  that the DB does not know);
- ``overdue(session, job, at, deadline_passed)`` each step: finish executions past
  the per-device timeout, or all unfinished ones when the deadline passed.

- ``guard()``: an async context the runner holds around the release transaction AND its
  ``after_commit`` (the desired-state kind takes the shadow's lock there: commit order is
  publish order, and no report interleaves with the batch).

A kind whose executions are command rows sets ``command_id``; the command tracker
then drives their state. A kind without commands returns ``command_id=None`` and
moves ``job_executions.status`` itself (``released`` → ``succeeded``/``failed``/``expired``);
executions it finishes in ``release`` itself go into ``Released.finished``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Table, and_, bindparam, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry.command_tracker import CommandTracker
from device_registry.device_state import (
    CHUNK,
    NoStateError,
    PatchError,
    Shadow,
    ShadowService,
    set_desired_many,
    validate_patch,
)
from device_registry.models import Device
from device_registry.models_jobs import ExecutionStatus, JobExecution, JobRow
from device_registry.models_rules import CommandRow, CommandStatus
from device_registry.problems import Problem
from device_registry.routers.commands import validated_args

# Command ids of executions are uuid5(job id, device id): the same execution always has the same id.
_NAMESPACE = uuid.UUID("5b0e8a59-4c1b-4d52-9a2f-6f1f3c8b2e10")


def execution_command_id(job_id: str, device_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{job_id}/{device_id}"))


@dataclass
class Released:
    command_ids: dict[str, str | None]
    after_commit: Callable[[], None] = field(default=lambda: None)
    finished: dict[str, tuple[ExecutionStatus, str | None]] = field(default_factory=dict)
    """Executions (of ``command_ids``) already finished at release: device id → (status, detail)."""


class ActionKind(Protocol):
    name: str

    def validate(self, device_type: str, spec: dict[str, Any]) -> dict[str, Any]: ...

    def ready(self) -> bool:
        """False while releasing would reach nobody (e.g. the broker link is down): the rollout waits."""
        ...

    def guard(self) -> AbstractAsyncContextManager[object]:
        """Held by the runner around a release's transaction and its ``after_commit``."""
        ...

    async def release(
        self, session: AsyncSession, job: JobRow, device_ids: Sequence[str], at: datetime
    ) -> Released: ...

    async def overdue(
        self, session: AsyncSession, job: JobRow, at: datetime, deadline_passed: bool
    ) -> None: ...


def _released_commands(job_id: str) -> Any:
    return select(JobExecution.command_id).where(
        JobExecution.job_id == job_id,
        JobExecution.status == ExecutionStatus.released.value,
        JobExecution.command_id.is_not(None),
    )


class CommandKind:
    """``{"command": {"name", "args"}}``: each execution is an operator command with a stable id."""

    name = "command"

    def __init__(self, tracker: CommandTracker | None) -> None:
        self.tracker = tracker  # None: validation only (the API), no releasing

    def ready(self) -> bool:
        # Released while the tracker's link is down, commands would pile up in paho's memory and
        # count against the rate without reaching anyone; they wait in the DB instead.
        return self.tracker is not None and self.tracker.connected.is_set()

    def guard(self) -> AbstractAsyncContextManager[object]:
        return contextlib.nullcontext()

    def validate(self, device_type: str, spec: dict[str, Any]) -> dict[str, Any]:
        args = validated_args(device_type, spec["name"], spec.get("args") or {}, field="body.action.command")
        return {"name": spec["name"], "args": args}

    async def release(
        self, session: AsyncSession, job: JobRow, device_ids: Sequence[str], at: datetime
    ) -> Released:
        spec = job.action[self.name]
        ttl_s = max(1, int((job.deadline - at).total_seconds()))
        rows = [
            CommandRow(
                id=execution_command_id(job.id, device_id),
                device_id=device_id,
                device_type=job.device_type,
                name=spec["name"],
                args=spec["args"],
                status=CommandStatus.queued.value,
                source=f"job:{job.id}",
                requested_by=job.created_by,
                ttl_s=ttl_s,
                created_at=at,
                expires_at=job.deadline,
            )
            for device_id in device_ids
        ]
        session.add_all(rows)
        await session.flush()
        tracker = self.tracker

        def publish() -> None:
            # After the commit. A crash before the PUBACK leaves them queued: the tracker
            # republishes queued commands (same ids) when it connects again.
            if tracker is not None:
                for row in rows:
                    tracker.publish_command(row)

        return Released({row.device_id: row.id for row in rows}, publish)

    async def overdue(self, session: AsyncSession, job: JobRow, at: datetime, deadline_passed: bool) -> None:
        unfinished = [CommandStatus.queued.value, CommandStatus.sent.value, CommandStatus.delivered.value]
        if deadline_passed:
            await session.execute(
                update(CommandRow)
                .where(CommandRow.id.in_(_released_commands(job.id)), CommandRow.status.in_(unfinished))
                .values(
                    status=CommandStatus.expired.value, completed_at=at, detail="the job's deadline passed"
                )
                .execution_options(synchronize_session=False)
            )
        elif job.timeout_s is not None:
            await session.execute(
                update(CommandRow)
                .where(
                    CommandRow.id.in_(_released_commands(job.id)),
                    CommandRow.status == CommandStatus.delivered.value,
                    CommandRow.delivered_at < at - timedelta(seconds=job.timeout_s),
                )
                .values(
                    status=CommandStatus.failed.value,
                    completed_at=at,
                    detail=f"timed out: no result within {job.timeout_s} s of delivery",
                )
                .execution_options(synchronize_session=False)
            )


def _holds(reported: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    return all(reported.get(key) == value for key, value in fields.items())


class DesiredStateKind:
    """``{"desired_state": {"set": {...}}}``: merge the fields into each device's desired state.

    Release: ``set_desired_many`` in the runner's transaction (under the shadow's lock, see
    ``guard``), the deltas sent after the commit (the shadow's outbox: a crash in between
    leaves ``delta_pending`` rows that the shadow publishes when it starts). A device whose
    reported state already holds the fields succeeds at once; a refused or missing one fails.
    The others stay ``released`` until ``record_reports`` (a hook of the shadow's report
    consumer, same transaction as the report) sees them report every field, or ``overdue``
    fails (timeout) / expires (deadline) them. Idempotent across a kill -9: setting the same
    fields again changes nothing (no version bump, no second delta).
    """

    name = "desired_state"

    def __init__(self, shadow: ShadowService | None) -> None:
        self.shadow = shadow  # None: validation only (the API), no releasing

    def ready(self) -> bool:
        # Released while the shadow's link is down, the deltas would wait in the outbox while the
        # rate counts them as sent: they wait unreleased instead (as commands do).
        return self.shadow is not None and self.shadow.connected.is_set()

    def guard(self) -> AbstractAsyncContextManager[object]:
        return self.shadow.lock if self.shadow is not None else contextlib.nullcontext()

    def validate(self, device_type: str, spec: dict[str, Any]) -> dict[str, Any]:
        where = "body.action.desired_state"
        fields = spec.get("set") or {}
        nulls = sorted(key for key, value in fields.items() if value is None)
        if nulls:
            raise Problem(
                422,
                f"a job sets desired fields; it cannot remove them (null: {', '.join(nulls[:5])})",
                slug="validation",
                errors=[
                    {"field": f"{where}.set.{key}", "message": "may not be null", "type": "value_error"}
                    for key in nulls[:20]
                ],
            )
        try:
            checked = validate_patch(device_type, fields)
        except NoStateError as exc:
            raise Problem(
                422,
                str(exc),
                slug="validation",
                errors=[{"field": where, "message": str(exc), "type": "value_error"}],
            ) from None
        except PatchError as exc:
            errors = [{**e, "field": f"{where}.set.{e['field']}"} for e in exc.errors]
            raise Problem(422, str(exc), slug="validation", errors=errors) from None
        return {"set": checked}

    async def release(
        self, session: AsyncSession, job: JobRow, device_ids: Sequence[str], at: datetime
    ) -> Released:
        fields = job.action[self.name]["set"]
        batch = await set_desired_many(session, device_ids, fields, source=f"job:{job.id}")
        finished: dict[str, tuple[ExecutionStatus, str | None]] = {}
        for device_id in batch.converged:
            finished[device_id] = (ExecutionStatus.succeeded, "the reported state already held it")
        for device_id in batch.missing:
            finished[device_id] = (ExecutionStatus.failed, "the device was deleted before its turn")
        for device_id, reason in batch.refused.items():
            finished[device_id] = (ExecutionStatus.failed, reason[:500])
        shadow, outbox = self.shadow, batch.outbox

        def publish() -> None:
            # After the commit and still under the shadow's lock (the runner's guard).
            if shadow is not None and outbox:
                shadow.send_committed(outbox)

        return Released(dict.fromkeys(device_ids), publish, finished)

    async def overdue(self, session: AsyncSession, job: JobRow, at: datetime, deadline_passed: bool) -> None:
        waiting = and_(
            JobExecution.job_id == job.id,
            JobExecution.status == ExecutionStatus.released.value,
            JobExecution.command_id.is_(None),
        )
        if deadline_passed:
            await session.execute(
                update(JobExecution)
                .where(waiting)
                .values(
                    status=ExecutionStatus.expired.value,
                    detail="the job's deadline passed before the device reported the desired state"
                    " (it stays desired)",
                )
                .execution_options(synchronize_session=False)
            )
        elif job.timeout_s is not None:
            cutoff = at - timedelta(seconds=job.timeout_s)
            # Online since before the cutoff: the retained delta reached it at least timeout_s ago.
            online_long = exists().where(
                Device.id == JobExecution.device_id, Device.online.is_(True), Device.connected_since < cutoff
            )
            await session.execute(
                update(JobExecution)
                .where(waiting, JobExecution.released_at < cutoff, online_long)
                .values(
                    status=ExecutionStatus.failed.value,
                    detail=f"timed out: online for {job.timeout_s} s without reporting the desired state",
                )
                .execution_options(synchronize_session=False)
            )


async def record_reports(session: AsyncSession, reported: Mapping[str, Shadow]) -> int:
    """The shadow's report hook: executions of desired-state jobs whose device now reports every field
    succeed, in the report's transaction. Per batch: one query for the jobs that may still wait (not
    settled), then per such job one indexed query per chunk of devices, and one executemany."""
    if not reported:
        return 0
    jobs = (
        await session.execute(
            select(JobRow.id, JobRow.action).where(
                JobRow.action_kind == DesiredStateKind.name, JobRow.summary.is_(None)
            )
        )
    ).all()
    if not jobs:
        return 0
    ids = list(reported)
    done: list[dict[str, Any]] = []
    for job_id, action in jobs:
        fields = action[DesiredStateKind.name]["set"]
        for start in range(0, len(ids), CHUNK):
            waiting = await session.scalars(
                select(JobExecution.device_id).where(
                    JobExecution.job_id == job_id,
                    JobExecution.status == ExecutionStatus.released.value,
                    JobExecution.device_id.in_(ids[start : start + CHUNK]),
                )
            )
            done += [
                {"b_job": job_id, "b_device": device_id}
                for device_id in waiting
                if _holds(reported[device_id].reported, fields)
            ]
    if done:
        table = cast(Table, JobExecution.__table__)  # Core executemany (not the ORM's bulk by key)
        stmt = (
            update(table)
            .where(
                table.c.job_id == bindparam("b_job"),
                table.c.device_id == bindparam("b_device"),
                table.c.status == ExecutionStatus.released.value,
            )
            .values(status=ExecutionStatus.succeeded.value, detail=None)
        )
        for start in range(0, len(done), CHUNK):
            await session.execute(stmt, done[start : start + CHUNK])
    return len(done)


def action_kinds(
    tracker: CommandTracker | None, shadow: ShadowService | None = None
) -> dict[str, ActionKind]:
    """Every action kind by its key (add new kinds here)."""
    kinds: list[ActionKind] = [CommandKind(tracker), DesiredStateKind(shadow)]
    return {kind.name: kind for kind in kinds}
