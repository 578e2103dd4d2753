"""API schemas: ``XCreate`` (input), ``XUpdate`` (partial input), ``XRead`` (output) per resource.

Inputs are strict about shape (unknown fields are rejected with 422) so typos
in a provisioning script fail loudly instead of being ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from device_registry.models import Role
from iotfleet import topics
from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import TopicError
from iotfleet.json_limits import MAX_METADATA_DEPTH, json_depth
from iotfleet.reserved_names import reserved_reason

MAX_BULK = 10_000
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


def _device_id(value: str) -> str:
    try:
        topics.check_device_id(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from None
    reason = reserved_reason(value)
    if reason is not None:
        # Its own error type, so scripts can tell "pick another id" from a typo.
        raise PydanticCustomError(
            "reserved_name", "reserved device id {id!r}: {reason}", {"id": value, "reason": reason}
        )
    return value


def _device_type(value: str) -> str:
    if value not in DEVICE_TYPES:
        raise ValueError(f"unknown device type {value!r} (known: {', '.join(DEVICE_TYPES)})")
    return value


DeviceId = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra={"pattern": topics.DEVICE_ID_PATTERN},
        examples=["thermostat-0001"],
        description="Letters, digits, '_', '.', '-'. Reserved for the platform (422 reserved_name): ids"
        " starting with 'iotfleet', 'ingest-' or 'svc-' (any case) and admin, root, mosquitto, …",
    ),
    AfterValidator(_device_id),
]
DeviceTypeName = Annotated[
    str,
    Field(max_length=32, examples=["thermostat"], json_schema_extra={"enum": list(DEVICE_TYPES)}),
    AfterValidator(_device_type),
]
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
Tags = Annotated[
    dict[TagKey, TagValue],
    # additionalProperties: false makes the schema say what validation does (keys match the pattern).
    Field(max_length=64, json_schema_extra={"additionalProperties": False}),
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Metadata(_Input):
    @field_validator("metadata", check_fields=False)
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Free-form, but bounded: the registry DB is not a document store.
        if value is not None and len(repr(value)) > 16_384:
            raise ValueError("metadata is limited to 16 KiB")
        if value is not None and json_depth(value) > MAX_METADATA_DEPTH:
            # Deeper documents could not be served back (serializers stop at a depth).
            raise ValueError(f"metadata is limited to {MAX_METADATA_DEPTH} levels of nesting")
        return value


AuthMode = Literal["password", "certificate"]
CsrPem = Annotated[
    str,
    StringConstraints(max_length=16_384, pattern=r"^\s*-----BEGIN CERTIFICATE REQUEST-----"),
    Field(
        description="PEM certificate signing request (auth certificate only): the device keeps its key."
        " Its subject CN, if any, must be the device id. Without a CSR the registry generates an"
        " ECDSA P-256 key and returns it once."
    ),
]


class DeviceCreate(_Metadata):
    id: DeviceId | None = Field(None, description="Generated (type-random) when absent")
    type: DeviceTypeName
    name: Name | None = None
    tags: Tags = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    auth: AuthMode = Field(
        "password",
        description="password: MQTT username/password (plain on loopback, or TLS port); certificate: an"
        " X.509 client certificate issued by the platform CA (CN = device id) on the TLS certificate port",
    )
    csr: CsrPem | None = None

    @field_validator("csr")
    @classmethod
    def _csr_needs_certificate(cls, value: str | None, info: Any) -> str | None:
        if value is not None and info.data.get("auth") != "certificate":
            raise ValueError('a CSR is only accepted with "auth": "certificate"')
        return value


class DeviceUpdate(_Metadata):
    """Fields to change; the type and id are immutable (they are in the device's topics)."""

    name: Name | None = None
    tags: Tags | None = Field(None, description="Replaces all tags")
    metadata: dict[str, Any] | None = Field(None, description="Replaces the metadata")


class DeviceTopics(BaseModel):
    telemetry: str
    status: str
    commands: str
    acks: str
    errors: str = Field(description="Subscribe here to learn why the ingest rejected a reading (optional)")
    state_delta: str | None = Field(
        None, description="Subscribe here: the desired state not reported yet (retained; device shadow)"
    )
    state_reported: str | None = Field(None, description="Publish your state here (device shadow)")


class DeviceCredentials(BaseModel):
    username: str
    client_id: str
    password: str | None = Field(
        None, description="Shown exactly once; the registry does not keep it (password devices)"
    )
    auth: AuthMode = "password"
    certificate: str | None = Field(None, description="PEM client certificate (certificate devices)")
    private_key: str | None = Field(
        None,
        description="PEM private key, shown exactly once, only when the registry generated it (no CSR)",
    )
    certificate_fingerprint: str | None = Field(
        None, description="Hex SHA-256 of the certificate: the broker accepts only this certificate"
    )
    certificate_not_after: datetime | None = None


class DeviceRead(BaseModel):
    id: str
    type: str
    name: str | None
    tags: dict[str, str]
    metadata: dict[str, Any]
    enabled: bool
    online: bool
    last_seen: datetime | None
    connected_since: datetime | None
    credentials_rotated_at: datetime
    created_at: datetime
    updated_at: datetime
    topics: DeviceTopics
    auth: AuthMode = "password"
    certificate_not_after: datetime | None = None


class DeviceProvisioned(DeviceRead):
    credentials: DeviceCredentials


class DeviceBulkCreate(_Input):
    devices: list[DeviceCreate] = Field(min_length=1, max_length=MAX_BULK)


class DeviceBulkProvisioned(BaseModel):
    devices: list[DeviceProvisioned]


class DevicePage(BaseModel):
    items: list[DeviceRead]
    next_cursor: str | None


class CredentialsRotate(_Input):
    """Optional body of rotate-credentials: a new CSR for a certificate device (else a new key is made)."""

    csr: CsrPem | None = None


class CredentialsRotated(BaseModel):
    id: str
    credentials: DeviceCredentials
    credentials_rotated_at: datetime


class ApiKeyCreate(_Input):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    role: Role


class ApiKeyRead(BaseModel):
    id: str
    name: str
    role: Role
    prefix: str = Field(description="The key's first characters, to recognise it")
    created_at: datetime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret: shown exactly once, send it as `Authorization: Bearer <key>`")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyRead]


class DeviceTypeSummary(BaseModel):
    name: str
    description: str
    fields: list[str]
    units: dict[str, str]
    commands: list[str]


class DeviceTypeRead(BaseModel):
    name: str
    description: str
    fields: list[str]
    units: dict[str, str]
    reading_schema: dict[str, Any]
    command_schemas: dict[str, dict[str, Any]]
    state_schema: dict[str, Any] | None = Field(
        None, description="The type's desired/reported state (device shadow); null if it has none"
    )


class DeviceTypeList(BaseModel):
    items: list[DeviceTypeSummary]


class PresenceTransitionRead(BaseModel):
    at: datetime = Field(description="When the registry learnt of the change (UTC)")
    online: bool
    cause: str = Field(
        description="connected, message (spoke while shown offline), disconnected (clean DISCONNECT),"
        " will (connection ended without DISCONNECT: killed, socket error), timeout (keepalive expired:"
        " network cut, frozen device), kicked (disabled, deleted, credentials rotated), broker_restart"
        " (the registry's link to the broker dropped), registry_restart, events_lost (backlog bound hit)",
        examples=["timeout"],
    )


class PresenceHistory(BaseModel):
    device_id: str
    online: bool = Field(description="Now; the same truth as the device's `online` and the fleet summary")
    last_seen: datetime | None
    connected_since: datetime | None
    start: datetime
    end: datetime
    items: list[PresenceTransitionRead] = Field(
        description="Transitions with start ≤ at < end, in the requested order"
    )
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")
