"""Provision test devices straight through the broker's dynsec admin topic (no registry needed).

``provision(broker, [(type, id), ...]) -> {id: password}`` creates, in ONE
control message, a role per device holding its literal ACLs
(``iotfleet.dynsec.device_acls``) and a client (username = client id = device
id) with that role. Dynsec rewrites its JSON file on every change, so one
batch is much faster than a message per device.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import dynsec
from tests.harness import Broker


def dynsec_commands(devices: Iterable[tuple[str, str]], passwords: dict[str, str]) -> list[dict[str, object]]:
    commands: list[dict[str, object]] = []
    for device_type, device_id in devices:
        role = dynsec.device_role_name(device_id)
        commands.append(
            {"command": "createRole", "rolename": role, "acls": dynsec.device_acls(device_type, device_id)}
        )
        commands.append(
            {
                "command": "createClient",
                "username": device_id,
                "clientid": device_id,
                "password": passwords[device_id],
                "roles": [{"rolename": role}],
            }
        )
    return commands


def admin_call(
    broker: Broker, commands: list[dict[str, object]], timeout: float = 120.0
) -> list[dict[str, object]]:
    """Send dynsec commands as the admin in one message; return the responses (errors raised)."""
    done = threading.Event()
    responses: list[dict[str, object]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER])

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        c.subscribe(dynsec.RESPONSE_TOPIC, qos=1)

    def on_subscribe(c: mqtt.Client, _u: object, _mid: object, _r: object, _p: object) -> None:
        c.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        responses.extend(json.loads(message.payload).get("responses", []))
        done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"no dynsec response after {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    errors = [r for r in responses if r.get("error")]
    if errors:
        raise RuntimeError(f"dynsec refused {len(errors)} command(s), first: {errors[0]}")
    return responses


def provision(broker: Broker, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Create the devices on the broker; return {device_id: password}."""
    devices = list(devices)
    passwords = {device_id: secrets.token_urlsafe(12) for _type, device_id in devices}
    admin_call(broker, dynsec_commands(devices, passwords), timeout=max(60.0, len(devices) * 0.1))
    return passwords


def seed_broker(broker: Broker, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Write the devices into the dynsec file of a broker that has NOT started yet.

    Provisioning N devices over the admin topic costs O(N²) (dynsec rewrites its
    whole file per change: ~7 s for 1,000 devices); a large fleet test writes
    them into the bootstrap file instead, hashed the way dynsec does.
    """
    devices = list(devices)
    passwords = {device_id: secrets.token_urlsafe(12) for _type, device_id in devices}
    config = dynsec.bootstrap_config(broker.passwords)
    # One salt for the whole batch keeps seeding 10,000 devices fast; each password differs.
    salt = secrets.token_bytes(12)
    for device_type, device_id in devices:
        role = dynsec.device_role_name(device_id)
        config["roles"].append({"rolename": role, "acls": dynsec.device_acls(device_type, device_id)})
        config["clients"].append(
            {
                "username": device_id,
                "clientid": device_id,
                **dynsec.hash_password(passwords[device_id], salt=salt),
                "roles": [{"rolename": role}],
            }
        )
    broker.state_dir.mkdir(parents=True, exist_ok=True)
    path = broker.state_dir / "dynamic-security.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return passwords
