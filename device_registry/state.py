"""What one running registry holds: DB engine and sessions, broker links, metrics, reconcile."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from device_registry.agent_client import AgentClient
from device_registry.broker_admin import BrokerAdmin
from device_registry.certificates import PendingRevocations
from device_registry.lease import Lease, SingletonWork
from device_registry.metrics import RegistryMetrics
from device_registry.presence import Presence
from device_registry.reconcile import Reconciler
from iotfleet.pki import PlatformPki
from iotfleet.settings import Settings


@dataclass
class RegistryState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    broker: BrokerAdmin
    agent: AgentClient
    presence: Presence
    reconciler: Reconciler
    metrics: RegistryMetrics
    registry: CollectorRegistry
    lease: Lease
    """The registry lease: this replica runs ``work`` while it holds it."""
    work: SingletonWork
    db_ok: bool = field(default=True)
    announce_ready: Callable[[], Awaitable[None]] | None = None
    """Logs "ready" once every lifespan ran (waits up to 2 s for the broker first)."""
    pki: PlatformPki | None = None
    """The platform CA that issues device certificates (None: certificate devices refused)."""
    crl_pending: PendingRevocations = field(default_factory=PendingRevocations)
