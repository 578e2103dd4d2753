"""API shapes of the device shadow (desired / reported state)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, RootModel

from device_registry.device_state import Shadow
from iotfleet import topics
from iotfleet.topics import Channel


class DesiredStateUpdate(RootModel[dict[str, Any]]):
    """A JSON merge patch (RFC 7396) of the desired state: fields to set; ``null`` removes a field.

    Validated against the device type's state model (``state_schema`` of
    ``GET /api/v1/device-types/{type}``); unknown fields, wrong types and values
    out of range are refused (422).
    """

    root: dict[str, Any] = Field(max_length=64, examples=[{"mode": "eco", "setpoint_c": 19.5}])


class StateVersions(BaseModel):
    desired: int = Field(description="Bumped on every change of the desired state (If-Match/ETag)")
    reported: int = Field(description="Bumped on every change of the reported state")


class StateTimestamps(BaseModel):
    desired: datetime | None = Field(description="Last change of the desired state")
    reported: datetime | None = Field(description="Last report from the device (even an unchanged one)")


class StateTopics(BaseModel):
    delta: str = Field(description="Subscribe: the retained delta (platform → device)")
    reported: str = Field(description="Publish: the device's state, a partial document (QoS 1)")


class DeviceStateRead(BaseModel):
    device_id: str
    device_type: str
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any] = Field(
        description="Desired fields the device has not reported (missing or different)"
    )
    versions: StateVersions
    timestamps: StateTimestamps
    desired_source: str | None = Field(description="operator:<key name>, rule:<rule name>, job:<id> …")
    delivered: bool = Field(description="The broker holds the current delta (retained) for the device")
    state_schema: dict[str, Any] = Field(description="JSON schema of the type's state model")
    topics: StateTopics


def device_state_read(shadow: Shadow, schema: dict[str, Any]) -> DeviceStateRead:
    own = topics.device_topics(shadow.device_type, shadow.device_id)
    return DeviceStateRead(
        device_id=shadow.device_id,
        device_type=shadow.device_type,
        desired=shadow.desired,
        reported=shadow.reported,
        delta=shadow.delta,
        versions=StateVersions(desired=shadow.desired_version, reported=shadow.reported_version),
        timestamps=StateTimestamps(desired=shadow.desired_updated_at, reported=shadow.reported_updated_at),
        desired_source=shadow.desired_source,
        delivered=not shadow.delta_pending,
        state_schema=schema,
        topics=StateTopics(delta=own[Channel.STATE_DELTA], reported=own[Channel.STATE_REPORTED]),
    )
