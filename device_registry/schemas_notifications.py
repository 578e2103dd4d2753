"""API shapes of notification channels and their deliveries: ``ChannelCreate`` (input),
``ChannelRead`` / ``ChannelCreated`` (output; the webhook secret only in the latter, once),
``DeliveryRead`` with its ``AttemptRead`` log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from device_registry.models_notifications import ChannelKind, DeliveryStatus, Transition
from device_registry.schemas import DeviceTypeName, Tags
from rules_engine.models import ChannelName, Severity

EmailAddress = Annotated[
    str,
    Field(
        min_length=3,
        max_length=254,
        # Deliberately plain: one @, no spaces or header-breaking characters (the SMTP server decides the rest).
        pattern=r"^[^@\s<>,;:\"]+@[^@\s<>,;:\"]+$",
        description="An e-mail address",
    ),
]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChannelRoute(_Input):
    """A default route: the channel hears every alert matching ALL of these (an empty list: any)."""

    severities: list[Severity] = Field(default_factory=list, max_length=5)
    device_types: list[DeviceTypeName] = Field(default_factory=list, max_length=64)
    tags: Tags = Field(default_factory=dict, description="The device carries every one of these tags")


class ChannelCreate(_Input):
    name: ChannelName
    kind: ChannelKind
    url: AnyHttpUrl | None = Field(None, description="webhook: where alerts are POSTed (http or https)")
    recipients: list[EmailAddress] = Field(
        default_factory=list, max_length=50, description="email: who receives the alerts"
    )
    route: ChannelRoute | None = Field(
        None, description="Send it every matching alert; without a route only rules naming it do"
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _fits_kind(self) -> ChannelCreate:
        if self.kind is ChannelKind.webhook:
            if self.url is None:
                raise ValueError("a webhook channel needs a url")
            if self.recipients:
                raise ValueError("a webhook channel has no recipients")
            if len(str(self.url)) > 2000:
                raise ValueError("the url is longer than 2000 characters")
        else:
            if not self.recipients:
                raise ValueError("an email channel needs at least one recipient")
            if self.url is not None:
                raise ValueError("an email channel has no url")
        return self


class ChannelRead(BaseModel):
    id: str
    name: str
    kind: ChannelKind
    url: str | None
    recipients: list[str]
    route: ChannelRoute | None
    enabled: bool
    created_by: str | None
    created_at: datetime
    signature_header: str | None = Field(
        None, description="webhook: the header carrying sha256=<HMAC-SHA256 of the body, hex>"
    )


class ChannelCreated(ChannelRead):
    secret: str | None = Field(
        None, description="webhook: the HMAC-SHA256 key of the signatures, shown this once only"
    )


class ChannelPage(BaseModel):
    items: list[ChannelRead]


class AttemptRead(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status (webhook) or SMTP reply code")
    error: str | None
    duration_ms: int


class DeliveryRead(BaseModel):
    id: str = Field(description="The delivery id the receiver sees (deduplicate on it)")
    channel: str
    alert_id: str
    transition: Transition
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    log: list[AttemptRead] = Field(description="The newest attempts, newest first")


class DeliveryPage(BaseModel):
    items: list[DeliveryRead]
    next_cursor: str | None


class TestNotification(_Input):
    severity: Severity = "info"
    message: str = Field("a test notification from iotfleet", max_length=500)


class TestResult(BaseModel):
    delivery_id: str
    status: Literal["pending"] = "pending"
