"""Operator API keys (admin only, but ``/me``). The secret is returned once, at creation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlalchemy import func, select

from device_registry import auth
from device_registry.deps import CurrentAdmin, CurrentViewer, SessionDep
from device_registry.models import ApiKey, Role
from device_registry.problems import PROBLEM_RESPONSES, Conflict, NotFound
from device_registry.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPage, ApiKeyRead

router = APIRouter(prefix="/api/v1/api-keys", tags=["api keys"], responses=PROBLEM_RESPONSES)


def _read(row: ApiKey) -> ApiKeyRead:
    return ApiKeyRead(
        id=row.id, name=row.name, role=Role(row.role), prefix=row.prefix, created_at=row.created_at
    )


@router.get(
    "/me",
    summary="The key this request is made with: its name and role (what the caller may do)",
    responses={404: {"description": "The key was deleted meanwhile"}},
)
async def my_key(session: SessionDep, caller: CurrentViewer) -> ApiKeyRead:
    row = await session.get(ApiKey, caller.key_id)
    if row is None:
        raise NotFound("API key", caller.key_id)
    return _read(row)


@router.get("", summary="List API keys (without their secrets)")
async def list_keys(session: SessionDep, _caller: CurrentAdmin) -> ApiKeyPage:
    rows = (await session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))).all()
    return ApiKeyPage(items=[_read(r) for r in rows])


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a key; its secret is shown once")
async def create_key(body: ApiKeyCreate, session: SessionDep, _caller: CurrentAdmin) -> ApiKeyCreated:
    row, secret = auth.make_api_key(body.name, body.role)
    session.add(row)
    await session.commit()
    return ApiKeyCreated(**_read(row).model_dump(), key=secret)


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a key (it stops working at once)",
    responses={404: {}, 409: {"description": "It is the last admin key"}},
)
async def delete_key(
    key_id: Annotated[str, Path(max_length=64)], session: SessionDep, _caller: CurrentAdmin
) -> None:
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise NotFound("API key", key_id)
    if row.role == Role.admin.value:
        admins = await session.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.role == Role.admin.value)
        )
        if (admins or 0) <= 1:
            raise Conflict("this is the last admin key: create another admin key first")
    await session.delete(row)
    await session.commit()
