"""`ingest-gps-tracker`: the ingest service of the gps_tracker device type."""

from telemetry_ingest.runner import main as run_main

DEVICE_TYPE = "gps_tracker"


def main() -> None:
    run_main(DEVICE_TYPE)
