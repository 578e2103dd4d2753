"""Alembic environment: run on the connection handed over by ``db.run_migrations``.

Standalone use (``alembic -c device_registry/alembic.ini upgrade head``) reads
the URL from IOTFLEET_REGISTRY__DATABASE_URL or the default SQLite file.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from device_registry import models, models_rules, models_state  # noqa: F401  (registers the tables on Base)
from device_registry.db import Base, create_engine

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from iotfleet.settings import load_settings

    engine = create_engine(load_settings().registry_database_url())
    async with engine.begin() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_standalone())
