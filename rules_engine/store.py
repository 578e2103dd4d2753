"""The engine's firing state on disk (SQLite, stdlib): what must survive a restart.

Per (rule, device): active or not, and when it last fired (cooldown); per
device: the newest reading time (absence). Windows and ``for`` timers are not
kept: they rebuild from the readings the persistent MQTT session delivers.
The last rule set fetched is cached too, so a restart while the registry is
down evaluates with the rules it had. Firing transitions are rare, so each one is written when it happens (WAL, no
fsync: see below); last-seen times are flushed on each tick.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from rules_engine.evaluator import SavedState

SCHEMA = """
CREATE TABLE IF NOT EXISTS rule_state (
    rule_id TEXT NOT NULL, device_id TEXT NOT NULL, active INTEGER NOT NULL, last_fired INTEGER,
    PRIMARY KEY (rule_id, device_id));
CREATE TABLE IF NOT EXISTS rules_cache (
    id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS last_seen (
    device_type TEXT NOT NULL, device_id TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (device_type, device_id));
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    properties BLOB NOT NULL);
"""

SAVE_LAST_SEEN = "INSERT INTO last_seen VALUES (?, ?, ?) ON CONFLICT (device_type, device_id) DO UPDATE SET ts = max(ts, excluded.ts)"

#: A message a firing caused: (topic, payload, MQTT 5 property block).
OutboxMessage = tuple[str, bytes, bytes]


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the engine's loop and its store writer thread: its own lock
        # serialises them, or the two would interleave their transactions.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # No fsync: a commit survives the process being killed (it is in the OS page cache), which is
        # the failure that matters here; an fsync inline on the MQTT thread would stall evaluation
        # (a WAL checkpoint fsync takes tens of ms on a busy disk). After an OS crash the last
        # transitions may be lost: a rule then fires again (at least once), never silently stops.
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(SCHEMA)

    def save(
        self,
        states: Iterable[SavedState],
        outbox: Sequence[OutboxMessage] = (),
        seen: Sequence[tuple[str, str, int]] = (),
    ) -> list[int]:
        """Store firing states, the messages those firings send and their devices' newest reading
        times, in one transaction.

        The transactional outbox: a firing is on disk if and only if its commands and alert events
        are, so a crash at any point neither forgets a firing's messages nor fires it again; with
        the reading time stored too, the readings the broker delivers again after a crash are
        older than it and skipped (not evaluated a second time). Returns the outbox row ids, in
        order, for :meth:`forget_outbox` once the broker acked each.
        """
        rows = [(s.rule_id, s.device_id, int(s.active), s.last_fired) for s in states]
        if not rows and not outbox:
            return []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO rule_state VALUES (?, ?, ?, ?) ON CONFLICT (rule_id, device_id) "
                    "DO UPDATE SET active = excluded.active, last_fired = excluded.last_fired",
                    rows,
                )
                self._db.executemany(SAVE_LAST_SEEN, seen)
                ids = [
                    int(
                        self._db.execute(
                            "INSERT INTO outbox (topic, payload, properties) VALUES (?, ?, ?)", m
                        ).lastrowid
                        or 0
                    )
                    for m in outbox
                ]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return ids

    def load_outbox(self) -> list[tuple[int, OutboxMessage]]:
        """Messages stored by firings whose PUBACK was not recorded: sent again at start."""
        with self._lock:
            return [
                (row_id, (topic, bytes(payload), bytes(properties)))
                for row_id, topic, payload, properties in self._db.execute("SELECT * FROM outbox ORDER BY id")
            ]

    def forget_outbox(self, ids: Sequence[int]) -> None:
        """Drop outbox rows the broker acked."""
        self._many("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def save_last_seen(self, items: Iterable[tuple[str, str, int]]) -> None:
        self._many(SAVE_LAST_SEEN, list(items))

    def forget_last_seen_after(self, max_ts: int) -> int:
        """Delete last-seen times later than ``max_ts`` (never from an admitted reading); return how many."""
        with self._lock:
            return self._db.execute("DELETE FROM last_seen WHERE ts > ?", (max_ts,)).rowcount

    def _many(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        if not rows:
            return
        # Autocommit connection: one explicit transaction per batch, not one per row.
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def save_rules(self, body: bytes) -> None:
        """The last rule set and directory fetched: a restart while the registry is down uses them."""
        self._many(
            "INSERT INTO rules_cache VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            [(body,)],
        )

    def load_rules(self) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM rules_cache WHERE id = 1").fetchone()
        return bytes(row[0]) if row else None

    def load(self) -> tuple[list[SavedState], dict[tuple[str, str], int]]:
        with self._lock:
            states = [
                SavedState(rule_id, device_id, bool(active), last_fired)
                for rule_id, device_id, active, last_fired in self._db.execute("SELECT * FROM rule_state")
            ]
            seen = {(t, d): ts for t, d, ts in self._db.execute("SELECT * FROM last_seen")}
        return states, seen

    def close(self) -> None:
        with self._lock:
            self._db.close()
