"""The Alembic migrations build exactly the tables the models declare (SQLite file, no servers)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from device_registry import db, models

OURS = {"devices", "api_keys"}


def _table_of(diff: object) -> str | None:
    item = diff[0] if isinstance(diff, list) else diff
    for part in item if isinstance(item, tuple) else ():
        name = getattr(part, "name", None) if not isinstance(part, str) else None
        table = getattr(part, "table", None)
        if table is not None and getattr(table, "name", None):
            return str(table.name)
        if name in OURS:
            return str(name)
        if isinstance(part, str) and part in OURS:
            return part
    return None


async def test_migrations_match_the_models(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    before, after = await db.run_migrations(engine)
    assert before is None and after is not None
    again = await db.run_migrations(engine)  # idempotent
    assert again == (after, after)

    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, models.Base.metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    ours = [d for d in differences if _table_of(d) in OURS]
    assert not ours, ours
