"""The registry ↔ broker reconcile report, and a way to run it now (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from device_registry.deps import CurrentAdmin, StateDep
from device_registry.problems import PROBLEM_RESPONSES, BrokerUnavailable, Problem

router = APIRouter(prefix="/api/v1/reconcile", tags=["broker"], responses=PROBLEM_RESPONSES)


@router.get("", summary="The last reconcile report", responses={404: {}})
async def last_report(state: StateDep, _caller: CurrentAdmin) -> dict[str, Any]:
    if state.reconciler.last is None:
        raise Problem(
            404, "no reconcile has run yet (the broker agent may not be reachable)", slug="no-report"
        )
    return state.reconciler.last.as_dict()


@router.post("", summary="Reconcile the broker with the registry now", responses={503: {}})
async def run_now(state: StateDep, _caller: CurrentAdmin) -> dict[str, Any]:
    report = await state.reconciler.run()
    if not report.ok and not state.agent.reachable:
        raise BrokerUnavailable(f"the broker agent is not reachable ({state.agent.last_error})")
    if not report.ok:
        raise Problem(502, f"reconcile failed: {report.error}", slug="reconcile-failed")
    return report.as_dict()
