"""The device page's desired-state panel in a real browser (Chromium through Playwright), real registry and broker.

An operator sets a thermostat's desired state in the form, the device (a real MQTT
client) converges and the panel shows it in sync; an edit made meanwhile through
the API makes the form's save answer 412, which the panel explains and reloads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.integration.test_dashboard import CHROMIUM, CHROMIUM_ARGS, Console
from tests.integration.test_device_state import device, patch, shadow_platform, state
from tests.integration.test_rules_registry import Platform
from tests.registry_harness import ADMIN_KEY
from tests.rules_support import wait

pytestmark = pytest.mark.integration

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is absent", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

__all__ = ["shadow_platform"]  # the module-scoped platform fixture, used here


@pytest.fixture(scope="module")
def tab() -> Iterator[tuple[Page, Console]]:
    console = Console()
    # This platform has no InfluxDB: the page's telemetry panels get 503 (not what is tested here).
    console.allowed.append(
        re.compile(r"status of 503 .*/api/v1/(fleet/summary|devices/[^/]+/(telemetry|deadletters))")
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 900}, locale="en-GB")
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", console.on_console)
        page.on("pageerror", console.on_page_error)
        yield page, console
        context.close()
        browser.close()


def test_operator_edits_desired_state_and_sees_the_device_converge(
    shadow_platform: Platform, tab: tuple[Page, Console]
) -> None:
    env = shadow_platform
    page, console = tab
    dev = device(env).connect()
    try:
        page.goto(f"{env.registry.url}/devices/{dev.device_id}")
        page.get_by_label("API key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/devices/{dev.device_id}")
        page.wait_for_selector("#state-panel[data-panel-state=ready]")
        expect(page.locator("#state-summary")).to_contain_text("Desired v0")
        page.get_by_label("mode", exact=True).select_option("eco")
        page.get_by_label("setpoint_c", exact=True).fill("18.5")
        page.get_by_role("button", name="Save desired state").click()
        expect(page.locator("#state-result")).to_contain_text("Saved: desired version 1")
        # The device applies the delta and reports; the panel's next poll shows it in sync.
        row = page.locator("#state-table tr[data-field=mode]")
        expect(row.locator("td.reported")).to_have_text('"eco"', timeout=10_000)
        expect(row.locator(".badge")).to_have_text("in sync")
        expect(page.locator("#state-summary")).to_contain_text("in sync")
        assert state(env, dev.device_id)["desired"] == {"mode": "eco", "setpoint_c": 18.5}

        # Someone else changes it meanwhile: the stale form's save is refused (412) and explained.
        assert patch(env, dev.device_id, {"setpoint_c": 21.0}).status_code == 200
        page.get_by_label("setpoint_c", exact=True).fill("19")
        with console.expect(r"status of 412"):
            page.get_by_role("button", name="Save desired state").click()
            expect(page.locator("#state-error")).to_contain_text("version 2")
        expect(page.get_by_label("setpoint_c", exact=True)).to_have_value("21")
        # Emptying a field removes it from the desired state (merge patch null).
        page.get_by_label("setpoint_c", exact=True).fill("")
        page.get_by_role("button", name="Save desired state").click()
        expect(page.locator("#state-result")).to_contain_text("desired version 3")
        wait(lambda: state(env, dev.device_id)["desired"] == {"mode": "eco"}, "setpoint removed")
        # Invalid input is refused with the field marked.
        page.get_by_label("setpoint_c", exact=True).fill("99")
        with console.expect(r"status of 422"):
            page.get_by_role("button", name="Save desired state").click()
            expect(page.locator("#state-error")).to_contain_text(re.compile("less than or equal to 35"))
        expect(page.get_by_label("setpoint_c", exact=True)).to_have_attribute("aria-invalid", "true")
        console.assert_clean()
    finally:
        dev.disconnect()
