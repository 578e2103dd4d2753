"""Mosquitto dynamic-security: the bootstrap file and the ACLs of devices and services.

Mosquitto 2.0.11's dynsec does not substitute ``%c``/``%u`` in ACL topics, so
each device gets one role holding its literal topics. Passwords are hashed the
way dynsec does (PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations), so the
bootstrap file can be written before the broker first starts.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from iotfleet import topics
from iotfleet.topics import Channel

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
ITERATIONS = 101

ADMIN_USER = "iotfleet-admin"
SERVICE_USERS = ("iotfleet-registry", "iotfleet-ingest", "iotfleet-rules")


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` triple of a dynsec client entry."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def acl(acltype: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def device_role_name(device_id: str) -> str:
    return f"device-{device_id}"


def device_acls(device_type: str, device_id: str) -> list[dict[str, Any]]:
    """A device's literal topics as dynsec ACLs, from ``topics.DEVICE_ACL`` (the one table)."""
    out: list[dict[str, Any]] = []
    for access, channel in topics.DEVICE_ACL:
        topic = topics.device_topic(device_type, device_id, channel)
        if access == "write":
            out.append(acl("publishClientSend", topic))
        else:
            out += [acl("subscribePattern", topic), acl("publishClientReceive", topic)]
    return out


def _service_role(name: str, publish: list[str], subscribe: list[str]) -> dict[str, Any]:
    acls = [acl("publishClientSend", t) for t in publish]
    for t in subscribe:
        acls.append(acl("subscribePattern", t))
        acls.append(acl("publishClientReceive", t))
    return {"rolename": name, "acls": acls}


def service_roles() -> list[dict[str, Any]]:
    """Least-privilege roles of the platform's own services (wildcards are fine here: no %c needed)."""
    platform = f"{topics.PLATFORM_ROOT}/#"
    all_devices = f"{topics.DEVICES_ROOT}/#"
    commands = topics.device_filter(Channel.COMMANDS)
    return [
        {
            "rolename": "admin",
            "acls": [
                acl("publishClientSend", "$CONTROL/dynamic-security/#"),
                acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
                acl("subscribePattern", "$CONTROL/dynamic-security/#"),
                acl("publishClientReceive", "$SYS/#"),
                acl("subscribePattern", "$SYS/#"),
                acl("publishClientReceive", "#"),
                acl("subscribePattern", "#"),
                acl("unsubscribePattern", "#"),
            ],
        },
        _service_role(
            "svc-registry",
            # state/delta: the desired state a device has not reported; errors: why its report was refused.
            publish=[
                commands,
                platform,
                topics.device_filter(Channel.STATE_DELTA),
                topics.device_filter(Channel.ERRORS),
            ],
            subscribe=[
                all_devices,
                platform,
                f"{topics.DEADLETTER_ROOT}/#",
                "$share/+/#",
                "$SYS/broker/log/N",
            ],
        ),
        _service_role(
            "svc-ingest",
            publish=[f"{topics.DEADLETTER_ROOT}/#", topics.device_filter(Channel.ERRORS), platform],
            subscribe=[topics.device_filter(Channel.TELEMETRY), "$share/+/#", platform],
        ),
        _service_role(
            "svc-rules",
            publish=[commands, platform],
            subscribe=[all_devices, platform, "$share/+/#"],
        ),
    ]


_ROLES_OF = {
    ADMIN_USER: ["admin"],
    "iotfleet-registry": ["admin", "svc-registry"],
    "iotfleet-ingest": ["svc-ingest"],
    "iotfleet-rules": ["svc-rules"],
}


def bootstrap_config(passwords: dict[str, str]) -> dict[str, Any]:
    """The initial dynsec JSON file: the admin and service accounts, no devices, deny by default."""
    clients = []
    for username, roles in _ROLES_OF.items():
        clients.append(
            {
                "username": username,
                "textName": f"iotfleet {username}",
                **hash_password(passwords[username]),
                "roles": [{"rolename": r} for r in roles],
            }
        )
    return {
        "clients": clients,
        "groups": [],
        "roles": service_roles(),
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def new_passwords() -> dict[str, str]:
    return {user: secrets.token_urlsafe(24) for user in _ROLES_OF}
