"""``/healthz`` (open: the supervisor probes it) and ``/metrics`` (Prometheus, viewer key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from device_registry.deps import CurrentViewer, StateDep
from device_registry.problems import PROBLEM_RESPONSES

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Health: DB reachable, broker links up, last reconcile, whether this replica holds the lease",
    responses={503: {"description": "Degraded: the body says what is down"}},
)
async def healthz(state: StateDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        async with state.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}: {exc}"
    checks["broker_admin"] = "ok" if state.broker.connected else f"down: {state.broker.link.last_error}"
    checks["broker_agent"] = "ok" if state.agent.reachable else f"down: {state.agent.last_error}"
    if state.lease.holding:
        checks["broker_presence"] = (
            "ok" if state.presence.connected else f"down: {state.presence.link.last_error}"
        )
    # A standby replica serves the API; the holder's once-only work (presence, the tracker, …)
    # is not its to run: ``lease`` says which one this is.
    last = state.reconciler.last
    reconcile: dict[str, Any] | None = None
    if last is not None:
        reconcile = {
            "ok": last.ok,
            "finished_at": last.finished_at.isoformat() if last.finished_at else None,
            "devices_checked": last.devices_checked,
            "drift_count": last.drift_count,
            "error": last.error,
        }
    healthy = all(v == "ok" for v in checks.values())
    body = {
        "status": "ok" if healthy else "degraded",
        "checks": checks,
        "reconcile": reconcile,
        "lease": state.lease.describe(),
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **PROBLEM_RESPONSES},
)
async def metrics(state: StateDep, _caller: CurrentViewer) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
