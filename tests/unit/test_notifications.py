"""Notification pieces without servers: signature, delivery ids, backoff bounds, route matching."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from device_registry.models_rules import AlertRow
from device_registry.notifications import NotificationSender, delivery_id, route_matches, sign
from iotfleet.settings import NotificationsSettings


def _alert(severity: str = "major", device_type: str = "thermostat") -> AlertRow:
    return AlertRow(id="a1", severity=severity, device_type=device_type, device_id="th-1")


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"delivery_id":"x","event":"alert.raised"}'
    expected = hmac.new(b"whsec_k", body, hashlib.sha256).hexdigest()
    assert sign("whsec_k", body) == f"sha256={expected}"
    assert sign("whsec_k", body + b" ") != sign("whsec_k", body)


def test_a_transition_to_a_channel_is_always_the_same_delivery() -> None:
    assert delivery_id("a1", "raised", "c1") == delivery_id("a1", "raised", "c1")
    assert len({delivery_id("a1", t, "c1") for t in ("raised", "acknowledged", "cleared")}) == 3
    assert delivery_id("a1", "raised", "c1") != delivery_id("a1", "raised", "c2")


@pytest.mark.parametrize(
    ("route", "tags", "matches"),
    [
        (None, {}, False),
        ({}, {}, True),
        ({"severities": ["major"]}, {}, True),
        ({"severities": ["critical"]}, {}, False),
        ({"device_types": ["smart_plug"]}, {}, False),
        ({"tags": {"site": "paris"}}, {"site": "paris", "floor": "2"}, True),
        ({"tags": {"site": "paris"}}, {"site": "lyon"}, False),
        ({"tags": {"site": "paris"}}, None, False),
    ],
)
def test_default_routes(route: dict[str, object] | None, tags: dict[str, str] | None, matches: bool) -> None:
    assert route_matches(route, _alert(), tags) is matches


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    settings = NotificationsSettings(retry_base_s=10, retry_max_s=300)
    sender = NotificationSender(settings, sessions=None, registry=CollectorRegistry())  # type: ignore[arg-type]
    at = datetime(2026, 12, 1, tzinfo=UTC)
    for attempts, ceiling in [(1, 10), (2, 20), (3, 40), (6, 300), (60, 300)]:
        for _ in range(50):
            wait = sender.next_attempt(attempts, at) - at
            assert timedelta(seconds=ceiling / 2) <= wait <= timedelta(seconds=ceiling)


def test_24_hours_of_retries_take_a_bounded_number_of_attempts() -> None:
    settings = NotificationsSettings()
    sender = NotificationSender(settings, sessions=None, registry=CollectorRegistry())  # type: ignore[arg-type]
    at = start = datetime(2026, 12, 1, tzinfo=UTC)
    attempts = 0
    while at - start < timedelta(seconds=settings.retry_for_s):
        attempts += 1
        at = sender.next_attempt(attempts, at)
    assert 40 <= attempts <= 110  # about one every 15-30 min once capped: the log stays small
