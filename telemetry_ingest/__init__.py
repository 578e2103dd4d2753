"""Telemetry ingest: one runner, one tiny entry module per device type."""
