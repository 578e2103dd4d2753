"""The notifications page in Chromium: create a webhook channel (the secret shown once), send a
test notification and watch it delivered in the log, refuse a bad URL with the API's reason,
delete the channel. A real registry process and a real webhook receiver checking signatures."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.harness import Broker
from tests.integration.test_dashboard_manage import SCREENSHOTS, World, browser, signed_in  # noqa: F401
from tests.notification_support import WebhookReceiver
from tests.registry_harness import ADMIN_KEY, RegistryProcess
from tests.rules_support import wait

pytestmark = pytest.mark.integration


@pytest.fixture
def world(broker: Broker, tmp_path: Path) -> Iterator[World]:
    registry = RegistryProcess(
        broker, tmp_path / "registry", extra_env={"IOTFLEET_NOTIFICATIONS__POLL_S": "0.2"}
    ).start()
    try:
        yield World(registry, viewer_key="", thermostat="", plug="")
    finally:
        registry.stop()


def test_admin_creates_tests_and_deletes_a_webhook_channel(browser: Browser, world: World) -> None:  # noqa: F811
    receiver = WebhookReceiver().start()
    name = f"ops-{secrets.token_hex(3)}"
    try:
        with signed_in(browser, world, ADMIN_KEY, "/notifications") as (page, console):
            expect(page.locator("#channels-note")).to_contain_text("0 channel(s)")
            page.fill("#ch-name", name)
            page.fill("#ch-target", "ftp://example.test/hook")
            with console.expect(r"status of 422"):
                page.click("#channel-create")
                expect(page.locator("#channel-error")).to_contain_text("url")
            page.fill("#ch-target", receiver.url)
            page.fill("#ch-severities", "critical, major")
            page.fill("#ch-tags", "site=paris")
            page.click("#channel-create")
            secret = page.locator("#new-channel-secret").inner_text()
            assert secret.startswith("whsec_")
            receiver.secret = secret
            row = page.locator(f"#channels-table tbody tr[data-channel='{name}']")
            expect(row).to_contain_text("critical, major · tagged site=paris")
            expect(row).to_contain_text(receiver.url)

            page.get_by_role("button", name=f"Send a test notification through {name}").click()
            expect(page.locator("#flash")).to_contain_text("Test notification queued")
            delivered = page.locator("#deliveries-table tbody tr[data-status=delivered]")
            expect(delivered).to_have_count(1, timeout=15_000)
            expect(delivered).to_contain_text("test")
            expect(delivered.locator(".last-answer")).to_have_text("200")
            wait(lambda: len(receiver.delivered()) == 1, "the receiver got the test")
            assert all(r.signature_ok and r.event == "alert.test" for r in receiver.snapshot())
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "notifications.png"), full_page=True)

            page.reload()
            page.wait_for_selector("body[data-state=ready]")
            assert page.locator("#new-channel-secret").count() == 0 and secret not in page.content()
            page.get_by_role("button", name=f"Delete channel {name}").click()
            expect(page.locator(f"#channels-table tbody tr[data-channel='{name}']")).to_have_count(0)
            expect(page.locator("#flash")).to_contain_text("deleted")
    finally:
        receiver.stop()
