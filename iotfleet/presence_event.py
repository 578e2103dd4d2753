"""The registry's presence of a device, as published on ``iotfleet/presence/{type}/{id}``.

One message per transition, retained, QoS 1: the registry is the one judge of presence
(the broker's connection log, keepalive timeouts, the device's messages; see
device_registry/README.md, *Presence*), and every service that acts on presence (the rules
engine's ``presence`` conditions) reads this instead of the device's own ``status`` topic, which
a device may leave stale ("online" forever after a clean disconnect without a will). Retained,
so a service that (re)subscribes gets every device's current presence at once.

Wire format: ``{"online": true, "cause": "connected", "at_ms": 1764240000123}``; ``cause`` is
one of the registry's transition causes, ``at_ms`` the registry's clock at the transition.
An empty retained payload clears a deleted device's entry.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_BYTES = 512


class PresenceEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    online: bool
    cause: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    at_ms: int = Field(ge=0)

    def payload(self) -> bytes:
        return orjson.dumps(self.model_dump())


def parse(payload: bytes) -> PresenceEvent | None:
    """The event, or None for an empty (cleared) or malformed payload."""
    if not payload or len(payload) > MAX_BYTES:
        return None
    try:
        return PresenceEvent.model_validate_json(payload)
    except ValueError:
        return None
