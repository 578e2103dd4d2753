"""The registry's InfluxDB client: one pooled ``InfluxClient`` per app, opened and closed with it.

The telemetry router brings its own lifespan (FastAPI merges a router's
lifespan into the app's when the router is included), so the app factory
needs no telemetry-specific lines: the client is created from the registry's
settings after the app's own start-up and closed before its shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from device_registry.telemetry.service import CountsCache
from iotfleet.influx import InfluxClient
from iotfleet.settings import Settings

STATE_ATTR = "telemetry_influx"
CACHE_ATTR = "telemetry_counts_cache"
MAX_CONNECTIONS = 16
"""Concurrent InfluxDB requests of one registry process (queries are short; the pool is reused)."""


def _settings(app: FastAPI) -> Settings:
    registry_state = getattr(app.state, "registry", None)
    if registry_state is not None:
        settings: Settings = registry_state.settings
        return settings
    configured: Settings | None = getattr(app.state, "settings", None)
    return configured if configured is not None else Settings()


@asynccontextmanager
async def influx_lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = InfluxClient(_settings(app).influx, max_connections=MAX_CONNECTIONS)
    setattr(app.state, STATE_ATTR, client)
    setattr(app.state, CACHE_ATTR, CountsCache())
    try:
        yield
    finally:
        setattr(app.state, STATE_ATTR, None)
        await client.aclose()


def get_influx(request: Request) -> InfluxClient:
    client: InfluxClient | None = getattr(request.app.state, STATE_ATTR, None)
    if client is None:
        # Only when the app was run without its lifespan (e.g. a bare TestClient):
        # create the client on first use rather than fail every telemetry request.
        client = InfluxClient(_settings(request.app).influx, max_connections=MAX_CONNECTIONS)
        setattr(request.app.state, STATE_ATTR, client)
    return client


InfluxDep = Annotated[InfluxClient, Depends(get_influx)]


def get_counts_cache(request: Request) -> CountsCache:
    cache: CountsCache | None = getattr(request.app.state, CACHE_ATTR, None)
    if cache is None:
        cache = CountsCache()
        setattr(request.app.state, CACHE_ATTR, cache)
    return cache


CountsCacheDep = Annotated[CountsCache, Depends(get_counts_cache)]
