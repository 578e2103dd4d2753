"""Leases and the partitions' firing state in PostgreSQL (asyncpg, on the engine's loop).

Used only when ``IOTFLEET_RULES__PARTITIONS`` > 0 (docs/rules.md, "Running several engines").

- ``rules_engines``: one heartbeat row per engine (its device types): how many engines are live.
- ``rules_leases``: one row per (device type, partition): owner, fencing ``epoch`` (bumped on
  every acquisition) and expiry. Times are the database's ``now()``, never a host's clock, so
  clock skew between hosts does not shorten or stretch a lease.
- ``rules_part_state`` / ``rules_part_seen`` / ``rules_part_outbox``: what the local SQLite store
  keeps in single-engine mode, per partition. ``at_ts`` on a state row is the reading time of
  the transition that wrote it: a taker replays older readings without firing (partitioning.py).

Fencing: every state write checks, in its own statement (one transaction, one round trip) and
under a row lock on the lease (``FOR SHARE``: an acquisition's UPDATE waits for it), that the
writer still owns the lease at the epoch it acquired; otherwise :class:`Fenced` and nothing is written. A taker bumps the epoch
before it loads the state, so a write it cannot see can no longer commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from rules_engine.evaluator import SavedState
from rules_engine.partitioning import PartitionKey
from rules_engine.store import OutboxMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS rules_engines (
    replica TEXT PRIMARY KEY, device_types TEXT[] NOT NULL, seen_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS rules_leases (
    device_type TEXT NOT NULL, part INTEGER NOT NULL, owner TEXT, epoch BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT 'epoch', PRIMARY KEY (device_type, part));
CREATE TABLE IF NOT EXISTS rules_part_state (
    device_type TEXT NOT NULL, part INTEGER NOT NULL, rule_id TEXT NOT NULL, device_id TEXT NOT NULL,
    active BOOLEAN NOT NULL, last_fired BIGINT, at_ts BIGINT NOT NULL,
    PRIMARY KEY (rule_id, device_id));
CREATE INDEX IF NOT EXISTS rules_part_state_part ON rules_part_state (device_type, part);
CREATE TABLE IF NOT EXISTS rules_part_seen (
    device_type TEXT NOT NULL, device_id TEXT NOT NULL, part INTEGER NOT NULL, ts BIGINT NOT NULL,
    PRIMARY KEY (device_type, device_id));
CREATE INDEX IF NOT EXISTS rules_part_seen_part ON rules_part_seen (device_type, part);
CREATE TABLE IF NOT EXISTS rules_part_outbox (
    id BIGSERIAL PRIMARY KEY, device_type TEXT NOT NULL, part INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BYTEA NOT NULL, properties BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS rules_part_outbox_part ON rules_part_outbox (device_type, part);
"""

SAVE_SEEN = (
    "INSERT INTO rules_part_seen VALUES ($1, $2, $3, $4) ON CONFLICT (device_type, device_id)"
    " DO UPDATE SET ts = GREATEST(rules_part_seen.ts, excluded.ts), part = excluded.part"
)

# The whole fenced write of a burst as one statement (an implicit transaction: all or nothing).
# ``lease`` locks the lease rows still ours at the writes' epochs FOR SHARE, in key order: an
# acquisition's UPDATE waits for this statement to commit, and if an acquisition committed
# first, the lock re-reads the row, the epoch no longer matches and the row is left out. Only
# rows of partitions in ``lease`` are written; the partitions written come back with the ids.
SAVE_MANY = """
WITH lease AS (
    SELECT l.device_type, l.part, l.epoch FROM rules_leases l
    JOIN unnest($1::text[], $2::int[], $3::bigint[]) AS w(t, p, e)
        ON l.device_type = w.t AND l.part = w.p AND l.epoch = w.e
    WHERE l.owner = $4 ORDER BY l.device_type, l.part FOR SHARE OF l
), st AS (
    INSERT INTO rules_part_state
    SELECT s.t, s.p, s.r, s.d, s.a, s.f, s.at
    FROM unnest($5::text[], $6::int[], $7::bigint[], $8::text[], $9::text[], $10::bool[],
                $11::bigint[], $12::bigint[]) AS s(t, p, e, r, d, a, f, at)
    JOIN lease ON lease.device_type = s.t AND lease.part = s.p AND lease.epoch = s.e
    ON CONFLICT (rule_id, device_id) DO UPDATE SET active = excluded.active,
        last_fired = excluded.last_fired, at_ts = excluded.at_ts, part = excluded.part
), sn AS (
    INSERT INTO rules_part_seen
    SELECT s.t, s.d, s.p, s.ts
    FROM unnest($13::text[], $14::int[], $15::bigint[], $16::text[], $17::bigint[])
        AS s(t, p, e, d, ts)
    JOIN lease ON lease.device_type = s.t AND lease.part = s.p AND lease.epoch = s.e
    ON CONFLICT (device_type, device_id)
        DO UPDATE SET ts = GREATEST(rules_part_seen.ts, excluded.ts), part = excluded.part
), ob AS (
    INSERT INTO rules_part_outbox (device_type, part, topic, payload, properties)
    SELECT o.t, o.p, o.topic, o.payload, o.props
    FROM unnest($18::text[], $19::int[], $20::bigint[], $21::text[], $22::bytea[], $23::bytea[])
        WITH ORDINALITY AS o(t, p, e, topic, payload, props, n)
    JOIN lease ON lease.device_type = o.t AND lease.part = o.p AND lease.epoch = o.e
    ORDER BY o.n
    RETURNING id
)
SELECT (SELECT array_agg(device_type) FROM lease), (SELECT array_agg(part) FROM lease),
       (SELECT array_agg(epoch) FROM lease), (SELECT array_agg(id) FROM ob)
"""


class Fenced(Exception):
    """This engine no longer owns the partition at the epoch it acquired: the write was refused."""


@dataclass(frozen=True, slots=True)
class Acquired:
    key: PartitionKey
    epoch: int
    previous_owner: str | None


@dataclass(frozen=True, slots=True)
class StoredState:
    state: SavedState
    at_ts: int
    """Reading time of the transition that wrote the state: a taker's replay fires only after it."""


@dataclass(frozen=True, slots=True)
class StateWrite:
    """What one transition (or one tick's transitions) of one partition stores."""

    key: PartitionKey
    epoch: int
    states: Sequence[StoredState]
    outbox: Sequence[OutboxMessage]
    seen: Sequence[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class PartitionState:
    states: list[StoredState]
    seen: dict[str, int]
    outbox: list[tuple[int, OutboxMessage]]


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes ``postgresql://``; accept SQLAlchemy's ``postgresql+asyncpg://`` too."""
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class SharedStore:
    def __init__(self, url: str, replica: str, ttl_s: float) -> None:
        self.dsn = asyncpg_dsn(url)
        self.replica = replica
        self.ttl_s = ttl_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the shared store is not open")
        return self._pool

    async def open(self, device_types: Sequence[str], partitions: int) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=10)
        # Two engines starting together: the advisory lock keeps their CREATEs apart.
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7130019)")
            await conn.execute(SCHEMA)
            await conn.executemany(
                "INSERT INTO rules_leases (device_type, part) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(t, p) for t in device_types for p in range(partitions)],
            )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- leases ---------------------------------------------------------------------------
    async def heartbeat(self, device_types: Sequence[str]) -> dict[str, int]:
        """Record this engine as live; return the live engines per device type (self included)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO rules_engines VALUES ($1, $2, now()) ON CONFLICT (replica)"
                " DO UPDATE SET device_types = excluded.device_types, seen_at = now()",
                self.replica,
                list(device_types),
            )
            rows = await conn.fetch(
                "SELECT t, count(*) FROM rules_engines, unnest(device_types) AS t"
                " WHERE seen_at > now() - make_interval(secs => $1) AND t = ANY($2) GROUP BY t",
                self.ttl_s,
                list(device_types),
            )
        return {t: int(n) for t, n in rows}

    async def renew(self, held: dict[PartitionKey, int]) -> set[PartitionKey]:
        """Extend the leases held at their epochs; return those still ours."""
        if not held:
            return set()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "UPDATE rules_leases l SET expires_at = now() + make_interval(secs => $1)"
                " FROM unnest($2::text[], $3::int[], $4::bigint[]) AS h(t, p, e)"
                " WHERE l.device_type = h.t AND l.part = h.p AND l.epoch = h.e AND l.owner = $5"
                " RETURNING l.device_type, l.part",
                self.ttl_s,
                [k[0] for k in held],
                [k[1] for k in held],
                list(held.values()),
                self.replica,
            )
        return {(t, p) for t, p in rows}

    async def free(self, device_types: Sequence[str]) -> list[PartitionKey]:
        """Leases nobody holds (released, or expired: a dead engine's)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT device_type, part FROM rules_leases WHERE device_type = ANY($1)"
                " AND (owner IS NULL OR expires_at < now())",
                list(device_types),
            )
        return [(t, p) for t, p in rows]

    async def acquire(self, key: PartitionKey) -> Acquired | None:
        """Take a free or expired lease, bumping its epoch (None if another engine was quicker)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE rules_leases l SET owner = $3, epoch = l.epoch + 1,"
                " expires_at = now() + make_interval(secs => $4)"
                " FROM (SELECT owner FROM rules_leases WHERE device_type = $1 AND part = $2 FOR UPDATE) old"
                " WHERE l.device_type = $1 AND l.part = $2 AND (l.owner IS NULL OR l.expires_at < now())"
                " RETURNING l.epoch, old.owner",
                key[0],
                key[1],
                self.replica,
                self.ttl_s,
            )
        if row is None:
            return None
        return Acquired(key, int(row[0]), row[1])

    async def release(self, key: PartitionKey, epoch: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE rules_leases SET owner = NULL, expires_at = now()"
                " WHERE device_type = $1 AND part = $2 AND owner = $3 AND epoch = $4",
                key[0],
                key[1],
                self.replica,
                epoch,
            )

    async def leave(self) -> None:
        """A clean stop: this engine no longer counts as live."""
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM rules_engines WHERE replica = $1", self.replica)

    # --- state ----------------------------------------------------------------------------
    async def save(
        self,
        key: PartitionKey,
        epoch: int,
        states: Sequence[StoredState],
        outbox: Sequence[OutboxMessage],
        seen: Sequence[tuple[str, int]],
    ) -> list[int]:
        """One partition's write (see :meth:`save_many`); raise :class:`Fenced` if refused."""
        (ids,) = await self.save_many([StateWrite(key, epoch, states, outbox, seen)])
        if ids is None:
            raise Fenced(f"{key[0]}/{key[1]}: epoch {epoch} is stale")
        return ids

    async def save_many(self, writes: Sequence[StateWrite]) -> list[list[int] | None]:
        """Firing states, their messages and reading times, fenced, in one statement.

        Per write: the outbox row ids in order, or None if this engine no longer holds the
        partition at the write's epoch (nothing of that write is stored). The writes of a burst
        share one statement: one round trip and one commit for many transitions (a prepared
        statement; on a loop that also evaluates readings every round trip is latency).
        """
        keys = sorted({(w.key, w.epoch) for w in writes})
        # One row per (rule, device) and per device: ON CONFLICT cannot touch a row twice in
        # one statement. Later writes of the batch win (their epoch is the same or newer).
        states: dict[tuple[str, str], tuple[PartitionKey, int, StoredState]] = {}
        seen: dict[tuple[str, str], tuple[PartitionKey, int, int]] = {}
        outbox: list[tuple[PartitionKey, int, OutboxMessage]] = []
        for write in writes:
            for stored in write.states:
                states[(stored.state.rule_id, stored.state.device_id)] = (write.key, write.epoch, stored)
            for device_id, ts in write.seen:
                before = seen.get((write.key[0], device_id))
                seen[(write.key[0], device_id)] = (
                    write.key,
                    write.epoch,
                    max(ts, before[2] if before else ts),
                )
            outbox += [(write.key, write.epoch, message) for message in write.outbox]
        state_rows = list(states.values())
        seen_rows = [(key, epoch, device_id, ts) for (_, device_id), (key, epoch, ts) in seen.items()]
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                SAVE_MANY,
                [k[0][0] for k in keys],
                [k[0][1] for k in keys],
                [k[1] for k in keys],
                self.replica,
                [r[0][0] for r in state_rows],
                [r[0][1] for r in state_rows],
                [r[1] for r in state_rows],
                [r[2].state.rule_id for r in state_rows],
                [r[2].state.device_id for r in state_rows],
                [r[2].state.active for r in state_rows],
                [r[2].state.last_fired for r in state_rows],
                [r[2].at_ts for r in state_rows],
                [r[0][0] for r in seen_rows],
                [r[0][1] for r in seen_rows],
                [r[1] for r in seen_rows],
                [r[2] for r in seen_rows],
                [r[3] for r in seen_rows],
                [o[0][0] for o in outbox],
                [o[0][1] for o in outbox],
                [o[1] for o in outbox],
                [o[2][0] for o in outbox],
                [o[2][1] for o in outbox],
                [o[2][2] for o in outbox],
            )
        assert row is not None
        held = {
            ((t, int(p)), int(e)) for t, p, e in zip(row[0] or [], row[1] or [], row[2] or [], strict=True)
        }
        # Outbox ids are drawn in the batch's order (ORDER BY n): ascending ids map, in order,
        # onto the messages of the writes that passed the fence.
        ids = iter(sorted(int(i) for i in row[3] or []))
        out: list[list[int] | None] = []
        for write in writes:
            if (write.key, write.epoch) not in held:
                out.append(None)
                continue
            out.append([next(ids) for _ in write.outbox])
        return out

    async def save_seen(self, rows: Sequence[tuple[str, str, int, int]]) -> None:
        """(type, device, partition, ts): newest reading times, for absence after a takeover."""
        if rows:
            async with self.pool.acquire() as conn:
                await conn.executemany(SAVE_SEEN, rows)

    async def forget_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            async with self.pool.acquire() as conn:
                await conn.execute("DELETE FROM rules_part_outbox WHERE id = ANY($1::bigint[])", list(ids))

    async def load(self, key: PartitionKey) -> PartitionState:
        device_type, part = key
        async with self.pool.acquire() as conn:
            states = await conn.fetch(
                "SELECT rule_id, device_id, active, last_fired, at_ts FROM rules_part_state"
                " WHERE device_type = $1 AND part = $2",
                device_type,
                part,
            )
            seen = await conn.fetch(
                "SELECT device_id, ts FROM rules_part_seen WHERE device_type = $1 AND part = $2",
                device_type,
                part,
            )
            outbox = await conn.fetch(
                "SELECT id, topic, payload, properties FROM rules_part_outbox"
                " WHERE device_type = $1 AND part = $2 ORDER BY id",
                device_type,
                part,
            )
        return PartitionState(
            [StoredState(SavedState(r[0], r[1], bool(r[2]), r[3]), int(r[4])) for r in states],
            {r[0]: int(r[1]) for r in seen},
            [(int(r[0]), (r[1], bytes(r[2]), bytes(r[3]))) for r in outbox],
        )


def _state_row(key: PartitionKey, stored: StoredState) -> tuple[object, ...]:
    state = stored.state
    return (key[0], key[1], state.rule_id, state.device_id, state.active, state.last_fired, stored.at_ts)
