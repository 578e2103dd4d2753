"""The rule evaluator: pure, single-threaded, driven by readings, status changes and clock ticks.

No I/O and no wall clock here: every call carries its time (a reading's device
timestamp, a status change's arrival time, a tick's time), so the live engine
and the backtest, which feed the same evaluator from MQTT and from InfluxDB,
fire at the same logical times.

Semantics (documented for operators in docs/rules.md):
- A rule is evaluated per device in its scope. It is *edge-triggered*: it fires
  when ``when`` becomes true while the rule is inactive for that device, then
  stays active (no repeat) until it clears: ``clear_when`` holds (hysteresis),
  or, without ``clear_when``, ``when`` no longer holds. A burst of readings over
  the threshold therefore fires once.
- ``cooldown``: a firing less than ``cooldown`` after the previous firing of the
  same rule on the same device is suppressed (the rule stays inactive and may fire
  on a later reading once the cooldown has passed).
- ``for``: the comparison held on every reading of the last ``for`` (reading
  time); it is checked when readings arrive.
- ``agg`` over ``window``: aggregate of the readings with ts in (t - window, t].
- ``rate_per``: (x - x_prev) / (t - t_prev) × rate_per, consecutive readings.
- ``absent_for``: no reading for that long; checked by ticks, fired at the
  logical time last reading + absent_for.
- ``presence``: the registry's presence of the device (its last transition), optionally held ``for``.
- Readings older than the device's newest evaluated reading are ignored (late
  arrivals, redelivery after a reconnect). Equal timestamps are evaluated: a
  burst may share a millisecond, and edge triggering makes a duplicate harmless.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from rules_engine.models import (
    AbsentCondition,
    AllCondition,
    AnyCondition,
    FieldCondition,
    PresenceCondition,
    StoredRule,
    duration_ms,
)

FiringKind = Literal["fire", "clear"]


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule fired (or cleared) for a device at a logical time."""

    rule_id: str
    rule_name: str
    device_type: str
    device_id: str
    kind: FiringKind
    at_ms: int
    values: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    def key(self) -> tuple[str, str, str, int]:
        return (self.rule_id, self.device_id, self.kind, self.at_ms)


@dataclass(slots=True)
class Device:
    """What the evaluator knows about one device (shared by all its rule states)."""

    device_type: str
    device_id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    last_ts: int | None = None
    online: bool | None = None
    presence_since: int | None = None
    states: dict[str, RuleState] = field(default_factory=dict)
    bound: list[tuple[Program, RuleState]] | None = None
    """The rules that apply to this device with their states (rebuilt when rules or tags change)."""
    bound_generation: int = -1


@dataclass(slots=True)
class RuleState:
    """Per (rule, device): node memories and the firing state (persisted by the engine)."""

    mem: list[Any]
    active: bool = False
    last_fired: int | None = None
    deadline_done: int = -1


# --- condition nodes -------------------------------------------------------------


class _FieldMem:
    __slots__ = ("prev_ts", "prev_x", "since", "truth", "window", "wsum")

    def __init__(self) -> None:
        self.truth = False
        self.since = 0
        self.window: deque[tuple[int, float]] | None = None
        self.wsum = 0.0
        self.prev_ts: int | None = None
        self.prev_x: float | None = None


def _comparator(cond: FieldCondition) -> Callable[[Any], bool]:
    value = cond.value
    if cond.op == "between":
        assert isinstance(value, list)
        low, high = value
        return lambda x: low <= x <= high
    if cond.op == "outside":
        assert isinstance(value, list)
        low, high = value
        return lambda x: x < low or x > high
    fn = _BINARY_OPS[cond.op]
    return lambda x: bool(fn(x, value))


_BINARY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


class Node:
    """A compiled condition; its per-device memory lives in ``RuleState.mem[slot]``."""

    clocked = False  # True if its truth can change without a reading (absence, presence for)

    def new_mem(self, mem: list[Any]) -> None:
        """Append this node's (and its children's) initial memory to ``mem``."""

    def observe(self, mem: list[Any], ts: int, values: Mapping[str, Any]) -> None:
        """Take a reading into memory."""

    def value(self, mem: list[Any], device: Device, now: int) -> bool:
        raise NotImplementedError

    def deadline(self, mem: list[Any], device: Device) -> int | None:
        """When the truth may next change with no reading (None: not before a reading)."""
        return None


class FieldNode(Node):
    def __init__(self, cond: FieldCondition) -> None:
        self.field = cond.field
        self.compare = _comparator(cond)
        self.for_ms = duration_ms(cond.for_) if cond.for_ else 0
        self.agg = cond.agg
        self.window_ms = duration_ms(cond.window) if cond.window else 0
        self.rate_per_ms = duration_ms(cond.rate_per) if cond.rate_per else 0
        self.plain = self.agg is None and not self.rate_per_ms
        self.op_fn: Callable[[Any, Any], Any] | None = _BINARY_OPS.get(cond.op)
        self.ref = cond.value
        self.slot = -1

    def new_mem(self, mem: list[Any]) -> None:
        self.slot = len(mem) if self.slot < 0 else self.slot
        memory = _FieldMem()
        if self.agg is not None:
            memory.window = deque()
        mem.append(memory)

    def _metric(self, m: _FieldMem, ts: int, x: Any) -> Any:
        if self.agg is not None:
            window = m.window
            assert window is not None
            window.append((ts, x))
            m.wsum += x
            horizon = ts - self.window_ms
            while window and window[0][0] <= horizon:
                m.wsum -= window.popleft()[1]
            if self.agg == "mean":
                return m.wsum / len(window)
            if self.agg == "sum":
                return m.wsum
            if self.agg == "count":
                return len(window)
            if self.agg == "min":
                return min(v for _, v in window)
            return max(v for _, v in window)
        if self.rate_per_ms:
            prev_ts, prev_x = m.prev_ts, m.prev_x
            m.prev_ts, m.prev_x = ts, x
            if prev_ts is None or prev_x is None or ts <= prev_ts:
                return None
            return (x - prev_x) / (ts - prev_ts) * self.rate_per_ms
        return x

    def observe(self, mem: list[Any], ts: int, values: Mapping[str, Any]) -> None:
        x = values.get(self.field)
        if x is None:
            return  # this reading says nothing about the field: the condition keeps its state
        m: _FieldMem = mem[self.slot]
        if self.plain:
            # The common case (a threshold on the value), kept short: it runs rules × readings times.
            truth = bool(self.op_fn(x, self.ref)) if self.op_fn is not None else self.compare(x)
        else:
            if isinstance(x, bool) or not isinstance(x, int | float):
                return
            metric = self._metric(m, ts, x)
            truth = metric is not None and self.compare(metric)
        if truth and not m.truth:
            m.since = ts
        m.truth = truth

    def value(self, mem: list[Any], device: Device, now: int) -> bool:
        m: _FieldMem = mem[self.slot]
        return m.truth and (not self.for_ms or now - m.since >= self.for_ms)


class AbsentNode(Node):
    clocked = True

    def __init__(self, cond: AbsentCondition) -> None:
        self.absent_ms = duration_ms(cond.absent_for)

    def value(self, mem: list[Any], device: Device, now: int) -> bool:
        return device.last_ts is not None and now - device.last_ts >= self.absent_ms

    def deadline(self, mem: list[Any], device: Device) -> int | None:
        return None if device.last_ts is None else device.last_ts + self.absent_ms


class PresenceNode(Node):
    def __init__(self, cond: PresenceCondition) -> None:
        self.online = cond.presence == "online"
        self.for_ms = duration_ms(cond.for_) if cond.for_ else 0
        self.clocked = bool(self.for_ms)

    def value(self, mem: list[Any], device: Device, now: int) -> bool:
        if device.online is None or device.online != self.online:
            return False
        since = device.presence_since or now
        return not self.for_ms or now - since >= self.for_ms

    def deadline(self, mem: list[Any], device: Device) -> int | None:
        if not self.for_ms or device.online != self.online or device.presence_since is None:
            return None
        return device.presence_since + self.for_ms


class CompositeNode(Node):
    def __init__(self, children: list[Node], all_of: bool) -> None:
        self.children = children
        self.all_of = all_of
        self.clocked = any(c.clocked for c in children)

    def new_mem(self, mem: list[Any]) -> None:
        for child in self.children:
            child.new_mem(mem)

    def observe(self, mem: list[Any], ts: int, values: Mapping[str, Any]) -> None:
        for child in self.children:
            child.observe(mem, ts, values)

    def value(self, mem: list[Any], device: Device, now: int) -> bool:
        if self.all_of:
            return all(c.value(mem, device, now) for c in self.children)
        return any(c.value(mem, device, now) for c in self.children)

    def deadline(self, mem: list[Any], device: Device) -> int | None:
        times = [t for c in self.children if (t := c.deadline(mem, device)) is not None]
        return min(times) if times else None


def compile_condition(cond: Any) -> Node:
    if isinstance(cond, FieldCondition):
        return FieldNode(cond)
    if isinstance(cond, AbsentCondition):
        return AbsentNode(cond)
    if isinstance(cond, PresenceCondition):
        return PresenceNode(cond)
    if isinstance(cond, AllCondition):
        return CompositeNode([compile_condition(c) for c in cond.all], all_of=True)
    if isinstance(cond, AnyCondition):
        return CompositeNode([compile_condition(c) for c in cond.any], all_of=False)
    raise TypeError(f"not a condition: {cond!r}")


# --- compiled rules ----------------------------------------------------------------


class Program:
    """A rule compiled for evaluation: its nodes, scope test and cooldown."""

    def __init__(self, rule: StoredRule) -> None:
        if rule.when is None:
            raise ValueError(f"rule {rule.name!r} is a schedule rule; it has no condition to evaluate")
        self.rule = rule
        self.rule_id = rule.id
        self.when = compile_condition(rule.when)
        self.clear = compile_condition(rule.clear_when) if rule.clear_when is not None else None
        self.cooldown_ms = duration_ms(rule.cooldown) if rule.cooldown else 0
        self.device_ids = frozenset(rule.scope.device_ids) if rule.scope.device_ids else None
        self.tags = dict(rule.scope.tags or {})
        self.clocked = self.when.clocked or (self.clear is not None and self.clear.clocked)
        self.presence = uses_presence(self.when) or (self.clear is not None and uses_presence(self.clear))
        # Slots are assigned on the first new_state; every state then has the same layout.
        self._template: list[Any] | None = None

    def applies_to(self, device: Device) -> bool:
        if self.device_ids is not None and device.device_id not in self.device_ids:
            return False
        return all(device.tags.get(k) == v for k, v in self.tags.items())

    def new_state(self) -> RuleState:
        mem: list[Any] = []
        self.when.new_mem(mem)
        if self.clear is not None:
            self.clear.new_mem(mem)
        return RuleState(mem=mem)

    def deadline(self, state: RuleState, device: Device) -> int | None:
        times = [
            t
            for node in (self.when, self.clear)
            if node is not None and (t := node.deadline(state.mem, device)) is not None
        ]
        return min(times) if times else None

    def step(self, state: RuleState, device: Device, now: int, values: Mapping[str, Any]) -> Firing | None:
        """Decide fire/clear at ``now`` from the nodes' current truth (memories already updated)."""
        if not state.active:
            if not self.when.value(state.mem, device, now):
                return None
            if (
                self.cooldown_ms
                and state.last_fired is not None
                and now - state.last_fired < self.cooldown_ms
            ):
                return None
            state.active = True
            state.last_fired = now
            return self._firing(device, "fire", now, values)
        if self.clear is not None:
            cleared = self.clear.value(state.mem, device, now)
        else:
            cleared = not self.when.value(state.mem, device, now)
        if not cleared:
            return None
        state.active = False
        return self._firing(device, "clear", now, values)

    def _firing(
        self, device: Device, kind: FiringKind, now: int, values: Mapping[str, Any], reason: str = ""
    ) -> Firing:
        return Firing(
            rule_id=self.rule_id,
            rule_name=self.rule.name,
            device_type=device.device_type,
            device_id=device.device_id,
            kind=kind,
            at_ms=now,
            values=dict(values),
            reason=reason,
        )


def uses_presence(node: Node) -> bool:
    if isinstance(node, PresenceNode):
        return True
    if isinstance(node, CompositeNode):
        return any(uses_presence(c) for c in node.children)
    return False


# --- the evaluator -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedState:
    """What survives an engine restart per (rule, device)."""

    rule_id: str
    device_id: str
    active: bool
    last_fired: int | None


class Evaluator:
    """Every condition rule × every device seen: feed it events, it returns firings."""

    def __init__(self, rules: Iterable[StoredRule] = ()) -> None:
        self.programs: dict[str, Program] = {}
        self._by_type: dict[str, list[Program]] = {}
        self.devices: dict[tuple[str, str], Device] = {}
        self.dirty: set[tuple[str, str, str]] = set()
        """(rule_id, device_type, device_id) whose firing state changed since the last ``take_dirty``."""
        self.ignored_readings = 0
        self._saved: dict[tuple[str, str], SavedState] = {}
        self._clocked_by_type: dict[str, list[Program]] = {}
        self._generation = 0
        self.set_rules(rules)

    # rules ------------------------------------------------------------------
    def set_rules(self, rules: Iterable[StoredRule], now: int | None = None) -> list[Firing]:
        """Replace the rule set; unchanged rules (same id and version) keep their state.

        A changed rule keeps its firing state (active, last fired) so an edit does
        not re-fire; a removed or disabled rule that was active is cleared.
        """
        wanted = {r.id: r for r in rules if r.enabled and r.when is not None}
        cleared: list[Firing] = []
        changed = False
        for rule_id, program in list(self.programs.items()):
            if rule_id in wanted:
                continue
            changed = True
            del self.programs[rule_id]
            for device in self.devices.values():
                state = device.states.pop(rule_id, None)
                if state is not None and state.active and now is not None:
                    cleared.append(
                        program._firing(device, "clear", now, {}, reason="rule removed or disabled")
                    )
                    self.dirty.add((rule_id, device.device_type, device.device_id))
        for rule_id, rule in wanted.items():
            old = self.programs.get(rule_id)
            if old is not None and old.rule.version == rule.version and old.rule == rule:
                continue
            changed = True
            program = Program(rule)
            self.programs[rule_id] = program
            if old is not None:
                for device in self.devices.values():
                    previous = device.states.pop(rule_id, None)
                    if previous is not None and program.applies_to(device):
                        fresh = program.new_state()
                        fresh.active, fresh.last_fired = previous.active, previous.last_fired
                        device.states[rule_id] = fresh
        if not changed:
            return cleared  # the periodic re-fetch: keep every device's bound rules
        self._by_type = {}
        for program in self.programs.values():
            self._by_type.setdefault(program.rule.scope.device_type, []).append(program)
        self._clocked_by_type = {
            device_type: [p for p in programs if p.clocked] for device_type, programs in self._by_type.items()
        }
        self._generation += 1
        return cleared

    def restore(self, saved: Iterable[SavedState], last_seen: Mapping[tuple[str, str], int]) -> None:
        """Seed firing states and last reading times from the engine's state store."""
        for item in saved:
            self._saved[(item.rule_id, item.device_id)] = item
        for (device_type, device_id), ts in last_seen.items():
            self.device(device_type, device_id).last_ts = ts

    def device(self, device_type: str, device_id: str, tags: Mapping[str, str] | None = None) -> Device:
        key = (device_type, device_id)
        device = self.devices.get(key)
        if device is None:
            device = self.devices[key] = Device(device_type, device_id, dict(tags or {}))
        elif tags is not None and tags != device.tags:
            device.tags = dict(tags)
            device.bound = None
        return device

    def _state(self, program: Program, device: Device) -> RuleState:
        state = device.states.get(program.rule_id)
        if state is None:
            state = device.states[program.rule_id] = program.new_state()
            saved = self._saved.pop((program.rule_id, device.device_id), None)
            if saved is not None:
                state.active, state.last_fired = saved.active, saved.last_fired
        return state

    def _emit(self, firing: Firing | None, out: list[Firing]) -> None:
        if firing is not None:
            out.append(firing)
            self.dirty.add((firing.rule_id, firing.device_type, firing.device_id))

    # events -----------------------------------------------------------------
    def on_reading(
        self,
        device_type: str,
        device_id: str,
        ts: int,
        values: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
    ) -> list[Firing]:
        device = self.device(device_type, device_id, tags)
        if device.last_ts is not None and ts < device.last_ts:
            self.ignored_readings += 1
            return []
        out: list[Firing] = []
        # A quiet device's absence deadline that passed before this reading is
        # due first (the tick may not have run yet): the same order as the backtest.
        if device.last_ts is not None:
            self._due(device, ts - 1, out)
        device.last_ts = ts
        bound = device.bound
        if bound is None or device.bound_generation != self._generation:
            bound = device.bound = [
                (p, self._state(p, device))
                for p in self._by_type.get(device_type, ())
                if p.applies_to(device)
            ]
            device.bound_generation = self._generation
        for program, state in bound:
            program.when.observe(state.mem, ts, values)
            if program.clear is not None:
                program.clear.observe(state.mem, ts, values)
            firing = program.step(state, device, ts, values)
            if firing is not None:
                self._emit(firing, out)
        return out

    def on_presence(
        self,
        device_type: str,
        device_id: str,
        online: bool,
        ts: int,
        tags: Mapping[str, str] | None = None,
        *,
        since: int | None = None,
    ) -> list[Firing]:
        """Presence changed, seen at ``ts``; ``since`` is when it really changed (default ``ts``)."""
        device = self.device(device_type, device_id, tags)
        if device.online == online:
            return []
        device.online, device.presence_since = online, min(since, ts) if since is not None else ts
        out: list[Firing] = []
        for program in self._by_type.get(device_type, ()):
            if program.presence and program.applies_to(device):
                state = self._state(program, device)
                self._emit(
                    program.step(state, device, ts, {"presence": "online" if online else "offline"}), out
                )
        return out

    def on_tick(self, now: int) -> list[Firing]:
        """Evaluate clock-driven conditions whose deadline is at or before ``now``, at their deadline."""
        out: list[Firing] = []
        for device in self.devices.values():
            self._due(device, now, out)
        return out

    def _due(self, device: Device, now: int, out: list[Firing]) -> None:
        for program in self._clocked_by_type.get(device.device_type, ()):
            if not program.applies_to(device):
                continue
            state = self._state(program, device)
            deadline = program.deadline(state, device)
            if deadline is None or deadline > now or deadline <= state.deadline_done:
                continue
            state.deadline_done = deadline
            self._emit(program.step(state, device, deadline, {}), out)

    # persistence --------------------------------------------------------------
    def take_dirty(self) -> list[SavedState]:
        """Firing states changed since the last call (the engine persists them)."""
        out = []
        for rule_id, device_type, device_id in self.dirty:
            device = self.devices.get((device_type, device_id))
            state = device.states.get(rule_id) if device is not None else None
            if state is None:
                out.append(SavedState(rule_id, device_id, False, None))
            else:
                out.append(SavedState(rule_id, device_id, state.active, state.last_fired))
        self.dirty.clear()
        return out

    def active(self) -> list[tuple[str, str]]:
        """(rule_id, device_id) of every active rule state."""
        return [
            (rule_id, device.device_id)
            for device in self.devices.values()
            for rule_id, state in device.states.items()
            if state.active
        ]
