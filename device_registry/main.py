"""Entry point of the registry (placeholder until the registry issue lands): /healthz only."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from iotfleet.errors import ConfigError
from iotfleet.lifecycle import configure_logging, fail_fast
from iotfleet.settings import Settings, load_settings


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="iotfleet registry")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as error:
        fail_fast(error, "registry")
        return
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings), host=settings.registry.host, port=settings.registry.port, log_level="warning"
    )
