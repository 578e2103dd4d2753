"""The registry service: ``create_app(settings)`` (FastAPI factory) and ``main()`` (console script).

Start-up (the ``lifespan``): check the DB URL, apply Alembic migrations, ensure
the bootstrap admin key, then connect the broker links in the background (the
registry serves — degraded — while the broker is not up yet) and reconcile the
broker with the DB each time the admin link connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import pkgutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry

from device_registry import auth, certificates, db, routers
from device_registry.agent_client import AgentClient
from device_registry.api_docs import mount_api_docs
from device_registry.body_limits import BodyLimits
from device_registry.broker_admin import BrokerAdmin, BrokerError
from device_registry.dashboard import mount_dashboard
from device_registry.lease import REGISTRY_LEASE, Lease, LeaseStore, SingletonWork
from device_registry.listeners import https_listener, serve
from device_registry.metrics import RegistryMetrics
from device_registry.openapi import install_openapi
from device_registry.presence import Presence
from device_registry.problems import install_problem_handlers
from device_registry.reconcile import Reconciler, ReconcileReport
from device_registry.state import RegistryState
from iotfleet import pki
from iotfleet.errors import ConfigError
from iotfleet.lifecycle import ServiceLifecycle, configure_logging, fail_fast
from iotfleet.settings import Settings, load_settings

SERVICE = "registry"
API_DESCRIPTION = """
The iotfleet device registry: devices, their broker credentials and presence,
device types, operator API keys.

Authenticate with `Authorization: Bearer <API key>`. Roles: **viewer** (read),
**operator** (read + commands + alerts), **admin** (everything, incl. devices and keys).
Errors are RFC 9457 `application/problem+json`. Request bodies are bounded:
at most `IOTFLEET_REGISTRY__MAX_BODY_BYTES` (8 MiB, else 413) and 32 levels of
JSON nesting (else 422).
"""


def discover_routers() -> list[APIRouter]:
    """Every ``router`` defined by a module of ``device_registry.routers`` (sorted by module name)."""
    found = []
    for info in sorted(pkgutil.iter_modules(routers.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{routers.__name__}.{info.name}")
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            found.append(router)
    return found


def create_app(settings: Settings) -> FastAPI:
    """The registry app; raises ConfigError (naming the setting) for a bad database URL."""
    database_url = db.check_database_url(settings.registry_database_url())
    lifecycle = ServiceLifecycle(SERVICE)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.monotonic()
        lifecycle.starting(
            database=_redact(database_url),
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            replica=settings.registry.replica,
        )
        engine = db.create_engine(database_url, sqlite_synchronous=settings.registry.sqlite_synchronous)
        try:
            before, after = await db.run_migrations(engine)
        except Exception as exc:
            await engine.dispose()
            raise ConfigError(
                f"IOTFLEET_REGISTRY__DATABASE_URL: cannot open or migrate the registry database: {exc}"
            ) from exc
        if before != after:
            lifecycle.log.info("database schema migrated from %s to %s", before or "empty", after)
        sessions = db.session_factory(engine)
        if settings.registry.bootstrap_admin_key is not None:
            async with sessions() as session:
                if await auth.ensure_bootstrap_key(
                    session, settings.registry.bootstrap_admin_key.get_secret_value()
                ):
                    lifecycle.log.info("bootstrap admin key stored (hashed)")
        async with sessions() as session:
            if not await auth.has_admin_key(session):
                lifecycle.log.warning(
                    "no admin API key exists: nobody can use the API; set IOTFLEET_REGISTRY__BOOTSTRAP_ADMIN_KEY"
                )
        registry = CollectorRegistry()
        metrics = RegistryMetrics(registry)
        broker = BrokerAdmin(settings.mqtt)
        agent = AgentClient(settings.broker_agent)
        presence = Presence(
            settings.mqtt,
            sessions,
            registry,
            history_days=settings.registry.presence_history_days,
            max_payload_bytes=settings.ingest.max_payload_bytes,
        )

        def reported(report: ReconcileReport) -> None:
            metrics.reconcile_runs.labels("ok" if report.ok else "failed").inc()
            if report.ok:
                metrics.reconcile_drift.set(report.drift_count)

        reconciler = Reconciler(agent, sessions, broker=broker, on_report=reported)
        work = SingletonWork()
        lease = Lease(
            LeaseStore(
                sessions,
                name=REGISTRY_LEASE,
                replica=settings.registry.replica,
                ttl_s=settings.registry.lease_ttl(database_url),
            ),
            work,
            registry,
        )
        state = RegistryState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            broker=broker,
            agent=agent,
            presence=presence,
            reconciler=reconciler,
            metrics=metrics,
            registry=registry,
            lease=lease,
            work=work,
            pki=pki.platform_pki_paths(settings.tls, settings.state_dir),
        )
        app.state.registry = state
        async with sessions() as session:
            await certificates.rebuild_crl(state.pki, session, state.crl_pending)
        metrics.broker_connected.labels("admin").set_function(lambda: float(broker.connected))
        metrics.broker_connected.labels("presence").set_function(lambda: float(presence.connected))
        metrics.agent_reachable.set_function(lambda: float(agent.reachable))
        # Every replica polls the agent (its health says whether the agent answers); only the
        # lease holder reconciles.
        took_lease = asyncio.Event()
        watcher = asyncio.create_task(
            _watch_agent(
                agent, reconciler, lease, took_lease, poll_s=settings.broker_agent.poll_s, lifecycle=lifecycle
            ),
            name="agent-watch",
        )

        async def reconcile_now() -> None:
            took_lease.set()

        async def nothing_to_stop(_lost: bool) -> None:
            return None

        async def start_presence() -> None:
            presence.start()

        async def stop_presence(lost: bool) -> None:
            await presence.stop(final_flush=not lost)

        # Once-only work, run by the lease holder (lease_lifespan, entered after every router's
        # lifespan registered its own part): presence, then the routers' parts.
        work.register("presence", start_presence, stop_presence)
        work.register("reconcile on taking the lease", reconcile_now, nothing_to_stop)
        broker.start()

        async def announce_ready() -> None:
            # After the routers' start-up and the lease (lease_lifespan): the holder's links
            # (presence, tracker, …) connect alongside the admin link, as before replicas.
            if await broker.wait_connected(within_s=2.0):
                lifecycle.ready(
                    port=settings.registry.port,
                    startup_s=round(time.monotonic() - started, 2),
                    broker="connected",
                    lease="held" if lease.holding else "standby",
                )
            else:
                lifecycle.degraded(
                    f"broker not reachable yet ({broker.link.last_error}); retrying in the background"
                )
                lifecycle.ready(port=settings.registry.port, broker="connecting")

        state.announce_ready = announce_ready
        try:
            yield
        finally:
            lifecycle.log.info("stopping")
            broker.stop()
            if presence.running:
                await presence.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await agent.close()
            await engine.dispose()
            lifecycle.stopped()

    app = FastAPI(
        title="iotfleet registry",
        version="1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by mount_api_docs, from local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings  # for routers needing settings outside a request
    install_problem_handlers(app)
    for router in discover_routers():
        app.include_router(router)
    # Last: its lifespan is entered after every router's (they registered their singleton work).
    app.include_router(APIRouter(lifespan=lease_lifespan))
    mount_api_docs(app)  # /docs and /redoc with their assets served here, offline
    mount_dashboard(app)  # the operator web dashboard at / (pages) and /static
    _install_request_metrics(app)
    # Outermost (added last): bodies are bounded before anything else reads them.
    app.add_middleware(BodyLimits, max_bytes=settings.registry.max_body_bytes)
    install_openapi(app)
    return app


@asynccontextmanager
async def lease_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Take the registry lease (at once when free: a lone replica starts its work before it serves,
    as it always did) or wait for it as a standby; the work stops first on the way out."""
    state: RegistryState = app.state.registry
    await state.lease.start()
    if state.announce_ready is not None:
        await state.announce_ready()
    try:
        yield
    finally:
        await state.lease.stop()


async def _watch_agent(
    agent: AgentClient,
    reconciler: Reconciler,
    lease: Lease,
    took_lease: asyncio.Event,
    *,
    poll_s: float,
    lifecycle: ServiceLifecycle,
) -> None:
    """Poll the agent's health; the lease holder reconciles when it is first reached, after it
    restarted, and when this replica took the lease (a new epoch: what the former holder did last
    is unknown)."""
    reconciled_boot: str | None = None
    reconciled_epoch = 0
    warned = False
    while True:
        try:
            boot_id = str((await agent.health()).get("boot_id"))
            if lease.holding and (boot_id != reconciled_boot or lease.epoch != reconciled_epoch):
                if reconciled_boot is not None and boot_id != reconciled_boot:
                    lifecycle.log.info("broker agent restarted: reconciling its device file")
                report = await reconciler.run()
                if report.ok:
                    reconciled_boot, reconciled_epoch = boot_id, lease.epoch
            warned = False
        except BrokerError as exc:
            if not warned:  # once per outage, not once per poll
                lifecycle.degraded(str(exc))
                warned = True
        except Exception:  # the watcher must outlive any surprise
            lifecycle.log.exception("broker agent watch failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(took_lease.wait(), poll_s if reconciled_boot else min(poll_s, 1.0))
        took_lease.clear()


def _install_request_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        state: RegistryState | None = getattr(request.app.state, "registry", None)
        if state is not None:
            route = _route_template(request)
            state.metrics.http_requests.labels(request.method, route, str(response.status_code)).inc()
            state.metrics.http_latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response


def _route_template(request: Request) -> str:
    # Label by template (/api/v1/devices/{device_id}), not by path: bounded label cardinality.
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    try:
        settings = load_settings()
        https = https_listener(settings.registry)
        app = create_app(settings)
    except ConfigError as error:
        fail_fast(error, SERVICE)
        return
    configure_logging(settings.log_level)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        serve(app, settings.registry, https)
    except ConfigError as error:
        fail_fast(error, SERVICE)


if __name__ == "__main__":
    main()
