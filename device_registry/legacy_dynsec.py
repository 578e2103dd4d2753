"""Devices provisioned before issue #15 live as dynsec clients + roles: keep them safe until rotated.

Dynamic security answers first for every username it knows, so a device that
still has a dynsec client (marked with the textname below by older registries)
is authenticated by dynsec, not by the device file. Its password was never
stored, so it cannot move to the file by itself: it keeps working through dynsec
until its credentials are rotated. Every change that must lock it out (disable,
delete, rotate) also deletes its dynsec client and role (which kicks the live
session), and the reconcile deletes the legacy entries of devices that are gone,
disabled or already moved to the file.
"""

from __future__ import annotations

from typing import Any

from device_registry.broker_admin import BrokerAdmin

TEXTNAME = "iotfleet device"
"""textname the registry gave the dynsec clients and roles of devices before issue #15."""
NOT_FOUND = ("Client not found", "Role not found")


def role_name(device_id: str) -> str:
    return f"device-{device_id}"


def delete_commands(device_id: str) -> list[dict[str, Any]]:
    """Deleting the client kicks its live connection; the role goes with it."""
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": role_name(device_id)},
    ]


async def remove(broker: BrokerAdmin, device_ids: list[str]) -> None:
    """Delete the legacy dynsec entries of these devices, if any (raises BrokerError if the link is down)."""
    await broker.run(
        [cmd for device_id in device_ids for cmd in delete_commands(device_id)], tolerate=NOT_FOUND
    )


async def legacy_clients(broker: BrokerAdmin) -> set[str]:
    """Usernames of the dynsec clients an older registry made for devices."""
    return {c["username"] for c in await broker.list_clients() if c.get("textname") == TEXTNAME}


async def classify_clients(broker: BrokerAdmin) -> tuple[set[str], set[str]]:
    """(legacy device clients an older registry made, every other client: not the registry's)."""
    legacy: set[str] = set()
    other: set[str] = set()
    for client in await broker.list_clients():
        (legacy if client.get("textname") == TEXTNAME else other).add(client["username"])
    return legacy, other
