"""`ingest-thermostat`: the ingest service of the thermostat device type."""

from telemetry_ingest.runner import main as run_main

DEVICE_TYPE = "thermostat"


def main() -> None:
    run_main(DEVICE_TYPE)
