"""``iotfleet-broker-agent``: runs next to mosquitto and owns its device files (see broker_agent.agent)."""

from __future__ import annotations

import logging

import uvicorn

from broker_agent.api import create_app
from iotfleet.errors import ConfigError
from iotfleet.lifecycle import ServiceLifecycle, configure_logging, fail_fast
from iotfleet.settings import load_settings

SERVICE = "broker-agent"


def main() -> None:
    try:
        settings = load_settings()
        if settings.broker_agent.token is None:
            raise ConfigError("IOTFLEET_BROKER_AGENT__TOKEN: required (the registry presents it)")
        if (settings.broker_agent.tls_certfile is None) != (settings.broker_agent.tls_keyfile is None):
            raise ConfigError(
                "IOTFLEET_BROKER_AGENT__TLS_CERTFILE and IOTFLEET_BROKER_AGENT__TLS_KEYFILE go together"
            )
        app = create_app(settings)
    except ConfigError as error:
        fail_fast(error, SERVICE)
        return
    configure_logging(settings.log_level)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    lifecycle = ServiceLifecycle(SERVICE)
    devices_file, pid_file = settings.agent_files()
    lifecycle.starting(
        url=settings.broker_agent.base_url(),
        port=settings.broker_agent.port,
        devices_file=str(devices_file),
        broker_pid_file=str(pid_file),
    )
    agent = settings.broker_agent
    # HTTPS when the registry is on another host (iotfleet up --roles broker --listen ADDRESS).
    uvicorn.run(
        app,
        host=agent.host,
        port=agent.port,
        log_level="warning",
        ssl_certfile=str(agent.tls_certfile) if agent.tls_certfile else None,
        ssl_keyfile=str(agent.tls_keyfile) if agent.tls_keyfile else None,
    )
    lifecycle.stopped()


if __name__ == "__main__":
    main()
