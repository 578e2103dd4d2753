"""Database engine, sessions and schema migrations (SQLAlchemy 2 async + Alembic).

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) when the URL says so. The
schema is owned by Alembic: ``run_migrations`` upgrades to head on every start,
so an old registry DB is brought forward before the API serves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from iotfleet.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SUPPORTED_DRIVERS = {"sqlite+aiosqlite", "postgresql+asyncpg"}


class Base(DeclarativeBase):
    """Declarative base of every registry table (other routers' models subclass it too)."""


def check_database_url(url: str) -> str:
    """Return ``url`` if it is an async URL we support; raise ConfigError naming the setting otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"IOTFLEET_REGISTRY__DATABASE_URL: not a database URL ({exc})") from None
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise ConfigError(
            f"IOTFLEET_REGISTRY__DATABASE_URL: driver {parsed.drivername!r} is not supported; use "
            "sqlite+aiosqlite:///path/registry.db or postgresql+asyncpg://user:pass@host/db"
        )
    return url


def create_engine(url: str, *, sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL") -> AsyncEngine:
    check_database_url(url)
    if sqlite_synchronous not in ("FULL", "NORMAL"):  # it goes into a PRAGMA
        raise ConfigError(
            f"IOTFLEET_REGISTRY__SQLITE_SYNCHRONOUS: {sqlite_synchronous!r} is not FULL or NORMAL"
        )
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the presence flusher write while API requests read; the
            # busy timeout makes concurrent writers wait instead of failing.
            # synchronous=FULL (IOTFLEET_REGISTRY__SQLITE_SYNCHRONOUS): a commit is fsync'd before it returns. What the registry
            # commits it then acknowledges (a 201 to the API client, a PUBACK to the broker
            # for a command/alert event), so it must survive an OS crash or power loss too;
            # NORMAL may roll the last commits back then. Cost: one fsync per transaction
            # (~6-16 ms on the reference disk; the tracker commits events in batches):
            # docs/benchmarks.md, "Durability".
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def run_migrations(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """Upgrade the schema to head (a no-op when it is current); return (revision before, after)."""

    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    def upgrade(connection: Connection) -> tuple[str | None, str | None]:
        before = current(connection)
        command.upgrade(alembic_config(connection), "head")
        return before, current(connection)

    # Alembic logs several INFO lines per run; the registry logs one line itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    async with engine.begin() as connection:
        return await connection.run_sync(upgrade)
