"""The MQTT topic scheme: every topic is built and parsed here, nowhere else.

Device topics: ``devices/{type}/{id}/{channel}`` with channel one of
``telemetry`` (device → platform readings), ``status`` (retained online/offline,
the LWT), ``commands`` (platform → device) and ``acks`` (device → platform
command results), ``errors`` (platform → device: why a message was refused),
``state/delta`` (platform → device, retained: the desired state it has not
reported yet) and ``state/reported`` (device → platform: its state). Invalid
readings go to ``deadletter/{type}/{id}``. Platform services talk among
themselves under ``iotfleet/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from iotfleet.errors import TopicError

DEVICES_ROOT = "devices"
DEADLETTER_ROOT = "deadletter"
PLATFORM_ROOT = "iotfleet"

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEVICE_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_DEVICE_TYPE_RE = re.compile(DEVICE_TYPE_PATTERN)

RULES_CHANGED = f"{PLATFORM_ROOT}/rules/changed"
"""Published by the registry when a rule is created, changed or deleted; the rules engine reloads."""
COMMAND_EVENTS = f"{PLATFORM_ROOT}/commands/events"
"""Command lifecycle events (sent by the rules engine) for the registry to record."""
ALERT_EVENTS = f"{PLATFORM_ROOT}/alerts/events"
"""Alert raise/clear events from the rules engine for the registry to record."""
PRESENCE_ROOT = f"{PLATFORM_ROOT}/presence"
"""``iotfleet/presence/{type}/{id}``: the registry's presence of each device, retained, one message
per transition (see ``iotfleet/presence_event.py``). The rules engine's presence conditions read it."""
DESIRED_STATE_REQUESTS = f"{PLATFORM_ROOT}/state/desired"
"""Desired-state patches from the rules engine for the registry to apply (QoS 1, at least once)."""

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"


class Channel(StrEnum):
    TELEMETRY = "telemetry"
    STATUS = "status"
    COMMANDS = "commands"
    ACKS = "acks"
    ERRORS = "errors"
    STATE_DELTA = "state/delta"
    STATE_REPORTED = "state/reported"


Access = Literal["read", "write"]

DEVICE_ACL: tuple[tuple[Access, Channel], ...] = (
    ("write", Channel.TELEMETRY),
    ("write", Channel.STATUS),
    ("write", Channel.ACKS),
    ("read", Channel.COMMANDS),
    ("read", Channel.ERRORS),
    ("write", Channel.STATE_REPORTED),
    ("read", Channel.STATE_DELTA),
)
"""What a device may do on its own topics, and nothing else: publish (write) its telemetry,
status and acks; subscribe to and receive (read) its commands and the ingest's reports of
its rejected readings (``errors``); report its state (``state/reported``) and receive the desired
state it has not reached (``state/delta``). Every broker ACL of a
device (the device plugin's options, legacy dynsec roles) is generated from this table: a new
device channel is one line here."""


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic."""

    device_type: str
    device_id: str
    channel: Channel

    def __str__(self) -> str:
        return device_topic(self.device_type, self.device_id, self.channel)


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is usable as topic segment, MQTT client id and username."""
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: 1-64 characters of letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return device_id


def check_device_type(device_type: str) -> str:
    """Return ``device_type`` if it is a well-formed type name (lowercase, digits, '_')."""
    if not _DEVICE_TYPE_RE.fullmatch(device_type):
        raise TopicError(f"invalid device type {device_type!r}: lowercase letters, digits and '_'")
    return device_type


def device_topic(device_type: str, device_id: str, channel: Channel | str) -> str:
    """``devices/{type}/{id}/{channel}``, with both segments checked."""
    check_device_type(device_type)
    check_device_id(device_id)
    return f"{DEVICES_ROOT}/{device_type}/{device_id}/{Channel(channel).value}"


def device_topics(device_type: str, device_id: str) -> dict[Channel, str]:
    """Every topic of one device (both segments checked once): what the API shows for a device."""
    check_device_type(device_type)
    check_device_id(device_id)
    base = f"{DEVICES_ROOT}/{device_type}/{device_id}/"
    return {channel: base + channel.value for channel in Channel}


def parse_device_topic(topic: str) -> DeviceTopic:
    """Split a device topic; raise TopicError if it is not one."""
    # maxsplit 3: a channel may hold a '/' (state/delta); Channel() then accepts only known ones.
    parts = topic.split("/", 3)
    if len(parts) != 4 or parts[0] != DEVICES_ROOT:
        raise TopicError(f"not a device topic: {topic!r}")
    _, device_type, device_id, channel = parts
    try:
        parsed_channel = Channel(channel)
    except ValueError:
        raise TopicError(f"unknown channel {channel!r} in {topic!r}") from None
    return DeviceTopic(check_device_type(device_type), check_device_id(device_id), parsed_channel)


def device_filter(channel: Channel | str, device_type: str = "+", device_id: str = "+") -> str:
    """A subscription filter on device topics; ``+`` matches any type or id."""
    return f"{DEVICES_ROOT}/{device_type}/{device_id}/{Channel(channel).value}"


def device_channels(access: Access) -> list[str]:
    """The channels of ``DEVICE_ACL`` with this access: the broker's device plugin options
    (``plugin_opt_publish`` = write, ``plugin_opt_subscribe`` = read), rendered into mosquitto.conf."""
    return [channel.value for a, channel in DEVICE_ACL if a == access]


def shared_filter(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker splits messages among the group's members."""
    if not group or any(c in group for c in "/+#"):
        raise TopicError(f"invalid shared subscription group {group!r}")
    return f"$share/{group}/{topic_filter}"


def ingest_group(device_type: str) -> str:
    """The shared-subscription group of a device type's ingest replicas."""
    return f"ingest-{check_device_type(device_type)}"


def deadletter_topic(device_type: str, device_id: str) -> str:
    """Where an invalid reading of that device is republished with the reason."""
    return f"{DEADLETTER_ROOT}/{device_type}/{device_id}"


def deadletter_filter(device_type: str = "+", device_id: str = "+") -> str:
    return f"{DEADLETTER_ROOT}/{device_type}/{device_id}"


def presence_topic(device_type: str, device_id: str) -> str:
    """Where the registry publishes (retained) a device's presence transitions."""
    check_device_type(device_type)
    check_device_id(device_id)
    return f"{PRESENCE_ROOT}/{device_type}/{device_id}"


def presence_filter(device_type: str = "+", device_id: str = "+") -> str:
    return f"{PRESENCE_ROOT}/{device_type}/{device_id}"


def parse_presence_topic(topic: str) -> tuple[str, str]:
    """``(type, id)`` of a presence topic; raise TopicError if it is not one."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PRESENCE_ROOT:
        raise TopicError(f"not a presence topic: {topic!r}")
    return check_device_type(parts[2]), check_device_id(parts[3])
