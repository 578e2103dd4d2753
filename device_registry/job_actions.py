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

A kind whose executions are command rows sets ``command_id``; the command tracker
then drives their state. A kind without commands returns ``command_id=None`` and
moves ``job_executions.status`` itself (``released`` → ``succeeded``/``failed``/``expired``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry.command_tracker import CommandTracker
from device_registry.models_jobs import ExecutionStatus, JobExecution, JobRow
from device_registry.models_rules import CommandRow, CommandStatus
from device_registry.routers.commands import validated_args

# Command ids of executions are uuid5(job id, device id): the same execution always has the same id.
_NAMESPACE = uuid.UUID("5b0e8a59-4c1b-4d52-9a2f-6f1f3c8b2e10")


def execution_command_id(job_id: str, device_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{job_id}/{device_id}"))


@dataclass
class Released:
    command_ids: dict[str, str | None]
    after_commit: Callable[[], None] = field(default=lambda: None)


class ActionKind(Protocol):
    name: str

    def validate(self, device_type: str, spec: dict[str, Any]) -> dict[str, Any]: ...

    def ready(self) -> bool:
        """False while releasing would reach nobody (e.g. the broker link is down): the rollout waits."""
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


def action_kinds(tracker: CommandTracker | None) -> dict[str, ActionKind]:
    """Every action kind by its key (add new kinds here)."""
    kinds: list[ActionKind] = [CommandKind(tracker)]
    return {kind.name: kind for kind in kinds}
