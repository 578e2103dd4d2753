"""Broker names the platform keeps for itself: no device may be provisioned under one of them.

A device's id is its broker username and its MQTT client id. A device named
like a service account would replace that account (its credentials, its
roles); a device named like a service's client id would take over that
service's session (the broker closes the older connection with the same
client id). So whole namespaces are reserved, compared case-insensitively
(a case variant is not a collision on the broker, but it is one for the humans
reading logs and ACL files):

- ``iotfleet*``: every platform account (``iotfleet-admin``, ``-registry``,
  ``-ingest``, ``-rules``) and every client id the services use
  (``iotfleet-rules-out``, ``iotfleet-registry-admin-…``, ``iotfleet-sim-…``);
- ``ingest-*``: the ingest services' client ids and shared-subscription groups
  (``ingest-<type>-<replica>``);
- ``svc-*`` and the exact names below: the platform's broker roles and the
  names any broker installation gives its superuser.

This is the one list: provisioning (dynsec today, password/ACL files
tomorrow) and the registry's API validation both import it.
"""

from __future__ import annotations

from collections.abc import Iterable

RESERVED_PREFIXES = ("iotfleet", "ingest-", "svc-")
"""Compared with ``str.casefold()`` of the id."""

RESERVED_EXACT = frozenset({"admin", "administrator", "root", "mosquitto", "superuser", "system"})
"""Role names of the platform (``admin``) and usual superuser names of broker installations."""

PLATFORM_USERS = ("iotfleet-admin", "iotfleet-registry", "iotfleet-ingest", "iotfleet-rules")
"""The platform's own broker accounts (all inside the ``iotfleet`` namespace)."""

PLATFORM_ROLES = ("admin", "svc-registry", "svc-ingest", "svc-rules")
"""The platform's own broker roles (all reserved)."""


def reserved_reason(name: str, *, extra: Iterable[str] = ()) -> str | None:
    """Why ``name`` may not be a device id, or None if it may.

    ``extra``: further prefixes to refuse (case-insensitively), e.g. the client
    ids a deployment configured for its services (which derive ``-out``,
    ``-tracker-…`` ids from them).
    """
    folded = name.casefold()
    for prefix in RESERVED_PREFIXES:
        if folded.startswith(prefix):
            return (
                f"ids starting with {prefix!r} (any case) are reserved for the platform's own broker accounts"
            )
    if folded in RESERVED_EXACT:
        return f"{name!r} is reserved for the platform's broker roles and superusers"
    for prefix in extra:
        if prefix and folded.startswith(prefix.casefold()):
            return f"ids starting with {prefix!r} (any case) are the MQTT client ids of a platform service"
    return None


def is_reserved(name: str, *, extra: Iterable[str] = ()) -> bool:
    return reserved_reason(name, extra=extra) is not None
