"""One engine among several: partition leases, the hand-over buffer, fenced state writes, takeover.

Active only when ``IOTFLEET_RULES__PARTITIONS`` > 0 (docs/rules.md, "Running several engines").
Everything here runs on the engine's loop (asyncpg is asyncio), like the evaluator it feeds.

Hot path: the engine asks :meth:`PartitionOwner.owns` with the topic's device (a crc32 and a dict
lookup) before parsing the payload. A reading of an owned partition is evaluated as in a single
engine; a reading of another engine's partition is kept raw in the bounded hand-over buffer and
acked at once. Firings (rare) are written to PostgreSQL by one writer task, in order, fenced by the
lease epoch; the reading that caused them stays unacked until the write committed and the broker
acked every message it sends, as the SQLite store does in single-engine mode. No reading waits
on the database otherwise.

Takeover of a partition (a dead engine's lease expired, or one was released to even the load):
bump the epoch, load the partition's states, last-seen times and outbox, then, without yielding
to the loop, replay the buffered readings of its devices: those at or before the last transition
the previous owner stored for the device only warm windows, newer ones are evaluated normally,
and the outbox leftovers are sent again (same command ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge

from iotfleet.admission import Rejected
from iotfleet.catalogue import DEVICE_TYPES
from rules_engine import wire
from rules_engine.evaluator import Firing, SavedState
from rules_engine.models import AllCondition, AnyCondition, FieldCondition, StoredRule, duration_ms
from rules_engine.partitioning import (
    HandoverBuffer,
    PartitionKey,
    partition_of,
    plan_leases,
    replay_split,
)
from rules_engine.shared_store import Acquired, PartitionState, SharedStore, StateWrite, StoredState

if TYPE_CHECKING:
    from rules_engine.engine import RulesEngine

log = logging.getLogger("rules-engine")

WRITE_RETRY_S = 0.5
WRITE_BATCH = 256
ROUND_MAX_S = 1.0
STORE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class PartitionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge(
            "iotfleet_rules_partitions_held", "Partition leases this engine holds", registry=registry
        )
        self.takeovers = Counter(
            "iotfleet_rules_partition_takeovers_total",
            "Partitions acquired: from a dead engine (expired lease), released by another, or never held",
            ["from"],
            registry=registry,
        )
        self.lost = Counter(
            "iotfleet_rules_partitions_lost_total",
            "Partitions given up: released to even the load, lease lost, write fenced",
            ["reason"],
            registry=registry,
        )
        self.epoch = Gauge(
            "iotfleet_rules_partition_epoch",
            "Fencing epoch of each lease held (0 when not held)",
            ["device_type", "partition"],
            registry=registry,
        )
        self.buffered = Gauge(
            "iotfleet_rules_handover_buffer_messages",
            "Messages of other engines' partitions kept for a takeover",
            registry=registry,
        )
        self.dropped = Counter(
            "iotfleet_rules_handover_buffer_dropped_total",
            "Buffered messages dropped by the count bound before their age ran out",
            registry=registry,
        )
        self.replayed = Counter(
            "iotfleet_rules_handover_replayed_total",
            "Readings replayed on a takeover: warm (window only, acted on before) or live",
            ["mode"],
            registry=registry,
        )
        self.fenced = Counter(
            "iotfleet_rules_fenced_writes_total",
            "State writes refused: the lease had moved on",
            registry=registry,
        )
        self.write_errors = Counter(
            "iotfleet_rules_shared_store_errors_total",
            "Failed shared store calls (retried)",
            registry=registry,
        )


@dataclass(slots=True)
class _Write:
    key: PartitionKey
    epoch: int
    states: list[StoredState]
    outbox: list[tuple[str, bytes, bytes, Callable[[int], None] | None]]
    seen: list[tuple[str, int]]
    hold: list[int] | None


class PartitionOwner:
    def __init__(self, engine: RulesEngine, registry: CollectorRegistry) -> None:
        rules = engine.settings.rules
        assert rules.shared_store_url is not None  # RulesSettings refuses partitions without it
        self.engine = engine
        self.partitions = rules.partitions
        self.device_types = list(rules.device_types or DEVICE_TYPES)
        self.replica = rules.replica
        self.ttl_s = rules.lease_ttl_s
        self.store = SharedStore(rules.shared_store_url.get_secret_value(), rules.replica, rules.lease_ttl_s)
        self.metrics = PartitionMetrics(registry)
        self.buffer = HandoverBuffer(
            rules.handover_buffer_s,
            rules.handover_buffer_max,
            max_bytes=rules.handover_buffer_max_bytes,
            max_payload_bytes=engine.settings.ingest.max_payload_bytes,
        )
        self.owned: dict[PartitionKey, int] = {}
        """Leases held: (type, partition) → fencing epoch."""
        self.presence: dict[tuple[str, str], tuple[bool, int | None]] = {}
        """The newest presence of each device of another engine's partitions (one entry per device)."""
        self._restored: dict[PartitionKey, list[tuple[str, str]]] = {}
        self._releasing: dict[PartitionKey, int] = {}
        self._warned: set[tuple[str, int]] = set()
        """Leases being given back: their pending writes may still commit."""
        self._writes: asyncio.Queue[_Write] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._store_up = False
        self._renewed_at = time.monotonic()
        self.ready = False
        """True once the shared store answered (health)."""

    # --- hot path -----------------------------------------------------------------------------
    def key(self, device_type: str, device_id: str) -> PartitionKey:
        return (device_type, partition_of(device_id, self.partitions))

    def owns(self, device_type: str, device_id: str) -> bool:
        return (device_type, partition_of(device_id, self.partitions)) in self.owned

    def buffer_reading(self, device_type: str, device_id: str, payload: bytes) -> None:
        dropped = self.buffer.dropped
        self.buffer.add(wire.now_ms(), self.key(device_type, device_id), device_id, payload)
        if self.buffer.dropped != dropped:
            self.metrics.dropped.inc(self.buffer.dropped - dropped)

    def remember_presence(self, device_type: str, device_id: str, online: bool, since_ms: int | None) -> None:
        self.presence[(device_type, device_id)] = (online, since_ms)

    def persist(self, firings: Sequence[Firing], collect: Callable[[Sequence[Firing]], list[Any]]) -> None:
        """Queue the firings' state and messages, per partition, for the fenced writer; a reading
        being handled keeps its ack until they are stored and sent."""
        evaluator = self.engine.evaluator
        groups: dict[PartitionKey, list[Firing]] = {}
        for firing in firings:
            groups.setdefault(self.key(firing.device_type, firing.device_id), []).append(firing)
        evaluator.dirty.clear()  # the states are read from the firings below
        for key, group in groups.items():
            epoch = self.owned.get(key)
            if epoch is None:  # a device of a partition given up in between: its new owner acts
                continue
            batch = collect(group)
            states: dict[tuple[str, str], StoredState] = {}
            seen: dict[str, int] = {}
            for firing in group:
                device = evaluator.devices.get((firing.device_type, firing.device_id))
                state = device.states.get(firing.rule_id) if device is not None else None
                saved = (
                    SavedState(firing.rule_id, firing.device_id, state.active, state.last_fired)
                    if state is not None
                    else SavedState(firing.rule_id, firing.device_id, False, None)
                )
                states[(firing.rule_id, firing.device_id)] = StoredState(saved, firing.at_ms)
                if device is not None and device.last_ts is not None:
                    seen[firing.device_id] = device.last_ts
            hold = self.engine.hold_current_reading()
            self._writes.put_nowait(
                _Write(key, epoch, list(states.values()), batch, list(seen.items()), hold)
            )

    async def _writer(self) -> None:
        while True:
            batch = [await self._writes.get()]
            # A burst of transitions shares one transaction (one commit, one round of fencing).
            while len(batch) < WRITE_BATCH and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            try:
                await self._write(batch)
            except Exception:  # a bug must cost these writes, not every later one
                log.exception("shared store write failed")
            finally:
                for write in batch:
                    self._writes.task_done()
                    self.engine.release_hold(write.hold)

    async def _write(self, batch: list[_Write]) -> None:
        while True:
            # Given up meanwhile: not stored; the new owner replays the reading from its buffer.
            batch = [w for w in batch if w.epoch in (self.owned.get(w.key), self._releasing.get(w.key))]
            if not batch:
                return
            try:
                results = await self.store.save_many(
                    [
                        StateWrite(
                            w.key, w.epoch, w.states, [(t, p, props) for t, p, props, _ in w.outbox], w.seen
                        )
                        for w in batch
                    ]
                )
                break
            except STORE_ERRORS as exc:
                self.metrics.write_errors.inc()
                log.warning("shared store write failed (%s); retrying", exc)
                await asyncio.sleep(WRITE_RETRY_S)
        for write, ids in zip(batch, results, strict=True):
            if ids is None:
                self.metrics.fenced.inc()
                self.lose(write.key, f"write refused, epoch {write.epoch} is stale", "fenced")
                continue
            for row_id, (topic, payload, properties, on_ack) in zip(ids, write.outbox, strict=True):
                self.engine.publish_held(
                    write.hold, topic, payload, properties, self.engine.forget_when_acked(row_id, on_ack)
                )

    def save_seen(self, seen: dict[tuple[str, str], int]) -> None:
        rows = [
            (t, d, partition_of(d, self.partitions), ts)
            for (t, d), ts in seen.items()
            if (t, partition_of(d, self.partitions)) in self.owned
        ]
        if rows:
            self._spawn(self._quietly(self.store.save_seen(rows)))

    def forget_outbox(self, ids: list[int]) -> None:
        self._spawn(self._quietly(self.store.forget_outbox(ids)))

    async def _quietly(self, call: Any) -> None:
        try:
            await call
        except STORE_ERRORS as exc:
            # Last-seen times and outbox deletions are best effort: at worst a re-send, same ids.
            self.metrics.write_errors.inc()
            log.debug("shared store call failed: %s", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def tick(self) -> None:
        self.buffer.expire()
        self.metrics.buffered.set(len(self.buffer))

    # --- leases ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Open the store, then keep leases: heartbeat, renew, even out, take over expired ones."""
        # Renewal needs TTL/3; the 1 s cap is for hand-overs: a lease released by a stopping or
        # rebalancing peer is picked up within a second (a round is four small queries).
        interval = min(self.ttl_s / 3, ROUND_MAX_S)
        writer = asyncio.create_task(self._writer())
        try:
            while not stop.is_set():
                try:
                    await self.store.open(self.device_types, self.partitions)
                    await self.store.heartbeat(self.device_types)
                    break
                except STORE_ERRORS as exc:
                    self.metrics.write_errors.inc()
                    log.warning("shared store not reachable (%s); retrying", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
            self.ready = True
            # One round before the first grab: engines starting together see each other first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            while not stop.is_set():
                try:
                    await self._round()
                except Exception:  # a bug in one round must not end lease keeping
                    log.exception("lease round failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _round(self) -> None:
        try:
            live = await self.store.heartbeat(self.device_types)
            still = await self.store.renew(dict(self.owned))
            for key in [k for k in self.owned if k not in still]:
                self.lose(key, "lease taken by another engine", "lost")
            self._renewed_at = time.monotonic()
            if not self._store_up:
                self._store_up = True
                self.engine.lifecycle.recovered(f"shared store reachable; replica {self.replica}")
            free = await self.store.free(self.device_types)
            plan = plan_leases(self.owned, free, live, self.partitions)
            for key in plan.release:
                await self.release(key, "to even the load")
            for key in plan.acquire:
                acquired = await self.store.acquire(key)
                if acquired is not None:
                    try:
                        state = await self.store.load(key)
                    except BaseException:
                        await self.store.release(key, acquired.epoch)
                        raise
                    self.take(acquired, state)
        except STORE_ERRORS as exc:
            self.metrics.write_errors.inc()
            if self._store_up:
                self._store_up = False
                self.engine.lifecycle.degraded(f"shared store unreachable ({exc}); leases not renewed")
            # Past the TTL another engine may own them: stop acting on them (writes are fenced
            # anyway; this also stops the windows of devices it no longer owns from drifting).
            if time.monotonic() - self._renewed_at > self.ttl_s:
                for key in list(self.owned):
                    self.lose(key, "lease not renewed within its TTL", "lost")
        self.metrics.held.set(len(self.owned))
        self.metrics.buffered.set(len(self.buffer))

    async def release(self, key: PartitionKey, why: str) -> None:
        """Give a lease back: new readings of the partition are buffered from now on, its pending
        writes still commit (the lease is ours until the UPDATE below), then the next owner loads
        them."""
        epoch = self.owned.pop(key, None)
        if epoch is None:
            return
        self._releasing[key] = epoch
        try:
            await self._writes.join()
        finally:
            del self._releasing[key]
        self._forget(key, f"released {why}", "released")
        await self.store.release(key, epoch)

    def lose(self, key: PartitionKey, why: str, reason: str) -> None:
        """The lease is gone (taken, not renewed, a write fenced): stop acting on it at once."""
        if self.owned.pop(key, None) is not None:
            self._forget(key, why, reason)

    def _forget(self, key: PartitionKey, why: str, reason: str) -> None:
        evaluator = self.engine.evaluator
        for dev_key in [k for k in evaluator.devices if self.key(*k) == key]:
            device = evaluator.devices.pop(dev_key)
            if device.online is not None:  # kept as for any other engine's device: for a takeback
                self.presence[dev_key] = (device.online, device.presence_since)
        for saved_key in self._restored.pop(key, []):
            evaluator._saved.pop(saved_key, None)
        self.metrics.lost.labels(reason).inc()
        self.metrics.epoch.labels(key[0], str(key[1])).set(0)
        self.metrics.held.set(len(self.owned))
        log.info("partition %s/%d lost: %s", key[0], key[1], why)

    def warn_long_windows(self, rules: Sequence[StoredRule]) -> None:
        """One warning per rule whose window or ``for`` is longer than the hand-over buffer: on a
        takeover it restarts with what the buffer holds (docs/rules.md, the bound)."""
        limit_ms = self.buffer.max_age_s * 1000
        for rule in rules:
            if rule.when is None or (rule.id, rule.version) in self._warned:
                continue
            needed = max(history_ms(rule.when), history_ms(rule.clear_when) if rule.clear_when else 0)
            if needed > limit_ms:
                self._warned.add((rule.id, rule.version))
                log.warning(
                    "rule %s looks back %d s, more than IOTFLEET_RULES__HANDOVER_BUFFER_S (%g s): after"
                    " a takeover its window restarts from the hand-over buffer",
                    rule.name,
                    needed // 1000,
                    self.buffer.max_age_s,
                )

    # --- takeover -------------------------------------------------------------------------------
    def take(self, acquired: Acquired, state: PartitionState) -> None:
        """Own the partition from now on (synchronous: no reading is handled in between)."""
        key = acquired.key
        device_type = key[0]
        engine, evaluator = self.engine, self.engine.evaluator
        admission = engine.admissions.get(device_type)
        fences: dict[str, int] = {}
        for stored in state.states:
            device_id = stored.state.device_id
            fences[device_id] = max(fences.get(device_id, stored.at_ts), stored.at_ts)
        # Readings of the buffer, parsed once: (device, ts, values)
        readings: list[tuple[str, int, dict[str, Any]]] = []
        for item in self.buffer.take({key}):
            if admission is None:
                break
            try:
                admitted = admission.admit(item.payload, item.arrival_ms)
            except Rejected:
                continue
            for reading in admitted:
                ts = reading.ts if reading.ts is not None else item.arrival_ms
                readings.append((item.device_id, ts, reading.measurements()))
        readings.sort(key=lambda r: r[1])
        for dev_key in [k for k in evaluator.devices if self.key(*k) == key]:
            del evaluator.devices[dev_key]  # nothing of an earlier ownership survives
        warm = 0
        for device_id, ts, values in readings:
            if not replay_split(ts, fences.get(device_id)):
                evaluator.on_reading(device_type, device_id, ts, values, engine.directory.tags(device_id))
                warm += 1
        # The previous owner's firing state wins over what warming computed.
        saved = {(s.state.rule_id, s.state.device_id): s.state for s in state.states}
        restored: list[tuple[str, str]] = []
        for dev_key, device in evaluator.devices.items():
            if self.key(*dev_key) != key:
                continue
            for rule_id, rule_state in device.states.items():
                previous = saved.pop((rule_id, device.device_id), None)
                rule_state.active = previous.active if previous is not None else False
                rule_state.last_fired = previous.last_fired if previous is not None else None
        for saved_key, left in saved.items():
            evaluator._saved[saved_key] = left
            restored.append(saved_key)
        self._restored[key] = restored
        evaluator.dirty.clear()
        self.owned[key] = acquired.epoch
        self.metrics.epoch.labels(device_type, str(key[1])).set(acquired.epoch)
        self.metrics.held.set(len(self.owned))
        if acquired.previous_owner is not None:
            origin = "expired"
        else:
            origin = "never_held" if acquired.epoch == 1 else "released"
        self.metrics.takeovers.labels(origin).inc()
        for row_id, (topic, payload, properties) in state.outbox:
            engine.publish_held(None, topic, payload, properties, engine.forget_when_acked(row_id, None))
        live = 0
        for device_id, ts, values in readings:
            if replay_split(ts, fences.get(device_id)):
                live += 1
                firings = evaluator.on_reading(
                    device_type, device_id, ts, values, engine.directory.tags(device_id)
                )
                if firings:
                    engine.act(firings)
        for device_id, ts in state.seen.items():
            device = evaluator.device(device_type, device_id)
            if device.last_ts is None or ts > device.last_ts:
                device.last_ts = ts
        for (p_type, device_id), (online, since) in list(self.presence.items()):
            if p_type == device_type and self.key(p_type, device_id) == key:
                del self.presence[(p_type, device_id)]
                engine.on_status(p_type, device_id, online, since_ms=since)
        self.metrics.replayed.labels("warm").inc(warm)
        self.metrics.replayed.labels("live").inc(live)
        log.info(
            "partition %s/%d acquired (epoch %d)%s: replayed %d readings (%d warm only, %d evaluated),"
            " %d states, %d outbox messages sent again",
            device_type,
            key[1],
            acquired.epoch,
            f", taken over from {acquired.previous_owner}" if acquired.previous_owner else "",
            warm + live,
            warm,
            live,
            len(state.states),
            len(state.outbox),
        )

    async def drain_writes(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._writes.join(), timeout_s)

    async def shutdown(self) -> None:
        """A clean stop: pending writes done, leases released (a peer takes them at once)."""
        await self.drain_writes(5.0)
        for key in list(self.owned):
            with contextlib.suppress(Exception):
                await self.release(key, "at stop")
        with contextlib.suppress(Exception):
            await self.store.leave()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2.0)
        await self.store.close()

    def health(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "partitions": self.partitions,
            "held": sorted(f"{t}/{p}" for t, p in self.owned),
            "shared_store": self._store_up,
            "handover_buffer": len(self.buffer),
        }


def history_ms(condition: object) -> int:
    """How far back in reading time a condition looks (its longest ``window`` or ``for``)."""
    if isinstance(condition, FieldCondition):
        return max(duration_ms(d) if d else 0 for d in (condition.window, condition.for_))
    if isinstance(condition, AllCondition):
        return max(history_ms(c) for c in condition.all)
    if isinstance(condition, AnyCondition):
        return max(history_ms(c) for c in condition.any)
    return 0
