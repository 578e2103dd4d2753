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
        app = create_app(settings)
    except ConfigError as error:
        fail_fast(error, SERVICE)
        return
    configure_logging(settings.log_level)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    lifecycle = ServiceLifecycle(SERVICE)
    devices_file, pid_file = settings.agent_files()
    lifecycle.starting(
        port=settings.broker_agent.port, devices_file=str(devices_file), broker_pid_file=str(pid_file)
    )
    uvicorn.run(app, host=settings.broker_agent.host, port=settings.broker_agent.port, log_level="warning")
    lifecycle.stopped()


if __name__ == "__main__":
    main()
