"""Alert notifications: an outbox written with each alert transition, and one sender that drains it.

Enqueueing (``enqueue``) happens in the transaction that records the transition — the
command tracker's for raise and clear, the API's for acknowledge — so a transition is
never recorded without its deliveries nor the other way round. The channels of a raise
are the ones its rule names (``notify``) plus every channel whose default route matches
the alert; acknowledge and clear go to the channels that were told of the raise. Each
delivery's id is uuid5(alert, transition, channel): recording a transition twice (a
redelivered event, a retried batch) inserts nothing new.

The sender (``NotificationSender``) picks due deliveries, sends them concurrently
(bounded), and records each attempt in one transaction per round. A crash between a
send and that commit sends the delivery again with the same id: delivery is
at-least-once, and receivers deduplicate on the id (``X-Iotfleet-Delivery``, also in
the body) — exactly once as observed by such a receiver. Failed attempts are retried
with exponential backoff (jitter) for ``retry_for_s`` (24 h by default), then the
delivery is ``failed``. One sender per deployment (as the command tracker).

Webhooks: ``POST`` of the JSON body, signed with HMAC-SHA256 of the exact body bytes
under the channel's secret (``X-Iotfleet-Signature-256: sha256=<hex>``); any 2xx is
success, anything else (or no answer within ``timeout_s``) is retried. E-mail: a
plain-text message through the SMTP server of the settings, ``Message-ID`` derived
from the delivery id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import smtplib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from device_registry.models import Device
from device_registry.models_notifications import (
    AttemptRow,
    ChannelKind,
    ChannelRow,
    DeliveryRow,
    DeliveryStatus,
    Transition,
)
from device_registry.models_rules import AlertRow
from iotfleet.settings import NotificationsSettings

log = logging.getLogger("registry.notifications")

SIGNATURE_HEADER = "X-Iotfleet-Signature-256"
DELIVERY_HEADER = "X-Iotfleet-Delivery"
EVENT_HEADER = "X-Iotfleet-Event"
ATTEMPT_HEADER = "X-Iotfleet-Attempt"
USER_AGENT = "iotfleet-notifications/1"
MAX_ERROR = 500

_NAMESPACE = uuid.UUID("0c6f1d8e-2f51-4d0e-9b7e-3a9a1f4c7d21")


def now() -> datetime:
    return datetime.now(UTC)


def delivery_id(alert_id: str, transition: str, channel_id: str) -> str:
    """The same transition to the same channel is always the same delivery (deduplication key)."""
    return str(uuid.uuid5(_NAMESPACE, f"{alert_id}/{transition}/{channel_id}"))


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of the body under the secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def new_secret() -> str:
    return "whsec_" + uuid.uuid4().hex + uuid.uuid4().hex


def alert_document(alert: AlertRow) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "id": alert.id,
        "rule_id": alert.rule_id,
        "rule_name": alert.rule_name,
        "device_id": alert.device_id,
        "device_type": alert.device_type,
        "severity": alert.severity,
        "message": alert.message,
        "status": alert.status,
        "values": alert.values,
        "raised_at": iso(alert.raised_at),
        "acknowledged_at": iso(alert.acknowledged_at),
        "acknowledged_by": alert.acknowledged_by,
        "cleared_at": iso(alert.cleared_at),
        "clear_reason": alert.clear_reason,
    }


def route_matches(route: dict[str, Any] | None, alert: AlertRow, tags: dict[str, str] | None) -> bool:
    if route is None:
        return False  # no default route: only rules naming the channel use it
    if route.get("severities") and alert.severity not in route["severities"]:
        return False
    if route.get("device_types") and alert.device_type not in route["device_types"]:
        return False
    wanted: dict[str, str] = route.get("tags") or {}
    return all((tags or {}).get(key) == value for key, value in wanted.items())


async def enqueue(
    session: AsyncSession,
    alert: AlertRow,
    transition: Transition,
    *,
    named: Sequence[str] = (),
    at: datetime | None = None,
) -> list[str]:
    """Record the deliveries of one alert transition in the caller's transaction; their ids."""
    if transition is Transition.raised:
        channels = await _channels_for_raise(session, alert, named)
    else:
        told = select(DeliveryRow.channel_id).where(
            DeliveryRow.alert_id == alert.id, DeliveryRow.transition == Transition.raised.value
        )
        channels = list(
            (
                await session.scalars(select(ChannelRow).where(ChannelRow.id.in_(told), ChannelRow.enabled))
            ).all()
        )
    if not channels:
        return []
    ids = {delivery_id(alert.id, transition.value, channel.id): channel for channel in channels}
    existing = set((await session.scalars(select(DeliveryRow.id).where(DeliveryRow.id.in_(list(ids))))).all())
    moment = at or now()
    event = {
        "event": f"alert.{transition.value}",
        "at": moment.isoformat(),
        "alert": alert_document(alert),
    }
    for key, channel in ids.items():
        if key in existing:
            continue
        session.add(
            DeliveryRow(
                id=key,
                channel_id=channel.id,
                alert_id=alert.id,
                transition=transition.value,
                event=event,
                status=DeliveryStatus.pending.value,
                attempts=0,
                next_attempt_at=moment,
                created_at=moment,
            )
        )
    return [key for key in ids if key not in existing]


async def _channels_for_raise(
    session: AsyncSession, alert: AlertRow, named: Sequence[str]
) -> list[ChannelRow]:
    # Channels are few (tens): one indexed query for the named ones and the routed ones together.
    candidates = (
        await session.scalars(
            select(ChannelRow).where(
                ChannelRow.enabled, (ChannelRow.name.in_(list(named))) | ChannelRow.route.is_not(None)
            )
        )
    ).all()
    chosen: dict[str, ChannelRow] = {}
    tags: dict[str, str] | None = None
    tags_loaded = False
    for channel in candidates:
        if channel.name in named:
            chosen[channel.id] = channel
            continue
        route = channel.route
        if route and route.get("tags") and not tags_loaded:
            tags = await session.scalar(select(Device.tags).where(Device.id == alert.device_id))
            tags_loaded = True
        if route_matches(route, alert, tags):
            chosen[channel.id] = channel
    missing = set(named) - {c.name for c in chosen.values()}
    if missing:
        log.warning("alert %s names unknown or disabled channels: %s", alert.id, ", ".join(sorted(missing)))
    return list(chosen.values())


# --- sending ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    delivery_id: str
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int


@dataclass(slots=True)
class _Due:
    delivery: DeliveryRow
    channel: ChannelRow


class NotificationSender:
    """Drains the outbox: due deliveries sent concurrently, attempts recorded, retries scheduled."""

    def __init__(
        self,
        settings: NotificationsSettings,
        sessions: async_sessionmaker[AsyncSession],
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self.m_attempts = Counter(
            "registry_notification_attempts",
            "Notification delivery attempts",
            ["kind", "outcome"],
            registry=registry,
        )
        self.m_finished = Counter(
            "registry_notification_deliveries",
            "Notification deliveries finished (delivered, or failed after the retry period)",
            ["status"],
            registry=registry,
        )

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=self.settings.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=self.settings.concurrency),
        )
        self._task = asyncio.create_task(self._run(), name="notification-sender")
        log.info(
            "notification sender started (poll %.1f s, %d at once)",
            self.settings.poll_s,
            self.settings.concurrency,
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        log.info("notification sender stopped")

    def wake(self) -> None:
        """Look for due deliveries now (after a commit that enqueued some)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.send_due()
            except Exception:  # the DB is away: try again later, the outbox keeps everything
                log.exception("sending notifications failed; retrying")
                sent = 0
            if sent:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
            self._wake.clear()

    async def send_due(self) -> int:
        """One round: send what is due (at most a few batches' worth); how many were attempted."""
        at = now()
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(DeliveryRow, ChannelRow)
                    .join(ChannelRow, ChannelRow.id == DeliveryRow.channel_id)
                    .where(
                        DeliveryRow.status == DeliveryStatus.pending.value,
                        DeliveryRow.next_attempt_at <= at,
                    )
                    .order_by(DeliveryRow.next_attempt_at)
                    .limit(self.settings.concurrency * 4)
                )
            ).all()
            due = [_Due(delivery, channel) for delivery, channel in rows]
            session.expunge_all()
        if not due:
            return 0
        limit = asyncio.Semaphore(self.settings.concurrency)

        async def bounded(item: _Due) -> Outcome:
            async with limit:
                return await self._attempt(item)

        outcomes = await asyncio.gather(*(bounded(item) for item in due))
        await self._record(due, outcomes)
        return len(due)

    async def _attempt(self, item: _Due) -> Outcome:
        started = time.perf_counter()
        attempt = item.delivery.attempts + 1
        try:
            if item.channel.kind == ChannelKind.webhook.value:
                code = await self._post(item, attempt)
                ok = 200 <= code < 300
                error = None if ok else f"HTTP {code}"
            else:
                code = await asyncio.wait_for(
                    asyncio.to_thread(self._mail, item), self.settings.timeout_s + 1
                )
                ok, error = True, None
        except smtplib.SMTPResponseException as exc:
            code, ok, error = exc.smtp_code, False, f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"
        except (httpx.HTTPError, OSError, smtplib.SMTPException, TimeoutError) as exc:
            code, ok, error = None, False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration = int((time.perf_counter() - started) * 1000)
        self.m_attempts.labels(item.channel.kind, "ok" if ok else "error").inc()
        return Outcome(item.delivery.id, ok, code, error[:MAX_ERROR] if error else None, duration)

    def body(self, item: _Due) -> bytes:
        return orjson.dumps(
            {"delivery_id": item.delivery.id, "channel": item.channel.name, **item.delivery.event}
        )

    async def _post(self, item: _Due, attempt: int) -> int:
        assert self._http is not None and item.channel.url is not None
        body = self.body(item)
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: item.delivery.id,
            EVENT_HEADER: str(item.delivery.event.get("event", "")),
            ATTEMPT_HEADER: str(attempt),
        }
        if item.channel.secret:
            headers[SIGNATURE_HEADER] = sign(item.channel.secret, body)
        # Streamed and closed unread: only the status matters, and a receiver's body is never buffered.
        async with self._http.stream("POST", item.channel.url, content=body, headers=headers) as response:
            return response.status_code

    def _mail(self, item: _Due) -> int:
        settings = self.settings
        if not settings.smtp_host:
            raise smtplib.SMTPException("no SMTP server configured (IOTFLEET_NOTIFICATIONS__SMTP_HOST)")
        event = item.delivery.event
        alert = event.get("alert", {})
        message = EmailMessage()
        message["Subject"] = (
            f"[iotfleet] {str(alert.get('severity', '')).upper()} {event.get('event', '').removeprefix('alert.')}:"
            f" {alert.get('rule_name', '')} on {alert.get('device_id', '')}"
        )
        message["From"] = settings.mail_from
        message["To"] = ", ".join(item.channel.recipients)
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = f"<{item.delivery.id}@iotfleet>"
        message[DELIVERY_HEADER] = item.delivery.id
        message[EVENT_HEADER] = str(event.get("event", ""))
        lines = [
            f"{event.get('event')} at {event.get('at')}",
            f"rule: {alert.get('rule_name')} ({alert.get('rule_id')})",
            f"device: {alert.get('device_id')} ({alert.get('device_type')})",
            f"severity: {alert.get('severity')}",
            f"message: {alert.get('message')}",
            f"values: {orjson.dumps(alert.get('values', {})).decode()}",
            "",
            f"delivery id: {item.delivery.id}",
        ]
        message.set_content("\n".join(lines))
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_s) as smtp:
            if settings.smtp_starttls:
                smtp.starttls()
            if settings.smtp_username:
                password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                smtp.login(settings.smtp_username, password)
            smtp.send_message(message)
            return 250

    def next_attempt(self, attempts: int, at: datetime) -> datetime:
        """Exponential backoff with jitter: base·2^(n−1), capped, then drawn from [½, 1] of that."""
        ceiling = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** min(attempts - 1, 30))
        return at + timedelta(seconds=ceiling * random.uniform(0.5, 1.0))

    async def _record(self, due: Sequence[_Due], outcomes: Iterable[Outcome]) -> None:
        at = now()
        give_up_before = at - timedelta(seconds=self.settings.retry_for_s)
        by_id = {item.delivery.id: item for item in due}
        pruned: list[str] = []
        async with self.sessions() as session, session.begin():
            rows = {
                row.id: row
                for row in (
                    await session.scalars(select(DeliveryRow).where(DeliveryRow.id.in_(list(by_id))))
                ).all()
            }
            for outcome in outcomes:
                row = rows.get(outcome.delivery_id)
                if row is None or row.status != DeliveryStatus.pending.value:
                    continue  # deleted with its channel meanwhile
                row.attempts += 1
                row.last_status_code = outcome.status_code
                row.last_error = outcome.error
                session.add(
                    AttemptRow(
                        delivery_id=row.id,
                        at=at,
                        status_code=outcome.status_code,
                        error=outcome.error,
                        duration_ms=outcome.duration_ms,
                    )
                )
                if outcome.ok:
                    row.status = DeliveryStatus.delivered.value
                    row.delivered_at = at
                    self.m_finished.labels("delivered").inc()
                elif row.created_at <= give_up_before:
                    row.status = DeliveryStatus.failed.value
                    self.m_finished.labels("failed").inc()
                    log.warning(
                        "notification %s to %s failed for good after %d attempts: %s",
                        row.id,
                        by_id[row.id].channel.name,
                        row.attempts,
                        outcome.error,
                    )
                else:
                    row.next_attempt_at = self.next_attempt(row.attempts, at)
                if row.attempts > self.settings.attempts_kept:
                    pruned.append(row.id)
            await session.flush()
            for key in pruned:
                keep = (
                    select(AttemptRow.id)
                    .where(AttemptRow.delivery_id == key)
                    .order_by(AttemptRow.id.desc())
                    .limit(self.settings.attempts_kept)
                )
                await session.execute(
                    delete(AttemptRow).where(AttemptRow.delivery_id == key, AttemptRow.id.not_in(keep))
                )
