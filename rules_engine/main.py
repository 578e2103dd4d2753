"""Entry point of the rules engine (``iotfleet-rules``).

Starts even when the broker or the registry is not up yet: the MQTT client
reconnects and the rules are re-fetched every 2 s until they load; /healthz
says ``degraded`` meanwhile.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from iotfleet.errors import ConfigError
from iotfleet.lifecycle import HealthServer, ServiceLifecycle, configure_logging, fail_fast
from iotfleet.settings import Settings, load_settings
from rules_engine.engine import RulesEngine
from rules_engine.sources import FileSource, RegistrySource, RuleSource
from rules_engine.store import StateStore

SERVICE = "rules-engine"


def make_source(settings: Settings) -> RuleSource:
    if settings.rules.rules_file is not None:
        return FileSource(settings.rules.rules_file)
    return RegistrySource.from_settings(settings)


def state_path(settings: Settings) -> StateStore:
    path = settings.rules.state_file or settings.state_dir / "rules-engine.sqlite"
    try:
        return StateStore(path)
    except OSError as exc:
        raise ConfigError(f"IOTFLEET_RULES__STATE_FILE: cannot open {path}: {exc}") from None


def run(settings: Settings) -> None:
    # APScheduler logs every run of every job at INFO (the 1 s tick: two lines a second); its
    # warnings (missed runs) still show. The engine logs what a schedule did itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    lifecycle = ServiceLifecycle(SERVICE)
    lifecycle.install_signal_handlers()
    source = make_source(settings)
    store = state_path(settings)
    registry = CollectorRegistry()
    engine = RulesEngine(settings, source, store, lifecycle=lifecycle, registry=registry)
    lifecycle.starting(
        broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
        rules=str(settings.rules.rules_file or f"registry {settings.registry.host}:{settings.registry.port}"),
    )
    health = HealthServer(settings.health, engine.health, registry=registry)
    health.start()
    engine.start()
    lifecycle.ready(health_port=health.port, client_id=settings.rules.client_id)
    lifecycle.stop_requested.wait()
    engine.stop()
    health.stop()
    lifecycle.stopped()


def main() -> None:
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        run(settings)
    except ConfigError as error:
        fail_fast(error, SERVICE)


if __name__ == "__main__":
    main()
