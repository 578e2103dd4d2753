"""Simulated devices: behaviour models per device type and the fleet runner (CLI, scenarios, faults, report).

Entry points: ``iotfleet simulate`` / ``python -m simulators`` (``simulators.cli``),
the engine ``simulators.fleet.Fleet``, the lean MQTT 5 client ``simulators.mqtt``.
"""
