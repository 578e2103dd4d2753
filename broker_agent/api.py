"""The agent's HTTP API (for the registry, bearer token) and its /healthz and /metrics."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import AfterValidator, BaseModel, Field

from broker_agent.agent import Agent, AgentError, AgentFiles, AgentMetrics, ApplyResult
from iotfleet import broker_files, topics
from iotfleet.settings import Settings

MAX_CHANGES = 200_000


class Entry(BaseModel):
    # The checks raise ValueError subclasses (TopicError): pydantic reports them as 422 details.
    id: Annotated[str, AfterValidator(topics.check_device_id)]
    type: Annotated[str, AfterValidator(topics.check_device_type)]
    hash: Annotated[str, AfterValidator(broker_files.check_hash)]


class Changes(BaseModel):
    """Entries to add or replace (a new hash kicks the live session) and usernames to remove (kicked)."""

    upsert: list[Entry] = Field(default_factory=list, max_length=MAX_CHANGES)
    remove: list[str] = Field(default_factory=list, max_length=MAX_CHANGES)


def create_app(settings: Settings) -> FastAPI:
    if settings.broker_agent.token is None:
        raise ValueError("IOTFLEET_BROKER_AGENT__TOKEN is required")
    token = settings.broker_agent.token.get_secret_value()
    devices_file, pid_file = settings.agent_files()
    registry = CollectorRegistry()
    agent = Agent(
        AgentFiles(devices_file, pid_file),
        settings.mqtt.host,
        settings.mqtt.port,
        AgentMetrics(registry),
        batch_window_s=settings.broker_agent.batch_window_ms / 1000,
        reload_timeout_s=settings.broker_agent.reload_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        agent.load()
        writer = asyncio.create_task(agent.run(), name="agent-writer")
        try:
            yield
        finally:
            writer.cancel()

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {token}"
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="iotfleet broker agent", version="1.0", lifespan=lifespan)
    app.state.agent = agent
    auth = [Depends(authorized)]

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = agent.last_error is None
        body = {
            "status": "ok" if ok else "degraded",
            "boot_id": agent.boot_id,
            "generation": agent.generation,
            "devices": len(agent.entries),
            "broker": agent.broker_state,
            "error": agent.last_error,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/devices", dependencies=auth)
    async def devices() -> dict[str, Any]:
        """Every device entry as id → fingerprint of its type and hash (for the registry's reconcile)."""
        return {
            "boot_id": agent.boot_id,
            "generation": agent.generation,
            "devices": {u: e.fingerprint() for u, e in agent.entries.items()},
        }

    @app.post("/v1/changes", dependencies=auth)
    async def changes(body: Changes) -> dict[str, Any]:
        try:
            result: ApplyResult = await agent.submit(
                {e.id: broker_files.DeviceEntry(e.type, e.hash) for e in body.upsert}, body.remove
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except AgentError as exc:
            raise HTTPException(503, f"device files not written: {exc}") from None
        return {
            "generation": result.generation,
            "devices": result.devices,
            "reloaded": result.reloaded,
            "write_s": result.write_s,
            "reload_s": result.reload_s,
        }

    return app
