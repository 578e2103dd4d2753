"""API shapes of jobs: ``JobCreate`` (input), ``JobRead`` / ``JobExecutionRead`` (output).

A job's ``action`` is a discriminated union keyed by its one property
(``{"command": {...}}`` or ``{"desired_state": {"set": {...}}}``); ``job_actions`` maps
each key to the code that validates and releases it, so a new kind is one model here plus
one class there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from device_registry.schemas import DeviceId, DeviceTypeName, Tags

MAX_TARGET_IDS = 10_000


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- action: one key naming its kind ----------------------------------------------------------


class CommandSpec(_Input):
    name: Annotated[str, Field(min_length=1, max_length=64, description="A command of the device type")]
    args: dict[str, Any] = Field(
        default_factory=dict, description="Validated against the type's command model, as for one device"
    )


class CommandAction(_Input):
    """Send one command to every targeted device (each execution is a tracked command)."""

    command: CommandSpec


class DesiredStateSpec(_Input):
    set: dict[str, Any] = Field(
        min_length=1,
        max_length=64,
        description="Fields of the device type's state model and their values, merged into each device's"
        " desired state (checked against the model at creation: 422 naming the field). Values may not be"
        " null (a job sets fields; it does not remove them)",
        examples=[{"mode": "eco"}],
    )


class DesiredStateAction(_Input):
    """Set fields of every targeted device's desired state (device shadow).

    An execution succeeds when the device REPORTS every field with the value set (at
    once if its reported state already holds them); it fails when the device's type
    refuses the state or the device is gone, or when ``timeout_s`` passes after its
    release while the device is online without reporting it; it expires at the
    deadline. Cancel stops releasing: desired states already set stay set (and their
    devices may still converge) — cancel does not roll anything back.
    """

    desired_state: DesiredStateSpec


def _action_kind(value: Any) -> str | None:
    # The kind is the object's single key; anything else fails as "no matching kind".
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


# Add a kind: one more `| Annotated[XAction, Tag("x")]` member (and a class in job_actions).
JobAction = Annotated[
    Annotated[CommandAction, Tag("command")] | Annotated[DesiredStateAction, Tag("desired_state")],
    Discriminator(
        _action_kind,
        custom_error_type="action_kind",
        custom_error_message="action must be an object with exactly one key naming its kind:"
        " command or desired_state",
    ),
]


# --- target, rollout, abort ---------------------------------------------------------------------


class JobTarget(_Input):
    """Which devices: every given criterion must hold (AND); the same filters as the device list.

    There are no stored "saved queries": a target *is* the query (device-list filters),
    kept with the job; the devices it matches when the job is created get executions.
    """

    device_ids: list[DeviceId] | None = Field(
        None, min_length=1, max_length=MAX_TARGET_IDS, description="Exactly these devices"
    )
    device_type: DeviceTypeName | None = Field(
        None, description="Devices of this type (also the type the command is validated against)"
    )
    tags: Tags | None = Field(None, description="Registry tags: all must match (key=value)")
    q: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None, description="Substring of the id or name"
    )
    online: bool | None = Field(None, description="Only devices online (true) / offline (false) right now")

    @model_validator(mode="after")
    def _some_criterion(self) -> JobTarget:
        if self.device_ids is None and self.device_type is None and not self.tags and self.q is None:
            raise ValueError("name at least one of device_ids, device_type, tags, q")
        return self


class Rollout(_Input):
    max_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="Executions released per minute at most; null: unthrottled"
    )
    increase_by_factor: float | None = Field(
        None, gt=1, le=10, description="Multiply the rate by this after every `every_n_succeeded` successes"
    )
    every_n_succeeded: int | None = Field(None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _growth_complete(self) -> Rollout:
        growth = (self.increase_by_factor is None, self.every_n_succeeded is None)
        if growth[0] != growth[1]:
            raise ValueError("increase_by_factor and every_n_succeeded go together")
        if self.increase_by_factor is not None and self.max_per_minute is None:
            raise ValueError("a growing rollout needs max_per_minute to start from")
        return self

    def rate(self, succeeded: int) -> float | None:
        """Executions per minute allowed now, or None when unthrottled."""
        if self.max_per_minute is None:
            return None
        if self.increase_by_factor is None or self.every_n_succeeded is None:
            return float(self.max_per_minute)
        steps = min(succeeded // self.every_n_succeeded, 200)  # bounded: factor**steps stays finite
        return min(self.max_per_minute * self.increase_by_factor**steps, 1_000_000.0)


class AbortRule(_Input):
    failure_pct: float = Field(gt=0, le=100, description="Abort when more than this % of finished failed")
    min_finished: int = Field(1, ge=1, le=1_000_000, description="…once at least this many finished")


class JobCreate(_Input):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    action: JobAction = Field(
        description="What each device gets, an object with one key naming its kind:"
        ' `{"command": {"name": "set_mode", "args": {"mode": "eco"}}}` (a tracked command per device) or'
        ' `{"desired_state": {"set": {"mode": "eco"}}}` (fields merged into each device\'s desired state;'
        " an execution succeeds when the device reports them)",
        examples=[
            {"command": {"name": "set_mode", "args": {"mode": "eco"}}},
            {"desired_state": {"set": {"mode": "eco", "setpoint_c": 19.5}}},
        ],
    )
    target: JobTarget
    rollout: Rollout = Field(default_factory=Rollout)
    abort: AbortRule | None = Field(
        None,
        description="Failed = failed, expired or timed out; on abort the executions not yet released are canceled",
    )
    timeout_s: int | None = Field(
        None,
        ge=1,
        le=30 * 86_400,
        description="Per device: a device that said `delivered`/`received` and gives no result within"
        " this is failed (timed out); for desired_state, a device online for this long since its release"
        " (or since it came back) that has not reported the state. Devices offline are bounded by the deadline",
    )
    start_at: datetime | None = Field(None, description="Schedule: release nothing before (default: now)")
    deadline: datetime | None = Field(
        None,
        description="Nothing is released after it; unfinished executions expire then; devices offline until"
        " then never get the command (MQTT message expiry; a desired state set stays desired)."
        " Default: start + IOTFLEET_JOBS__DEFAULT_DEADLINE_S",
    )

    @model_validator(mode="after")
    def _aware(self) -> JobCreate:
        for name in ("start_at", "deadline"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (e.g. 2026-12-01T10:00:00Z)")
        return self


# --- output -------------------------------------------------------------------------------------


class JobCounts(BaseModel):
    """Executions per state (command lifecycle, plus `canceled`)."""

    queued: int = Field(0, description="Not yet released, or released and not yet accepted by the broker")
    sent: int = Field(
        0,
        description="Commands the broker accepted; desired-state executions released and waiting for the"
        " device to report the state",
    )
    delivered: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    canceled: int = 0


class JobRead(BaseModel):
    id: str
    name: str | None
    status: str = Field(description="scheduled, in_progress, completed, canceled or aborted")
    device_type: str
    action: dict[str, Any]
    target: dict[str, Any]
    rollout: dict[str, Any]
    abort: dict[str, Any] | None
    timeout_s: int | None
    total: int = Field(description="Executions (devices the target matched at creation)")
    counts: JobCounts
    released: int = Field(description="Executions handed to devices so far")
    current_rate: float | None = Field(description="Executions per minute allowed now (null: unthrottled)")
    start_at: datetime
    deadline: datetime
    created_by: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    detail: str | None = Field(description="Why it ended (abort reason, deadline) when it did")


class JobPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


class JobExecutionRead(BaseModel):
    device_id: str
    status: str = Field(description="queued, sent, delivered, succeeded, failed, expired or canceled")
    command_id: str | None = Field(description="The execution's command (GET /api/v1/commands/{id})")
    released_at: datetime | None
    sent_at: datetime | None
    completed_at: datetime | None
    detail: str | None


class JobExecutionPage(BaseModel):
    items: list[JobExecutionRead]
    next_cursor: str | None
