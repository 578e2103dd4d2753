"""Operator API keys: generation, hashing and the role check.

A key is ``ifk_`` + 43 random URL-safe characters (256 bits). Only its SHA-256
is stored; the key itself is shown once, when created.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from device_registry.models import ApiKey, Role

KEY_PREFIX = "ifk_"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_prefix(key: str) -> str:
    """What is shown of a key after creation, enough to recognise it."""
    return key[:10]


def make_api_key(name: str, role: Role, key: str | None = None) -> tuple[ApiKey, str]:
    """A new ApiKey row and the secret (generated unless given)."""
    secret = key or new_key()
    row = ApiKey(
        id=str(uuid.uuid4()),
        name=name,
        role=role.value,
        prefix=display_prefix(secret),
        key_hash=hash_key(secret),
    )
    return row, secret


async def find_key(session: AsyncSession, key: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))


async def has_admin_key(session: AsyncSession) -> bool:
    return (
        await session.scalar(select(ApiKey.id).where(ApiKey.role == Role.admin.value).limit(1))
    ) is not None


async def ensure_bootstrap_key(session: AsyncSession, key: str) -> bool:
    """Make sure an admin key with this value exists; True if it was created now."""
    existing = await find_key(session, key)
    if existing is not None:
        if existing.role != Role.admin.value:
            existing.role = Role.admin.value
            await session.commit()
        return False
    row, _ = make_api_key(BOOTSTRAP_KEY_NAME, Role.admin, key)
    session.add(row)
    await session.commit()
    return True
