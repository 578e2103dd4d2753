"""The device page's presence timeline in a real browser (Debian's Chromium through Playwright).

A registry process on the shared broker and InfluxDB; one device connects,
disconnects cleanly, connects again and is killed off the network by a dropped
socket: the page lists the transitions newest first with their causes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Broker, Influxd
from tests.presence_device import device_process
from tests.registry_harness import ADMIN_KEY, RegistryProcess, connect_device

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`)", allow_module_level=True)

from playwright.sync_api import ConsoleMessage, expect, sync_playwright  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--headless",
]


@pytest.fixture
def registry(broker: Broker, influxd: Influxd, database: str, tmp_path: Path) -> Iterator[RegistryProcess]:
    proc = RegistryProcess(
        broker,
        tmp_path / "registry",
        extra_env={"IOTFLEET_INFLUX__URL": influxd.url, "IOTFLEET_INFLUX__DATABASE": database},
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def _history(registry: RegistryProcess, device_id: str) -> list[tuple[bool, str]]:
    with registry.client() as http:
        items = http.get(f"/api/v1/devices/{device_id}/presence").json()["items"]
    return [(t["online"], t["cause"]) for t in items]


def _wait(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not true after {within} s")
        time.sleep(0.1)


def test_device_page_shows_the_presence_timeline(
    registry: RegistryProcess, broker: Broker, uid: Callable[[str], str]
) -> None:
    device_id = uid("timeline")
    with registry.client() as http:
        created = http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"})
        assert created.status_code == 201, created.text
        password = created.json()["credentials"]["password"]
    client = connect_device(broker, device_id, password)
    _wait(lambda: _history(registry, device_id) == [(True, "connected")], "connected recorded")
    client.close()
    _wait(lambda: len(_history(registry, device_id)) == 2, "disconnect recorded")
    with device_process([], broker.host, broker.port, device_id, password, keepalive=30) as proc:
        _wait(lambda: len(_history(registry, device_id)) == 3, "reconnect recorded")
        proc.kill()
    expected = [(True, "connected"), (False, "disconnected"), (True, "connected"), (False, "will")]
    _wait(lambda: _history(registry, device_id) == expected, "will recorded")

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1366, "height": 860}).new_page()
            page.set_default_timeout(15_000)
            page.on("console", lambda m: errors.append(m.text) if _is_error(m) else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.goto(f"{registry.url}/signin?next=%2Fdevices%2F{device_id}")
            page.fill("#api-key", ADMIN_KEY)
            page.keyboard.press("Enter")
            page.wait_for_url(f"**/devices/{device_id}")
            page.wait_for_selector("body[data-state=ready]")
            rows = page.locator("#presence-timeline tbody tr")
            expect(rows).to_have_count(4)
            causes = [rows.nth(i).get_attribute("data-cause") for i in range(4)]
            assert causes == ["will", "connected", "disconnected", "connected"]  # newest first
            expect(rows.nth(0)).to_contain_text("connection lost (will sent)")
            expect(rows.nth(0)).to_contain_text("offline")
            expect(rows.nth(1)).to_contain_text("online")
            expect(page.locator("#presence")).to_contain_text("offline")
        finally:
            browser.close()
    assert not errors, errors


def _is_error(message: ConsoleMessage) -> bool:
    return message.type == "error"
