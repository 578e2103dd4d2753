"""Rules as data: pure pydantic models, validated against the device-type catalogue.

A rule is JSON an operator writes (through the registry API) and the engine
evaluates; nothing in it is ever ``eval``-ed. The public shape::

    {"name": "thermostat-overheat",
     "scope": {"device_type": "thermostat"},
     "when": {"field": "temperature_c", "op": ">", "value": 30, "for": "10s"},
     "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
     "then": [{"command": "set_mode", "args": {"mode": "cool"}},
              {"alert": {"severity": "major", "message": "overheating"}}],
     "cooldown": "60s"}

Actions: a command (``command`` + ``args``), an alert, or a change of the
desired state (``{"set_desired": {"mode": "eco"}}``: a JSON merge patch of the
device shadow, validated against the target type's state model).

Conditions (``when``/``clear_when``) are one of: a field condition (threshold,
optionally held ``for`` a duration, over a windowed aggregate ``agg``+``window``,
or a rate of change ``rate_per``), ``{"absent_for": …}``, ``{"presence":
"offline"|"online"}``, or ``{"all": […]}``/``{"any": […]}`` of conditions.
A schedule rule has ``schedule`` (cron + time zone) instead of ``when``.

The registry validates rules with these models (422 on error) and the engine
parses what the registry serves with the same models, so both agree on meaning.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from iotfleet.catalogue import DEVICE_TYPES, DeviceType, get_device_type
from iotfleet.errors import UnknownDeviceTypeError
from iotfleet.json_limits import json_depth
from iotfleet.topics import DEVICE_ID_PATTERN

# --- durations -----------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_DURATION_MS = 30 * 86_400_000


def duration_ms(text: str) -> int:
    """'10s' → 10000. Units: ms, s, m, h, d. Raises ValueError on anything else."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), e.g. '10s'")
    value = int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    if value > MAX_DURATION_MS:
        raise ValueError(f"duration {text!r} is longer than 30 days")
    return value


def _check_duration(text: str) -> str:
    duration_ms(text)
    return text.strip()


Duration = Annotated[str, AfterValidator(_check_duration)]
"""A positive duration as text: '500ms', '10s', '5m', '1h', '1d'."""

Number = StrictInt | StrictFloat
Scalar = StrictBool | StrictInt | StrictFloat | StrictStr


class _Model(BaseModel):
    # Unknown keys are errors: a typo ("fro" for "for") must not silently change meaning.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# --- conditions ----------------------------------------------------------------

ORDER_OPS = (">", ">=", "<", "<=")
EQUALITY_OPS = ("==", "!=")
RANGE_OPS = ("between", "outside")
Op = Literal[">", ">=", "<", "<=", "==", "!=", "between", "outside"]
Agg = Literal["mean", "min", "max", "sum", "count"]


class FieldCondition(_Model):
    """A comparison on one reading field, of its value, a windowed aggregate, or its rate of change."""

    field: str = Field(description="A measured field of the scope's device type")
    op: Op
    value: Scalar | list[Number] = Field(
        description="Number (or bool/string for == and !=); [low, high] for between/outside (inclusive)"
    )
    for_: Duration | None = Field(
        None, alias="for", description="The comparison must hold continuously this long (reading time)"
    )
    agg: Agg | None = Field(None, description="Compare an aggregate over the sliding `window` instead")
    window: Duration | None = None
    rate_per: Duration | None = Field(
        None, description="Compare the change per this duration between consecutive readings"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FieldCondition:
        if self.op in RANGE_OPS:
            if not isinstance(self.value, list) or len(self.value) != 2:
                raise ValueError(f"op {self.op!r} needs value [low, high]")
            if self.value[0] > self.value[1]:
                raise ValueError(f"op {self.op!r}: low {self.value[0]} is above high {self.value[1]}")
        elif isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a single value, not a list")
        elif self.op in ORDER_OPS and not _is_number(self.value):
            raise ValueError(f"op {self.op!r} needs a number")
        if (self.agg is None) != (self.window is None):
            raise ValueError("agg and window go together")
        if self.rate_per is not None and self.agg is not None:
            raise ValueError("a condition is either a rate (rate_per) or an aggregate (agg), not both")
        if (self.agg is not None or self.rate_per is not None) and not (
            _is_number(self.value) or self.op in RANGE_OPS
        ):
            raise ValueError("aggregates and rates compare to numbers")
        return self


class AbsentCondition(_Model):
    """True when the device sent no reading for the duration (checked on a schedule)."""

    absent_for: Duration


class PresenceCondition(_Model):
    """True while the registry's presence of the device (``iotfleet/presence/{type}/{id}``) is the
    given one, optionally for a duration."""

    presence: Literal["online", "offline"]
    for_: Duration | None = Field(None, alias="for")


class AllCondition(_Model):
    all: list[Condition] = Field(min_length=1, max_length=32)


class AnyCondition(_Model):
    any: list[Condition] = Field(min_length=1, max_length=32)


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {
            FieldCondition: "field",
            AbsentCondition: "absent",
            PresenceCondition: "presence",
            AllCondition: "all",
            AnyCondition: "any",
        }.get(type(value))
    if isinstance(value, dict):
        for key, kind in (
            ("all", "all"),
            ("any", "any"),
            ("absent_for", "absent"),
            ("presence", "presence"),
            ("field", "field"),
        ):
            if key in value:
                return kind
    return None


Condition = Annotated[
    Annotated[FieldCondition, Tag("field")]
    | Annotated[AbsentCondition, Tag("absent")]
    | Annotated[PresenceCondition, Tag("presence")]
    | Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition_kind",
        custom_error_message="a condition needs one of the keys field, absent_for, presence, all, any",
    ),
]

AllCondition.model_rebuild()
AnyCondition.model_rebuild()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- actions -------------------------------------------------------------------

Severity = Literal["critical", "major", "minor", "warning", "info"]


class Target(_Model):
    """Where a rule's command goes instead of the triggering device: exactly one of the selectors.

    ``tag: "room=101"`` — every device with that tag; ``same_tag: "room"`` — every
    device whose ``room`` tag equals the triggering device's; ``devices`` — named ids.
    Only devices of ``device_type`` (default: the rule's scope type) are targeted,
    so the command is validated against that type.
    """

    tag: str | None = Field(None, pattern=r"^[^=]{1,64}=.{0,200}$", description="key=value")
    same_tag: str | None = Field(None, min_length=1, max_length=64)
    devices: list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]] | None = Field(
        None, min_length=1, max_length=1000
    )
    device_type: str | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> Target:
        chosen = [k for k in ("tag", "same_tag", "devices") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("a target needs exactly one of tag, same_tag, devices")
        if self.device_type is not None and self.device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {self.device_type!r} (known: {', '.join(DEVICE_TYPES)})")
        return self

    def tag_pair(self) -> tuple[str, str] | None:
        if self.tag is None:
            return None
        key, _, value = self.tag.partition("=")
        return key, value


class CommandAction(_Model):
    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    target: Target | None = None
    ttl: Duration | None = Field(None, description="Message expiry; default IOTFLEET_RULES__COMMAND_TTL_S")


class SetDesiredAction(_Model):
    """Merge ``set_desired`` into the desired state (device shadow) of the triggering device, or of the
    target's devices; ``null`` removes a field. The registry applies it (``iotfleet/state/desired``)."""

    set_desired: dict[str, Any] = Field(min_length=1, max_length=64)
    target: Target | None = None


ChannelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="A notification channel (/api/v1/channels)",
    ),
]


class AlertSpec(_Model):
    severity: Severity = "major"
    message: str = Field("", max_length=500)
    notify: list[ChannelName] | None = Field(
        None,
        max_length=16,
        description="Notification channels told on raise, acknowledge and clear (besides default routes)",
    )


class AlertAction(_Model):
    alert: AlertSpec


def _action_kind(value: Any) -> str | None:
    if isinstance(value, CommandAction):
        return "command"
    if isinstance(value, AlertAction):
        return "alert"
    if isinstance(value, SetDesiredAction):
        return "set_desired"
    if isinstance(value, dict):
        if "command" in value:
            return "command"
        if "alert" in value:
            return "alert"
        if "set_desired" in value:
            return "set_desired"
    return None


Action = Annotated[
    Annotated[CommandAction, Tag("command")]
    | Annotated[AlertAction, Tag("alert")]
    | Annotated[SetDesiredAction, Tag("set_desired")],
    Discriminator(
        _action_kind,
        custom_error_type="action_kind",
        custom_error_message="an action is {'command': …, 'args': …}, {'alert': {…}} or {'set_desired': {…}}",
    ),
]


# --- rule ------------------------------------------------------------------------


class Scope(_Model):
    device_type: str
    device_ids: list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]] | None = Field(
        None, min_length=1, max_length=10_000
    )
    tags: dict[str, str] | None = Field(None, description="Every tag must match (key: value)")

    @model_validator(mode="after")
    def _known_type(self) -> Scope:
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {self.device_type!r} (known: {', '.join(DEVICE_TYPES)})")
        return self


class Schedule(_Model):
    cron: str = Field(description="Five-field crontab: minute hour day month weekday")
    tz: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> Schedule:
        from apscheduler.triggers.cron import CronTrigger

        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {self.tz!r} (use an IANA name, e.g. 'Europe/Paris')"
            ) from None
        try:
            CronTrigger.from_crontab(self.cron, timezone=zone)
        except ValueError as exc:
            raise ValueError(f"invalid cron {self.cron!r}: {exc}") from None
        return self


RULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

# Bounds of a rule definition, checked on the raw input before pydantic walks it:
# what passes them can always be stored, served back and loaded by the engine
# (serializers stop at a depth; evaluation cost grows with the condition tree).
MAX_CONDITION_DEPTH = 8
"""Levels of conditions: a field condition alone is 1, ``{"all": [field]}`` is 2."""
MAX_CONDITIONS = 256
"""Conditions in one ``when`` or ``clear_when``, counting ``all``/``any`` nodes."""
MAX_RULE_JSON_DEPTH = 24
"""JSON nesting of the whole definition (command ``args`` included)."""
MAX_RULE_BYTES = 64 * 1024
"""Size of the definition as compact JSON."""


def _condition_shape(node: Any, where: str) -> tuple[int, int]:
    """(depth, count) of a raw condition tree; raises once past the bounds (no recursion)."""
    deepest, count = 0, 0
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        deepest = max(deepest, depth)
        if depth > MAX_CONDITION_DEPTH:
            raise PydanticCustomError(
                "rule_too_deep",
                "{where}: conditions nested deeper than {limit} levels",
                {"where": where, "limit": MAX_CONDITION_DEPTH},
            )
        if count > MAX_CONDITIONS:
            raise PydanticCustomError(
                "rule_too_large",
                "{where}: more than {limit} conditions",
                {"where": where, "limit": MAX_CONDITIONS},
            )
        if isinstance(item, dict):
            for key in ("all", "any"):
                children = item.get(key)
                if isinstance(children, list):
                    stack.extend((child, depth + 1) for child in children)
    return deepest, count


def check_rule_bounds(data: Any) -> None:
    """Raise PydanticCustomError if a raw rule definition is too deep or too large."""
    if not isinstance(data, dict):
        return  # pydantic reports the wrong type
    if json_depth(data, limit=MAX_RULE_JSON_DEPTH) > MAX_RULE_JSON_DEPTH:
        raise PydanticCustomError(
            "rule_too_deep", "rule nested deeper than {limit} JSON levels", {"limit": MAX_RULE_JSON_DEPTH}
        )
    try:
        size = len(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
    except (TypeError, orjson.JSONEncodeError):
        size = 0  # not JSON data (a model instance): its fields are checked one by one
    if size > MAX_RULE_BYTES:
        raise PydanticCustomError(
            "rule_too_large",
            "rule definition is {size} bytes as JSON; the limit is {limit}",
            {"size": size, "limit": MAX_RULE_BYTES},
        )
    for where in ("when", "clear_when"):
        if data.get(where) is not None:
            _condition_shape(data[where], where)


class Rule(_Model):
    """A rule: scope + (``when`` [+ ``clear_when``] | ``schedule``) + actions."""

    name: str = Field(pattern=RULE_NAME_PATTERN)
    description: str = Field("", max_length=1000)
    enabled: bool = True
    scope: Scope
    when: Condition | None = None
    clear_when: Condition | None = Field(
        None, description="Hysteresis: once fired, the rule clears only when this holds (default: not when)"
    )
    schedule: Schedule | None = None
    then: list[Action] = Field(min_length=1, max_length=32)
    on_clear: list[CommandAction] = Field(default_factory=list, max_length=32)
    cooldown: Duration | None = Field(None, description="Minimum time between two firings per device")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        check_rule_bounds(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if (self.when is None) == (self.schedule is None):
            raise ValueError("a rule has exactly one of when (a condition) or schedule (cron)")
        device_type = get_device_type(self.scope.device_type)
        if self.schedule is not None:
            if self.clear_when is not None or self.on_clear:
                raise ValueError("a schedule rule has no clear_when/on_clear (it fires and is done)")
            if any(isinstance(a, AlertAction) for a in self.then):
                raise ValueError("a schedule rule sends commands; alerts need a condition that can clear")
        for condition, where in ((self.when, "when"), (self.clear_when, "clear_when")):
            if condition is not None:
                _check_fields(condition, device_type, where)
        for index, action in enumerate(self.then):
            if isinstance(action, CommandAction):
                check_command(action, self.scope.device_type, f"then[{index}]")
            elif isinstance(action, SetDesiredAction):
                check_set_desired(action, self.scope.device_type, f"then[{index}]")
        for index, action in enumerate(self.on_clear):
            check_command(action, self.scope.device_type, f"on_clear[{index}]")
        return self

    @property
    def commands(self) -> list[CommandAction]:
        return [a for a in self.then if isinstance(a, CommandAction)]

    @property
    def desired_changes(self) -> list[SetDesiredAction]:
        return [a for a in self.then if isinstance(a, SetDesiredAction)]

    @property
    def alert(self) -> AlertSpec | None:
        for action in self.then:
            if isinstance(action, AlertAction):
                return action.alert
        return None


def _field_annotation(device_type: DeviceType, name: str) -> Any:
    return device_type.reading.model_fields[name].annotation


def _numeric_field(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_numeric_field(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _check_fields(condition: Any, device_type: DeviceType, where: str) -> None:
    if isinstance(condition, AllCondition | AnyCondition):
        children = condition.all if isinstance(condition, AllCondition) else condition.any
        for child in children:
            _check_fields(child, device_type, where)
        return
    if not isinstance(condition, FieldCondition):
        return
    if condition.field not in device_type.fields:
        raise ValueError(
            f"{where}: {device_type.name} has no field {condition.field!r} "
            f"(fields: {', '.join(device_type.fields)})"
        )
    numeric = _numeric_field(_field_annotation(device_type, condition.field))
    needs_number = (
        condition.op in ORDER_OPS + RANGE_OPS or condition.agg is not None or condition.rate_per is not None
    )
    if needs_number and not numeric and condition.agg != "count":
        raise ValueError(f"{where}: field {condition.field!r} is not numeric; use == or !=")


def check_command(action: CommandAction, scope_type: str, where: str) -> None:
    """Validate a command action against its target type's command models (ValueError if invalid)."""
    type_name = action.target.device_type if action.target and action.target.device_type else scope_type
    try:
        device_type = get_device_type(type_name)
    except UnknownDeviceTypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if action.command not in device_type.commands:
        raise ValueError(
            f"{where}: {type_name} has no command {action.command!r} "
            f"(commands: {', '.join(device_type.commands)})"
        )
    try:
        device_type.validate_command(action.command, action.args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{where}: invalid args for {action.command!r}: {problems}") from None


def check_set_desired(action: SetDesiredAction, scope_type: str, where: str) -> None:
    """Validate a desired-state action against its target type's state model (ValueError if invalid)."""
    type_name = action.target.device_type if action.target and action.target.device_type else scope_type
    try:
        device_type = get_device_type(type_name)
    except UnknownDeviceTypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if device_type.state is None:
        raise ValueError(f"{where}: {type_name} has no configurable state to set")
    try:
        device_type.state.model_validate(action.set_desired)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'set_desired'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{where}: invalid set_desired for {type_name}: {problems}") from None


class StoredRule(Rule):
    """A rule as the registry serves it: the definition plus its id and version."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    id: str
    version: int = 1


def rule_definition(rule: Rule) -> dict[str, Any]:
    """The rule as JSON-able data in its public shape (aliases, no unset defaults)."""
    return rule.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"id", "version"})
