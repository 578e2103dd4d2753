"""The device registry: system of record and the operators' REST API."""
