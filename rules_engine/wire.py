"""Wire formats of commands and of the command/alert events (used by the engine and the registry).

Command (platform → device) on ``devices/{type}/{id}/commands``, QoS 1::

    {"id": "<uuid>", "name": "set_mode", "args": {"mode": "cool"}, "ts": 1764240000123}

with MQTT 5 correlation data = id, response topic = the device's ``acks``
topic and message expiry = the TTL, so the broker drops it for a device that
stays offline past the TTL.

Events for the registry (the system of record), QoS 1:

- ``iotfleet/commands/events``: ``{"event": "created", "id", "device_type", "device_id",
  "name", "args", "ts", "ttl_s", "source", "rule_id"}`` before the command is
  published, then ``{"event": "sent", "id", "at"}`` once the broker accepted it.
- ``iotfleet/alerts/events``: ``{"event": "raised", "id", "rule_id", "rule_name",
  "device_type", "device_id", "severity", "message", "at", "values"}`` and
  ``{"event": "cleared", "rule_id", "device_id", "at", "reason"}``.
- ``iotfleet/state/desired``: ``{"id", "device_type", "device_id", "patch", "source",
  "rule_id", "at"}``: a desired-state merge patch (device shadow) for the registry to apply.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field

from iotfleet import topics
from iotfleet.mqtt_wire import encode_varint, publish_properties
from iotfleet.topics import Channel


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class OutgoingCommand:
    """A command ready to publish to one device."""

    device_type: str
    device_id: str
    name: str
    args: dict[str, Any]
    ttl_s: int
    source: str = "operator"
    rule_id: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    ts: int = field(default_factory=now_ms)

    @property
    def topic(self) -> str:
        return topics.device_topic(self.device_type, self.device_id, Channel.COMMANDS)

    @property
    def ack_topic(self) -> str:
        return topics.device_topic(self.device_type, self.device_id, Channel.ACKS)

    def payload(self) -> bytes:
        return orjson.dumps({"id": self.id, "name": self.name, "args": self.args, "ts": self.ts})

    def property_block(self) -> bytes:
        """Correlation data = id, response topic = the acks topic, expiry = TTL, JSON content type."""
        return publish_properties(
            correlation_data=self.id.encode(),
            response_topic=self.ack_topic,
            message_expiry=self.ttl_s,
            content_type="application/json",
        )

    def properties(self) -> Properties:
        """The same properties for a paho-mqtt publisher (the registry's operator commands)."""
        block = self.property_block()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.unpack(encode_varint(len(block)) + block)  # type: ignore[no-untyped-call]
        return props

    def created_event(self) -> bytes:
        return orjson.dumps(
            {
                "event": "created",
                "id": self.id,
                "device_type": self.device_type,
                "device_id": self.device_id,
                "name": self.name,
                "args": self.args,
                "ts": self.ts,
                "ttl_s": self.ttl_s,
                "source": self.source,
                "rule_id": self.rule_id,
            }
        )


def sent_event(command_id: str, at: int | None = None) -> bytes:
    return orjson.dumps({"event": "sent", "id": command_id, "at": at if at is not None else now_ms()})


def alert_raised_event(
    *,
    rule_id: str,
    rule_name: str,
    device_type: str,
    device_id: str,
    severity: str,
    message: str,
    at: int,
    values: dict[str, Any],
    notify: list[str] | None = None,
    event_id: str | None = None,
) -> bytes:
    return orjson.dumps(
        {
            "event": "raised",
            "notify": notify or [],
            "id": event_id or str(uuid.uuid4()),
            "rule_id": rule_id,
            "rule_name": rule_name,
            "device_type": device_type,
            "device_id": device_id,
            "severity": severity,
            "message": message,
            "at": at,
            "values": values,
        }
    )


def alert_cleared_event(*, rule_id: str, device_id: str, at: int, reason: str = "") -> bytes:
    return orjson.dumps(
        {"event": "cleared", "rule_id": rule_id, "device_id": device_id, "at": at, "reason": reason}
    )


# --- parsing (registry side) --------------------------------------------------------


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CommandCreated(_Event):
    event: Literal["created"]
    id: str = Field(max_length=64)
    device_type: str
    device_id: str
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    ts: int
    ttl_s: int = Field(ge=1)
    source: str = "rule"
    rule_id: str | None = None


class CommandSent(_Event):
    event: Literal["sent"]
    id: str = Field(max_length=64)
    at: int


class AlertRaised(_Event):
    event: Literal["raised"]
    id: str = Field(max_length=64)
    rule_id: str
    rule_name: str
    device_type: str
    device_id: str
    severity: str
    message: str = ""
    at: int
    values: dict[str, Any] = Field(default_factory=dict)
    notify: list[str] = Field(default_factory=list, max_length=16)


class AlertCleared(_Event):
    event: Literal["cleared"]
    rule_id: str
    device_id: str
    at: int
    reason: str = ""


class Ack(_Event):
    """A device's answer to a command on its acks topic."""

    id: str = Field(min_length=1, max_length=64)
    status: Literal["received", "delivered", "succeeded", "failed"]
    detail: str = Field("", max_length=2000)


def failed_event(command_id: str, detail: str, at: int | None = None) -> bytes:
    """The broker refused the command (e.g. ACL): it will never reach the device."""
    return orjson.dumps(
        {"event": "failed", "id": command_id, "detail": detail, "at": at if at is not None else now_ms()}
    )


class CommandFailed(_Event):
    event: Literal["failed"]
    id: str = Field(max_length=64)
    detail: str = ""
    at: int


class DesiredStateRequest(BaseModel):
    """A desired-state merge patch the rules engine asks the registry to apply (QoS 1, at least once:
    the registry skips a request whose id it applied last, and a repeated patch changes nothing)."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    device_type: str = Field(max_length=32)
    device_id: str = Field(pattern=topics.DEVICE_ID_PATTERN)
    patch: dict[str, Any] = Field(max_length=64)
    source: str = Field("rule", max_length=200)
    rule_id: str | None = Field(None, max_length=64)
    at: int | None = None


def desired_state_request(
    *, device_type: str, device_id: str, patch: dict[str, Any], source: str, rule_id: str | None = None
) -> bytes:
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "device_type": device_type,
            "device_id": device_id,
            "patch": patch,
            "source": source,
            "rule_id": rule_id,
            "at": now_ms(),
        }
    )
