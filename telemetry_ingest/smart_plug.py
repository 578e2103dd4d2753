"""`ingest-smart-plug`: the ingest service of the smart_plug device type."""

from telemetry_ingest.runner import main as run_main

DEVICE_TYPE = "smart_plug"


def main() -> None:
    run_main(DEVICE_TYPE)
