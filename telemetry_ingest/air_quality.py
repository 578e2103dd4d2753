"""`ingest-air-quality`: the ingest service of the air_quality device type."""

from telemetry_ingest.runner import main as run_main

DEVICE_TYPE = "air_quality"


def main() -> None:
    run_main(DEVICE_TYPE)
