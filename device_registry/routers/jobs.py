"""Jobs: one action (a command, or a desired state) to many devices, rolled out at a bounded rate.

``POST /api/v1/jobs`` validates the action against the device type (the same
check as a single command, or the type's state model), resolves the target with the device-list filters and
records one ``queued`` execution per matching enabled device, in one statement
(INSERT … SELECT: no per-device work in the request). The rollout
(``device_registry.job_runner``) releases them; each released execution of a
command job is a command with the usual lifecycle (``GET /api/v1/commands/{id}``);
one of a desired-state job succeeds when the device reports the state.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, status
from sqlalchemy import Select, String, and_, func, insert, literal, or_, select

from device_registry.deps import CurrentOperator, CurrentViewer, SessionDep, SettingsDep
from device_registry.job_actions import action_kinds, record_reports
from device_registry.job_runner import JobRunner, Tally, close_job, execution_state, progress
from device_registry.models import Device
from device_registry.models_jobs import ExecutionStatus, JobExecution, JobRow, JobStatus
from device_registry.models_rules import CommandRow
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound, Problem
from device_registry.routers.device_state import STATE_ATTR as SHADOW_ATTR
from device_registry.routers.devices import filter_devices
from device_registry.rules_runtime import STATE_ATTR as TRACKER_ATTR
from device_registry.schemas_jobs import (
    JobCounts,
    JobCreate,
    JobExecutionPage,
    JobExecutionRead,
    JobPage,
    JobRead,
    JobTarget,
    Rollout,
)
from device_registry.schemas_rules import decode_cursor, encode_cursor

RUNNER_ATTR = "job_runner"
VALIDATORS = action_kinds(None)
EXECUTION_STATES = "queued, sent, delivered, succeeded, failed, expired or canceled"


@asynccontextmanager
async def runner_lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Router lifespans nest in inclusion order (module names): the commands router's tracker is up.
    tracker = getattr(app.state, TRACKER_ATTR, None)
    if tracker is None:
        raise RuntimeError("the job runner needs the command tracker (commands router) started first")
    # The shadow (device_state router) is up too: desired-state jobs write through it, and its report
    # consumer tells them which devices reported the state.
    shadow = getattr(app.state, SHADOW_ATTR, None)
    if shadow is not None:
        shadow.report_hooks.append(record_reports)
    state = app.state.registry
    runner = JobRunner(state.settings.jobs, state.sessions, action_kinds(tracker, shadow), state.registry)
    runner.fence = state.lease.fence

    async def stop(_lost: bool) -> None:
        await runner.stop()

    # The rollout runs in the lease holder only (registered after the tracker and the shadow: it
    # starts after them and stops before them); any replica's API creates and cancels jobs.
    state.work.register("job runner", runner.start, stop)
    setattr(app.state, RUNNER_ATTR, runner)
    try:
        yield
    finally:
        setattr(app.state, RUNNER_ATTR, None)
        await runner.stop()
        if shadow is not None:
            shadow.report_hooks.remove(record_reports)


router = APIRouter(
    prefix="/api/v1/jobs", tags=["jobs"], responses=PROBLEM_RESPONSES, lifespan=runner_lifespan
)

JobIdPath = Annotated[str, Path(max_length=36, description="The job id")]


def _wake(request: Request) -> None:
    runner: JobRunner | None = getattr(request.app.state, RUNNER_ATTR, None)
    if runner is not None:
        runner.wake()


def _validation(field: str, detail: str) -> Problem:
    return Problem(
        422, detail, slug="validation", errors=[{"field": field, "message": detail, "type": "value_error"}]
    )


def _matching(target: JobTarget, device_type: str | None) -> Select[Any]:
    """Enabled devices matching the target (a disabled device cannot take a command)."""
    stmt = filter_devices(
        select(Device.id),
        type=device_type,
        online=target.online,
        enabled=True,
        tags=(target.tags or {}).items(),
        q=target.q,
    )
    if target.device_ids is not None:
        stmt = stmt.where(Device.id.in_(target.device_ids))
    return stmt


async def _resolve_type(session: SessionDep, target: JobTarget) -> str:
    if target.device_type is not None:
        return target.device_type
    types = (
        await session.scalars(
            select(Device.type).where(Device.id.in_(_matching(target, None))).distinct().limit(3)
        )
    ).all()
    if not types:
        raise _validation("body.target", "the target matches no enabled device")
    if len(types) > 1:
        raise _validation(
            "body.target.device_type",
            f"the target matches devices of several types ({', '.join(sorted(types))}); name device_type",
        )
    return types[0]


def job_read(job: JobRow, counted: Tally) -> JobRead:
    return JobRead(
        id=job.id,
        name=job.name,
        status=job.status,
        device_type=job.device_type,
        action=job.action,
        target=job.target,
        rollout=job.rollout,
        abort=job.abort,
        timeout_s=job.timeout_s,
        total=job.total,
        counts=counted.counts,
        released=counted.released,
        current_rate=Rollout.model_validate(job.rollout).rate(counted.counts.succeeded),
        start_at=job.start_at,
        deadline=job.deadline,
        created_by=job.created_by,
        created_at=job.created_at,
        started_at=job.started_at,
        completed_at=job.completed_at,
        detail=job.detail,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a job: one action for every device the target matches, rolled out at a bounded rate",
    responses={
        422: {"description": "Invalid action for the type, or a target matching no / too many devices"}
    },
)
async def create_job(
    body: JobCreate, request: Request, session: SessionDep, settings: SettingsDep, caller: CurrentOperator
) -> JobRead:
    at = datetime.now(UTC)
    start_at = max(body.start_at or at, at)
    deadline = body.deadline or start_at + timedelta(seconds=settings.jobs.default_deadline_s)
    if deadline <= start_at:
        raise _validation("body.deadline", "the deadline must be after the start (and in the future)")
    if deadline > start_at + timedelta(days=30):
        raise _validation("body.deadline", "the deadline may be at most 30 days after the start")
    [(kind_name, spec)] = body.action.model_dump(mode="json").items()
    target = body.target
    if target.device_ids is not None:
        known = set((await session.scalars(select(Device.id).where(Device.id.in_(target.device_ids)))).all())
        unknown = [d for d in target.device_ids if d not in known]
        if unknown:
            raise _validation(
                "body.target.device_ids", f"{len(unknown)} device(s) do not exist: {', '.join(unknown[:5])}"
            )
    device_type = await _resolve_type(session, target)
    action = {kind_name: VALIDATORS[kind_name].validate(device_type, spec)}
    matching = _matching(target, device_type)
    total = int(await session.scalar(select(func.count()).select_from(matching.subquery())) or 0)
    if total == 0:
        raise _validation("body.target", f"the target matches no enabled {device_type} device")
    if total > settings.jobs.max_targets:
        raise _validation(
            "body.target",
            f"the target matches {total} devices; a job may target {settings.jobs.max_targets}"
            " (IOTFLEET_JOBS__MAX_TARGETS): split it by tags",
        )
    job = JobRow(
        id=str(uuid.uuid4()),
        name=body.name,
        status=(JobStatus.scheduled if start_at > at else JobStatus.in_progress).value,
        device_type=device_type,
        action_kind=kind_name,
        action=action,
        target=target.model_dump(mode="json", exclude_none=True),
        rollout=body.rollout.model_dump(mode="json", exclude_none=True),
        abort=body.abort.model_dump(mode="json") if body.abort else None,
        timeout_s=body.timeout_s,
        total=total,
        start_at=start_at,
        deadline=deadline,
        created_by=caller.name,
        created_at=at,
        started_at=None if start_at > at else at,
    )
    session.add(job)
    await session.flush()
    # One statement, whatever the fleet size (devices deleted meanwhile simply are not there).
    await session.execute(
        insert(JobExecution).from_select(
            ["job_id", "device_id", "status"],
            select(literal(job.id, String), Device.id, literal(ExecutionStatus.queued.value, String)).where(
                Device.id.in_(matching)
            ),
        )
    )
    job.total = int(await session.scalar(select(func.count()).where(JobExecution.job_id == job.id)) or 0)
    await session.commit()
    _wake(request)
    return job_read(job, Tally(JobCounts(queued=job.total), job.total, 0))


@router.get("", summary="Jobs, newest first (cursor-paginated), with their progress")
async def list_jobs(
    session: SessionDep,
    _caller: CurrentViewer,
    status_: Annotated[
        JobStatus | None,
        Query(alias="status", description="scheduled, in_progress, completed, canceled or aborted"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> JobPage:
    stmt: Select[Any] = select(JobRow)
    if status_ is not None:
        stmt = stmt.where(JobRow.status == status_.value)
    if cursor:
        created, job_id = decode_cursor(cursor, 2)
        try:
            moment = datetime.fromisoformat(created)
        except ValueError:
            decode_cursor("!", 2)  # raises the standard invalid-cursor problem
            raise
        stmt = stmt.where(
            or_(JobRow.created_at < moment, and_(JobRow.created_at == moment, JobRow.id < job_id))
        )
    rows = list(
        (
            await session.scalars(stmt.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1))
        ).all()
    )
    page = rows[:limit]
    counted = await progress(session, page)
    next_cursor = encode_cursor(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > limit else None
    return JobPage(items=[job_read(job, counted[job.id]) for job in page], next_cursor=next_cursor)


async def _job(session: SessionDep, job_id: str) -> JobRow:
    job = await session.get(JobRow, job_id)
    if job is None:
        raise NotFound("job", job_id)
    return job


@router.get("/{job_id}", summary="A job and its progress: executions per state", responses={404: {}})
async def get_job(job_id: JobIdPath, session: SessionDep, _caller: CurrentViewer) -> JobRead:
    job = await _job(session, job_id)
    return job_read(job, (await progress(session, [job]))[job.id])


@router.get(
    "/{job_id}/executions",
    summary="A job's executions by device id (cursor-paginated), optionally in one state",
    responses={404: {}},
)
async def list_executions(
    job_id: JobIdPath,
    session: SessionDep,
    _caller: CurrentViewer,
    state: Annotated[
        str | None,
        Query(
            alias="status",
            pattern="^(queued|sent|delivered|succeeded|failed|expired|canceled)$",
            description=EXECUTION_STATES,
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> JobExecutionPage:
    await _job(session, job_id)
    stmt = (
        select(
            JobExecution.device_id,
            execution_state.label("state"),
            JobExecution.command_id,
            JobExecution.released_at,
            CommandRow.sent_at,
            CommandRow.completed_at,
            func.coalesce(CommandRow.detail, JobExecution.detail).label("detail"),
        )
        .outerjoin(CommandRow, CommandRow.id == JobExecution.command_id)
        .where(JobExecution.job_id == job_id)
    )
    if state is not None:
        stmt = stmt.where(execution_state == state)
    if cursor:
        [after] = decode_cursor(cursor, 1)
        stmt = stmt.where(JobExecution.device_id > after)
    rows = (await session.execute(stmt.order_by(JobExecution.device_id).limit(limit + 1))).all()
    items = [
        JobExecutionRead(
            device_id=r.device_id,
            status=r.state,
            command_id=r.command_id,
            released_at=r.released_at,
            sent_at=r.sent_at,
            completed_at=r.completed_at,
            detail=r.detail,
        )
        for r in rows[:limit]
    ]
    next_cursor = encode_cursor(items[-1].device_id) if len(rows) > limit else None
    return JobExecutionPage(items=items, next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel: stop the rollout; executions not yet released become canceled",
    responses={404: {}, 409: {"description": "The job already ended"}},
)
async def cancel_job(
    job_id: JobIdPath, request: Request, session: SessionDep, caller: CurrentOperator
) -> JobRead:
    await _job(session, job_id)
    await session.rollback()  # the cancel runs in its own transaction (and waits for a batch in flight)
    state = request.app.state.registry
    if not await close_job(
        state.sessions, job_id, JobStatus.canceled, ExecutionStatus.canceled, f"canceled by {caller.name}"
    ):
        job = await _job(session, job_id)
        raise Conflict(f"job {job_id!r} already ended ({job.status})", job_status=job.status)
    _wake(request)
    session.expire_all()
    job = await _job(session, job_id)
    return job_read(job, (await progress(session, [job]))[job.id])
