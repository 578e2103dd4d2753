"""Telemetry queries of the registry API: a pure InfluxQL builder (``query``) and its runner (``service``)."""
