"""Leases and the partitions' firing state in PostgreSQL (asyncpg, on the engine's loop).

Used only when ``IOTFLEET_RULES__PARTITIONS`` > 0 (docs/rules.md, "Running several engines").

- ``rules_engines``: one heartbeat row per engine (its device types): how many engines are live.
- ``rules_leases``: one row per (device type, partition): owner, fencing ``epoch`` (bumped on
  every acquisition) and expiry. Times are the database's ``now()``, never a host's clock, so
  clock skew between hosts does not shorten or stretch a lease.
- ``rules_part_state`` / ``rules_part_seen`` / ``rules_part_outbox``: what the local SQLite store
  keeps in single-engine mode, per partition. ``at_ts`` on a state row is the reading time of
  the transition that wrote it: a taker replays older readings without firing (partitioning.py).

Fencing: every state write checks, in its own transaction and under a row lock on the lease
(``FOR SHARE``: an acquisition's UPDATE waits for it), that the writer still owns the lease at the
epoch it acquired; otherwise :class:`Fenced` and nothing is written. A taker bumps the epoch
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
        """Firing states, their messages and reading times, fenced, in one transaction.

        Per write: the outbox row ids in order, or None if this engine no longer holds the
        partition at the write's epoch (nothing of that write is stored). The writes of a burst
        share the transaction: one commit for many transitions.
        """
        keys = sorted({w.key for w in writes})
        async with self.pool.acquire() as conn, conn.transaction():
            leases = await conn.fetch(
                "SELECT device_type, part, owner, epoch FROM rules_leases"
                " WHERE (device_type, part) IN (SELECT * FROM unnest($1::text[], $2::int[]))"
                " ORDER BY device_type, part FOR SHARE",
                [k[0] for k in keys],
                [k[1] for k in keys],
            )
            current = {(r[0], int(r[1])): (r[2], int(r[3])) for r in leases}
            out: list[list[int] | None] = []
            state_rows: list[tuple[object, ...]] = []
            seen_rows: list[tuple[object, ...]] = []
            for write in writes:
                device_type, part = write.key
                if current.get(write.key) != (self.replica, write.epoch):
                    out.append(None)
                    continue
                state_rows += [_state_row(write.key, s) for s in write.states]
                seen_rows += [(device_type, d, part, ts) for d, ts in write.seen]
                ids: list[int] = []
                for topic, payload, properties in write.outbox:
                    row_id = await conn.fetchval(
                        "INSERT INTO rules_part_outbox (device_type, part, topic, payload, properties)"
                        " VALUES ($1, $2, $3, $4, $5) RETURNING id",
                        device_type,
                        part,
                        topic,
                        payload,
                        properties,
                    )
                    ids.append(int(row_id))
                out.append(ids)
            if state_rows:
                await conn.executemany(
                    "INSERT INTO rules_part_state VALUES ($1, $2, $3, $4, $5, $6, $7)"
                    " ON CONFLICT (rule_id, device_id) DO UPDATE SET active = excluded.active,"
                    " last_fired = excluded.last_fired, at_ts = excluded.at_ts, part = excluded.part",
                    state_rows,
                )
            if seen_rows:
                await conn.executemany(SAVE_SEEN, seen_rows)
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
