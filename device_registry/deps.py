"""FastAPI dependencies shared by every router: DB session, registry state, the caller's API key.

Use the ``Annotated`` aliases in route signatures::

    @router.get("/things")
    async def list_things(session: SessionDep, caller: CurrentViewer) -> ...

Roles nest: ``CurrentViewer`` accepts viewer, operator and admin keys;
``CurrentOperator`` operator and admin; ``CurrentAdmin`` admin only. For
another role check use ``Depends(require_role(Role.operator))``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry import auth
from device_registry.models import Role
from device_registry.problems import Problem
from device_registry.state import RegistryState
from iotfleet.settings import Settings

bearer_scheme = HTTPBearer(
    auto_error=False, description="An API key: `Authorization: Bearer ifk_…` (roles viewer/operator/admin)"
)


def get_state(request: Request) -> RegistryState:
    state: RegistryState = request.app.state.registry
    return state


StateDep = Annotated[RegistryState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    """The API key a request was made with."""

    key_id: str
    name: str
    role: Role


async def get_caller(
    state: StateDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    challenge = {"WWW-Authenticate": 'Bearer realm="iotfleet"'}
    if credentials is None:
        state.metrics.auth_failures.labels("missing").inc()
        raise Problem(
            401,
            "an API key is required: send `Authorization: Bearer <key>`",
            slug="unauthenticated",
            headers=challenge,
        )
    row = await auth.find_key(session, credentials.credentials)
    if row is None:
        state.metrics.auth_failures.labels("invalid").inc()
        raise Problem(
            401, "the API key is not valid (unknown or deleted)", slug="unauthenticated", headers=challenge
        )
    return Caller(key_id=row.id, name=row.name, role=Role(row.role))


def require_role(role: Role) -> Callable[..., Awaitable[Caller]]:
    """A dependency accepting keys of ``role`` or a higher one (403 otherwise)."""

    async def check(state: StateDep, caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        if not caller.role.allows(role):
            state.metrics.auth_failures.labels("forbidden").inc()
            raise Problem(
                403,
                f"this needs the {role.value} role; the key {caller.name!r} has {caller.role.value}",
                slug="forbidden",
            )
        return caller

    return check


CurrentViewer = Annotated[Caller, Depends(require_role(Role.viewer))]
CurrentOperator = Annotated[Caller, Depends(require_role(Role.operator))]
CurrentAdmin = Annotated[Caller, Depends(require_role(Role.admin))]
