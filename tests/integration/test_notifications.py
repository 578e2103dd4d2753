"""Alert notifications against the real stack: broker, registry, rules engine, a webhook receiver, SMTP.

1. A rule's alert names a webhook channel; an e-mail channel hears the same alert through its
   default route (severity + device tag). Raise, acknowledge and clear each reach both, once,
   signed; the delivery log shows the status codes.
2. The receiver is down for 30 s while alerts are raised and the registry is killed with
   SIGKILL meanwhile; then it answers 503 to first attempts; then the registry is killed again
   while requests are in flight. The receiver, deduplicating on the delivery id, sees every
   transition exactly once (the duplicates the kills cause carry the same id).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import topics
from iotfleet.settings import NotificationsSettings
from rules_engine import wire
from tests.harness import Broker
from tests.integration.test_rules_registry import Platform, overheat_rule, platform_settings
from tests.notification_support import SmtpSink, WebhookReceiver
from tests.registry_harness import ADMIN_KEY, RegistryProcess
from tests.rules_support import RegistryServer, SimThermostat, wait

pytestmark = pytest.mark.integration

FAST_RETRIES = {"poll_s": 0.2, "retry_base_s": 1.0, "retry_max_s": 4.0, "timeout_s": 5.0}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    try:
        yield hook
    finally:
        hook.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


def deliveries(http: httpx.Client, channel: str, **params: Any) -> list[dict[str, Any]]:
    resp = http.get(f"/api/v1/channels/{channel}/deliveries", params={"limit": 500, **params})
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


def test_rule_alert_notifies_webhook_and_email_on_raise_ack_and_clear(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str], receiver: WebhookReceiver, smtp: SmtpSink
) -> None:
    registry_settings, engine_settings = platform_settings(broker, tmp_path, uid=uid)
    registry_settings = registry_settings.model_copy(
        update={
            "notifications": NotificationsSettings(**FAST_RETRIES, smtp_host="127.0.0.1", smtp_port=smtp.port)
        }
    )
    registry = RegistryServer(registry_settings).start()
    http = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    platform = Platform(broker, registry, registry_settings, engine_settings, http)
    try:
        wait(platform.tracker_connected, "tracker connected")
        # --- channels: validation, the secret once -------------------------------------------------
        bad = [
            {"name": "x", "kind": "webhook"},
            {"name": "x", "kind": "webhook", "url": "ftp://example.test/"},
            {"name": "x", "kind": "email", "recipients": ["not-an-address"]},
            {"name": "x/y", "kind": "webhook", "url": receiver.url},
            {"name": "x", "kind": "sms", "url": receiver.url},
        ]
        for body in bad:
            resp = http.post("/api/v1/channels", json=body)
            assert resp.status_code == 422, (body, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
        created = http.post(
            "/api/v1/channels", json={"name": "ops-webhook", "kind": "webhook", "url": receiver.url}
        )
        assert created.status_code == 201, created.text
        receiver.secret = created.json()["secret"]
        assert receiver.secret.startswith("whsec_")
        assert created.json()["signature_header"] == "X-Iotfleet-Signature-256"
        shown = http.get("/api/v1/channels/ops-webhook").json()
        assert "secret" not in shown and receiver.secret not in str(http.get("/api/v1/channels").json())
        again = http.post(
            "/api/v1/channels", json={"name": "ops-webhook", "kind": "webhook", "url": receiver.url}
        )
        assert again.status_code == 409, again.text
        mail = http.post(
            "/api/v1/channels",
            json={
                "name": "oncall-mail",
                "kind": "email",
                "recipients": ["oncall@example.test"],
                "route": {"severities": ["major", "critical"], "tags": {"site": "paris"}},
            },
        )
        assert mail.status_code == 201, mail.text
        assert mail.json()["secret"] is None
        receiver.start()

        # --- a rule naming an unknown channel is refused -------------------------------------------
        device = uid("th")
        thermostat = SimThermostat(broker, device, platform.provision(device, site="paris"))
        rule = overheat_rule(device, for_=None)
        rule["then"][1]["alert"]["notify"] = ["no-such-channel"]
        refused = http.post("/api/v1/rules", json=rule)
        assert refused.status_code == 422, refused.text
        assert any(e["field"].endswith("then.1.alert.notify.0") for e in refused.json()["errors"]), (
            refused.text
        )
        rule["then"][1]["alert"]["notify"] = ["ops-webhook"]
        created_rule = platform.create_rule(rule)
        platform.start_engine()
        platform.wait_rule_loaded(created_rule["id"])

        # --- raise, acknowledge, clear ------------------------------------------------------------
        thermostat.connect()
        thermostat.publish(35.0)
        wait(lambda: platform.alerts(device_id=device, open="true"), "alert raised", timeout=15)
        alert = platform.alerts(device_id=device)[0]
        wait(lambda: len(receiver.delivered()) >= 1, "raise notified", timeout=15)
        ack = http.post(f"/api/v1/alerts/{alert['id']}/acknowledge")
        assert ack.status_code == 200, ack.text
        wait(lambda: len(receiver.delivered()) >= 2, "acknowledge notified", timeout=15)
        thermostat.publish(20.0)
        wait(lambda: len(receiver.delivered()) >= 3, "clear notified", timeout=15)
        wait(lambda: len(smtp.snapshot()) >= 3, "three e-mails", timeout=15)

        got = receiver.delivered()
        assert sorted(r.event for r in got.values()) == [
            "alert.acknowledged",
            "alert.cleared",
            "alert.raised",
        ]
        assert all(r.signature_ok for r in receiver.snapshot()), "every request is signed with the secret"
        assert {r.body["alert"]["id"] for r in got.values()} == {alert["id"]}
        assert all(
            r.body["delivery_id"] == r.delivery_id and r.body["channel"] == "ops-webhook"
            for r in got.values()
        )
        cleared = next(r for r in got.values() if r.event == "alert.cleared")
        assert cleared.body["alert"]["status"] == "cleared"
        assert cleared.body["alert"]["acknowledged_by"] is not None

        wait(lambda: all(d["status"] == "delivered" for d in deliveries(http, "ops-webhook")), "recorded")
        log = deliveries(http, "ops-webhook")
        assert {d["id"] for d in log} == set(got)
        assert all(d["status"] == "delivered" and d["last_status_code"] == 200 for d in log), log
        assert all(d["log"] and d["log"][0]["status_code"] == 200 for d in log), log

        wait(lambda: all(d["status"] == "delivered" for d in deliveries(http, "oncall-mail")), "recorded")
        messages = smtp.snapshot()
        mail_log = deliveries(http, "oncall-mail")
        assert len(messages) == 3 and len(mail_log) == 3
        assert {m["Message-ID"] for m in messages} == {f"<{d['id']}@iotfleet>" for d in mail_log}
        assert all(m["To"] == "oncall@example.test" and device in m["Subject"] for m in messages)
        assert sorted(d["transition"] for d in mail_log) == ["acknowledged", "cleared", "raised"]

        # --- a test notification, then the channel goes with its log -------------------------------
        tested = http.post("/api/v1/channels/ops-webhook/test", json={"message": "hello"})
        assert tested.status_code == 202, tested.text
        wait(lambda: tested.json()["delivery_id"] in receiver.delivered(), "test notification", timeout=10)
        assert receiver.delivered()[tested.json()["delivery_id"]].event == "alert.test"
        assert http.delete("/api/v1/channels/ops-webhook").status_code == 204
        assert http.get("/api/v1/channels/ops-webhook").status_code == 404
        assert http.get("/api/v1/channels/ops-webhook/deliveries").status_code == 404
        thermostat.disconnect()
    finally:
        platform.stop_engine()
        http.close()
        registry.stop()


class EnginePublisher:
    """Alert events as the rules engine publishes them (its account, QoS 1)."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"notify-test-{uuid.uuid4().hex[:8]}"
        )
        settings = broker.settings_for("iotfleet-rules")
        assert settings.password is not None
        self.client.username_pw_set(settings.username, settings.password.get_secret_value())
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, payload: bytes) -> None:
        self.client.publish(topics.ALERT_EVENTS, payload, qos=1).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _tracker_connected(http: httpx.Client) -> bool:
    try:
        return "registry_tracker_connected 1.0" in http.get("/metrics").text
    except httpx.HTTPError:
        return False


def test_a_30s_outage_and_kill_9_mid_delivery_still_deliver_every_transition_exactly_once(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str], receiver: WebhookReceiver
) -> None:
    alerts = 20
    env = {f"IOTFLEET_NOTIFICATIONS__{k.upper()}": str(v) for k, v in FAST_RETRIES.items()}
    env["IOTFLEET_RULES__CLIENT_ID"] = uid("reg")
    registry = RegistryProcess(broker, tmp_path / "registry", extra_env=env).start()
    http = registry.client()
    publisher = EnginePublisher(broker)
    try:
        wait(lambda: _tracker_connected(http), "tracker connected", timeout=20)
        created = http.post(
            "/api/v1/channels", json={"name": "ops", "kind": "webhook", "url": receiver.url, "route": {}}
        )
        assert created.status_code == 201, created.text
        receiver.secret = created.json()["secret"]
        # --- 1. the receiver is down (connection refused) for 30 s --------------------------------
        down_since = time.monotonic()
        raised = [
            {"rule_id": str(uuid.uuid4()), "device_id": uid(f"dev{i}"), "rule_name": f"r{i}"}
            for i in range(alerts)
        ]
        for item in raised:
            publisher.publish(
                wire.alert_raised_event(
                    **item,
                    device_type="thermostat",
                    severity="major",
                    message="hot",
                    at=int(time.time() * 1000),
                    values={"temperature_c": 35.0},
                )
            )

        def failing_attempts() -> bool:
            log = deliveries(http, "ops")
            return len(log) == alerts and all(d["attempts"] >= 1 and d["status"] == "pending" for d in log)

        wait(failing_attempts, "every delivery attempted and failing", timeout=20)
        log = deliveries(http, "ops")
        assert all(d["last_status_code"] is None and d["last_error"] for d in log), log[0]
        registry.kill()  # SIGKILL with every delivery pending
        registry.start()
        wait(lambda: _tracker_connected(http), "tracker connected after the kill", timeout=20)
        # The outage is the scenario, not a readiness wait: 30 s from when the receiver went away.
        time.sleep(max(0.0, 30.0 - (time.monotonic() - down_since)))
        assert all(d["status"] == "pending" for d in deliveries(http, "ops"))
        receiver.start()
        wait(lambda: len(receiver.delivered()) >= alerts, "deliveries after the outage", timeout=30)
        log = deliveries(http, "ops")
        wait(
            lambda: all(d["status"] == "delivered" for d in deliveries(http, "ops")), "all recorded delivered"
        )
        log = deliveries(http, "ops")
        assert all(d["attempts"] >= 2 and d["log"][0]["status_code"] == 200 for d in log), log[0]
        assert any(a["error"] for d in log for a in d["log"][1:]), "the failed attempts are in the log"

        # --- 2. acknowledgements: the receiver answers 503 to each first attempt ------------------
        receiver.fail_first["alert.acknowledged"] = 503
        open_alerts = http.get("/api/v1/alerts", params={"open": "true", "limit": 1000}).json()["items"]
        ours = [a for a in open_alerts if a["device_id"] in {r["device_id"] for r in raised}]
        assert len(ours) == alerts
        for alert in ours[: alerts // 2]:
            assert http.post(f"/api/v1/alerts/{alert['id']}/acknowledge").status_code == 200
            assert http.post(f"/api/v1/alerts/{alert['id']}/acknowledge").status_code == 200  # idempotent
        wait(
            lambda: (
                sum(r.event == "alert.acknowledged" for r in receiver.delivered().values()) >= alerts // 2
            ),
            "acknowledgements delivered after a 503",
            timeout=30,
        )
        acked = [d for d in deliveries(http, "ops") if d["transition"] == "acknowledged"]
        wait(lambda: all(d["status"] == "delivered" for d in deliveries(http, "ops")), "acks recorded")
        acked = [d for d in deliveries(http, "ops") if d["transition"] == "acknowledged"]
        assert len(acked) == alerts // 2
        assert all([a["status_code"] for a in reversed(d["log"])] == [503, 200] for d in acked), acked[0]

        # --- 3. SIGKILL while requests are in flight ----------------------------------------------
        receiver.hold_s = 1.5
        in_flight_before = len(receiver.snapshot())
        for item in raised:
            publisher.publish(
                wire.alert_cleared_event(
                    rule_id=item["rule_id"], device_id=item["device_id"], at=int(time.time() * 1000)
                )
            )
        wait(lambda: len(receiver.snapshot()) > in_flight_before, "a clear request in flight", timeout=20)
        registry.kill()
        registry.start()
        wait(
            lambda: sum(r.event == "alert.cleared" for r in receiver.delivered().values()) >= alerts,
            "every clear delivered after the kill",
            timeout=60,
        )
        wait(
            lambda: all(d["status"] == "delivered" for d in deliveries(http, "ops")),
            "clears recorded",
            timeout=20,
        )

        # --- exactly once per transition, as the deduplicating receiver sees it --------------------
        delivered = receiver.delivered()
        per_transition = Counter((r.body["alert"]["id"], r.event) for r in delivered.values())
        assert all(n == 1 for n in per_transition.values()), per_transition.most_common(3)
        events = Counter(r.event for r in delivered.values())
        assert events == {"alert.raised": alerts, "alert.acknowledged": alerts // 2, "alert.cleared": alerts}
        assert set(delivered) == {d["id"] for d in deliveries(http, "ops")}
        assert all(r.signature_ok for r in receiver.snapshot())
        print(
            f"receiver: {len(receiver.snapshot())} requests, {len(delivered)} deliveries, "
            f"{receiver.duplicates()} duplicates from the kills (same delivery id)"
        )
    finally:
        publisher.close()
        http.close()
        registry.stop()
