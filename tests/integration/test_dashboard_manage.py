"""The dashboard's state timelines, axis labels, API keys and rule editing in Chromium (issue #16).

One registry process for the module on the shared broker and InfluxDB, with a
database of its own holding a known hour of readings written as the ingest
stores them (measurement = type, tag device_id): a thermostat whose `mode` is
heat, then cool, then (after a 15-minute hole) off; a smart plug whose relay
goes on, off, on. The tests only read that data, so they do not depend on
their order; each opens its own browser context (admin or viewer key).

Every console error fails the test unless it is one a step provokes on purpose
(Chromium logs each 4xx response as "Failed to load resource").
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotfleet.influx import encode_point, quote_identifier
from tests.harness import Broker, Influxd
from tests.registry_harness import ADMIN_KEY, RegistryProcess

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`)", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--headless",
]
MIN_MS = 60_000
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


@dataclass
class World:
    registry: RegistryProcess
    viewer_key: str
    thermostat: str
    plug: str

    def http(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.registry.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


def _readings(thermostat: str, plug: str, now_ms: int) -> list[str]:
    """An hour ending now: mode heat (50-40 min ago), cool (40-30), nothing (30-15), off (15-1)."""
    lines = []
    seq = 0
    for minutes_ago, mode in [(50, "heat"), (40, "cool"), (15, "off")]:
        span = 10 if mode != "off" else 14
        for i in range(span * 6):  # every 10 s
            seq += 1
            at = now_ms - minutes_ago * MIN_MS + i * 10_000
            fields = {"temperature_c": 20.0 + (i % 7), "humidity_pct": 45.0, "setpoint_c": 21.0, "mode": mode}
            lines.append(encode_point("thermostat", {"device_id": thermostat}, {**fields, "seq": seq}, at))
    for k, on in enumerate([True, False, True]):
        for i in range(60):  # 10 min each, every 10 s, from 30 min ago
            at = now_ms - 30 * MIN_MS + k * 10 * MIN_MS + i * 10_000
            fields = {
                "power_w": 100.0 if on else 0.0,
                "voltage_v": 230.0,
                "current_a": 0.4,
                "energy_kwh": 1.0,
            }
            lines.append(encode_point("smart_plug", {"device_id": plug}, {**fields, "relay_on": on}, at))
    return lines


@pytest.fixture(scope="module")
def world(
    session_broker: Broker, session_influxd: Influxd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    database = f"test_{secrets.token_hex(6)}"
    influx = session_influxd.url
    httpx.post(
        f"{influx}/query",
        data={"q": f"CREATE DATABASE {quote_identifier(database)} WITH NAME raw"},
        timeout=10,
    )
    registry = RegistryProcess(
        session_broker,
        tmp_path_factory.mktemp("dashboard-manage"),
        extra_env={"IOTFLEET_INFLUX__URL": influx, "IOTFLEET_INFLUX__DATABASE": database},
    ).start()
    try:
        token = secrets.token_hex(3)
        thermostat, plug = f"fh-th-{token}", f"fh-plug-{token}"
        with httpx.Client(
            base_url=registry.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        ) as http:
            for device_id, device_type in [(thermostat, "thermostat"), (plug, "smart_plug")]:
                created = http.post("/api/v1/devices", json={"id": device_id, "type": device_type})
                assert created.status_code == 201, created.text
            viewer = http.post("/api/v1/api-keys", json={"name": f"viewer-{token}", "role": "viewer"})
            assert viewer.status_code == 201, viewer.text
        body = "\n".join(_readings(thermostat, plug, int(time.time() * 1000)))
        written = httpx.post(
            f"{influx}/write", params={"db": database, "precision": "ms"}, content=body.encode(), timeout=30
        )
        assert written.status_code == 204, written.text
        yield World(registry, viewer.json()["key"], thermostat, plug)
    finally:
        registry.stop()
        httpx.post(f"{influx}/query", data={"q": f"DROP DATABASE {quote_identifier(database)}"}, timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Console:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(p.search(message.text) for p in self.allowed):
            self.errors.append(f"{message.text} ({message.location.get('url', '')})")

    @contextmanager
    def expect(self, pattern: str) -> Iterator[None]:
        compiled = re.compile(pattern)
        self.allowed.append(compiled)
        try:
            yield
        finally:
            self.allowed.remove(compiled)


@contextmanager
def signed_in(
    browser: Browser, world: World, key: str, path: str, *, width: int = 1366, allow: str | None = None
) -> Iterator[tuple[Page, Console]]:
    """A fresh context signed in with ``key`` on ``path``, first data on screen; no console error
    allowed but ``allow`` (a pattern)."""
    context: BrowserContext = browser.new_context(
        viewport={"width": width, "height": 900}, device_scale_factor=1, locale="en-GB"
    )
    console = Console()
    if allow:
        console.allowed.append(re.compile(allow))
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", console.on_console)
        page.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
        page.on("dialog", lambda dialog: dialog.accept())  # confirmations say yes
        page.goto(f"{world.registry.url}/signin?next={path}")
        page.fill("#api-key", key)
        page.keyboard.press("Enter")
        page.wait_for_url(f"**{path}")
        page.wait_for_selector("body[data-state=ready]")
        yield page, console
        assert not console.errors, "console errors in the browser:\n" + "\n".join(console.errors)
    finally:
        context.close()


# --- state timelines -------------------------------------------------------------------------

BANDS_JS = """field => [...document.querySelectorAll(`figure[data-field=${field}] rect.band`)]
    .map(r => [r.dataset.value, Number(r.dataset.from), Number(r.dataset.to)])"""


def test_non_numeric_fields_are_state_timelines_with_gaps(browser: Browser, world: World) -> None:
    with signed_in(browser, world, ADMIN_KEY, f"/devices/{world.thermostat}") as (page, _console):
        page.wait_for_selector("#charts[data-range='3600']")
        mode = page.locator("figure.states[data-field=mode]")
        expect(mode).to_be_visible()
        # numeric fields keep their charts; the string field is a timeline, not a chart
        assert page.locator("figure.chart[data-field=temperature_c] .plot").count() == 1
        assert page.locator("figure[data-field=mode] .plot").count() == 0
        bands = page.evaluate(BANDS_JS, "mode")
        assert [b[0] for b in bands] == ["heat", "cool", "off"]
        assert mode.get_attribute("data-gaps") == "1"
        (_, _, heat_to), (_, cool_from, cool_to), (_, off_from, _) = bands
        assert heat_to == cool_from  # contiguous readings: one band runs into the next
        assert 14 * 60 <= off_from - cool_to <= 16 * 60  # the hole without data stays empty
        expect(mode.locator(".states-legend")).to_contain_text("heat")
        expect(mode.locator("rect.band[data-value=cool] title")).to_contain_text("mode = cool")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.locator("#charts").screenshot(path=str(SCREENSHOTS / "device-state-timelines.png"))

        # Longer range: the last value per bucket; the hole is still a gap.
        page.select_option("#range", "86400")
        page.wait_for_selector("#charts[data-range='86400']")
        assert [b[0] for b in page.evaluate(BANDS_JS, "mode")] == ["heat", "cool", "off"]
        assert int(mode.get_attribute("data-gaps") or 0) >= 1

    with signed_in(browser, world, ADMIN_KEY, f"/devices/{world.plug}") as (page, _console):
        page.wait_for_selector("#charts[data-range='3600']")
        assert [b[0] for b in page.evaluate(BANDS_JS, "relay_on")] == ["true", "false", "true"]
        assert page.locator("figure.chart[data-field=power_w] .plot").count() == 1


# --- axis labels -----------------------------------------------------------------------------

# Every axis label's box: uPlot draws on a canvas, so the boxes are computed from its own tick
# positions and values, measured with its axis font; the state timelines' labels are SVG text.
LABEL_BOXES_JS = """() => {
  const ctx = document.createElement('canvas').getContext('2d');
  const axes = [];
  for (const plot of document.querySelectorAll('.plot')) {
    const u = plot.iotfleetChart;
    if (!u) continue;
    u.axes.forEach((axis, i) => {
      if (!axis.show || !axis._values) return;
      const font = Array.isArray(axis.font) ? axis.font[0] : axis.font;
      const px = Array.isArray(axis.font) ? axis.font[1] : 12;
      ctx.font = font;
      const scale = i === 0 ? 'x' : 'y';
      const boxes = [];
      axis._splits.forEach((split, k) => {
        const value = axis._values[k];
        if (value === null || value === undefined || value === '') return;
        const lines = String(value).split('\\n');
        const w = Math.max(...lines.map(l => ctx.measureText(l).width));
        const h = lines.length * px * 1.5;
        const pos = u.valToPos(split, scale);
        boxes.push(i === 0 ? [pos - w / 2, pos + w / 2, String(value)] : [pos - h / 2, pos + h / 2, String(value), w]);
      });
      axes.push({ field: plot.closest('figure').dataset.field, axis: i, size: axis._size, boxes });
    });
  }
  for (const fig of document.querySelectorAll('figure.states')) {
    const boxes = [...fig.querySelectorAll('text.tick')].map(t => {
      const r = t.getBoundingClientRect();
      return [r.left, r.right, t.textContent];
    });
    axes.push({ field: fig.dataset.field, axis: 0, size: 0, boxes });
  }
  return axes;
}"""


def _assert_no_overlap(axes: list[dict[str, Any]], where: str) -> int:
    checked = 0
    for axis in axes:
        boxes = sorted(axis["boxes"], key=lambda b: b[0])
        for a, b in itertools.pairwise(boxes):
            assert a[1] <= b[0], (
                f"{where}: labels {a[2]!r} and {b[2]!r} overlap on {axis['field']} axis {axis['axis']}"
            )
            checked += 1
        if axis["axis"] == 1:  # a value label fits in its axis (ticks 10 px + gap 5 px)
            for box in boxes:
                assert box[3] <= axis["size"] - 15, f"{where}: {box[2]!r} wider than the {axis['field']} axis"
    return checked


def test_axis_labels_never_overlap_at_any_range_or_zoom(browser: Browser, world: World) -> None:
    for width in (360, 1366):
        with signed_in(browser, world, ADMIN_KEY, f"/devices/{world.thermostat}", width=width) as (page, _c):
            page.wait_for_selector("#charts[data-range='3600']")
            checked = 0
            for seconds in ("900", "3600", "21600", "86400", "604800"):
                page.select_option("#range", seconds)
                page.wait_for_selector(f"#charts[data-range='{seconds}']")
                checked += _assert_no_overlap(page.evaluate(LABEL_BOXES_JS), f"{width}px, range {seconds}s")
            # Zoomed in to 90 s and to 20 s (second ticks, the date under the first and at midnight).
            page.select_option("#range", "3600")
            page.wait_for_selector("#charts[data-range='3600']")
            for span in (90, 20):
                page.evaluate(
                    """span => { for (const p of document.querySelectorAll('.plot')) {
                         const u = p.iotfleetChart; const max = u.scales.x.max;
                         u.setScale('x', { min: max - span, max }); } }""",
                    span,
                )
                checked += _assert_no_overlap(page.evaluate(LABEL_BOXES_JS), f"{width}px, zoom {span}s")
            assert checked > 50, f"too few label pairs compared ({checked}): the check would prove nothing"


# --- API keys --------------------------------------------------------------------------------


def test_admin_manages_api_keys_with_the_secret_shown_once(browser: Browser, world: World) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = f"ci-bot-{secrets.token_hex(3)}"
    with signed_in(browser, world, ADMIN_KEY, "/api-keys") as (page, console):
        rows = page.locator("#keys-table tbody tr")
        expect(rows.first).to_be_visible()
        assert page.locator("#keys-table tbody tr:has-text('this tab')").count() == 1
        page.click("#key-create")  # no name: refused before any request
        expect(page.locator("#key-error")).to_contain_text("name")
        page.fill("#k-name", name)
        page.select_option("#k-role", "operator")
        page.click("#key-create")
        secret = page.locator("#new-key-secret").inner_text()
        assert secret.startswith("ifk_")
        row = page.locator(f"#keys-table tbody tr:has-text('{name}')")
        expect(row).to_contain_text("operator")
        assert secret not in page.url and secret not in row.inner_text()
        page.screenshot(path=str(SCREENSHOTS / "api-keys.png"), full_page=True)
        with world.http(secret) as as_new:
            assert as_new.get("/api/v1/api-keys/me").json()["role"] == "operator"
        page.reload()
        page.wait_for_selector("body[data-state=ready]")
        expect(page.locator(f"#keys-table tbody tr:has-text('{name}')")).to_be_visible()
        assert page.locator("#new-key-secret").count() == 0  # shown once
        assert secret not in page.content()

        page.get_by_role("button", name=f"Revoke key {name}").click()
        expect(page.locator(f"#keys-table tbody tr:has-text('{name}')")).to_have_count(0)
        expect(page.locator("#flash")).to_contain_text("revoked")
        with world.http(secret) as as_new:
            assert as_new.get("/api/v1/api-keys/me").status_code == 401

        # The last admin key cannot go: the API's 409 problem is shown, nothing breaks.
        with world.http() as http:
            roles = [k["role"] for k in http.get("/api/v1/api-keys").json()["items"]]
        assert roles.count("admin") == 1 and roles[0] == "admin"  # the first row: this tab's key
        with console.expect(r"status of 409"):
            page.get_by_role("button", name=re.compile(r"^Revoke key ")).first.click()
            expect(page.locator("#flash")).to_contain_text("last admin key")


def test_viewer_sees_why_and_cannot_manage(browser: Browser, world: World) -> None:
    with world.http() as http:
        rule = http.post(
            "/api/v1/rules",
            json={
                "name": f"viewer-sees-{secrets.token_hex(3)}",
                "scope": {"device_type": "thermostat"},
                "when": {"field": "temperature_c", "op": ">", "value": 60},
                "then": [{"alert": {"severity": "minor", "message": "hot"}}],
            },
        ).json()
    try:
        # The key list is the one request refused (403) to a viewer: the page says why.
        with signed_in(browser, world, world.viewer_key, "/api-keys", allow="status of 403") as (page, _c):
            expect(page.locator("#keys-note")).to_contain_text("Only an admin key")
            expect(page.locator("#key-create")).to_be_disabled()
            assert "admin" in (page.get_attribute("#key-create", "title") or "")
        with signed_in(browser, world, world.viewer_key, "/rules") as (page, _console):
            row = page.locator(f"#rules-table tr[data-rule-id='{rule['id']}']")
            expect(row.get_by_role("button", name=f"Edit rule {rule['name']}")).to_be_disabled()
            expect(row.get_by_role("button", name=f"Delete rule {rule['name']}")).to_be_disabled()
            expect(row.get_by_role("button", name=f"Backtest rule {rule['name']}")).to_be_enabled()
    finally:
        with world.http() as http:
            http.delete(f"/api/v1/rules/{rule['id']}")


# --- rules: edit and delete ------------------------------------------------------------------


def test_admin_edits_and_deletes_a_rule_with_the_api_errors_shown(browser: Browser, world: World) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = f"edit-me-{secrets.token_hex(3)}"
    with world.http() as http:
        rule = http.post(
            "/api/v1/rules",
            json={
                "name": name,
                "scope": {"device_type": "thermostat"},
                "when": {"field": "temperature_c", "op": ">", "value": 40},
                "then": [{"alert": {"severity": "major", "message": "too hot"}}],
            },
        ).json()
    with signed_in(browser, world, ADMIN_KEY, "/rules") as (page, console):
        row = page.locator(f"#rules-table tr[data-rule-id='{rule['id']}']")
        row.get_by_role("button", name=f"Edit rule {name}").click()
        editor = page.locator("#rule-edit-json")
        expect(editor).to_be_focused()
        definition = json.loads(editor.input_value())
        assert definition["when"] == {"field": "temperature_c", "op": ">", "value": 40}
        assert "id" not in definition and "version" not in definition

        # An invalid change: the API's problem+json is listed under the editor, nothing saved.
        definition["when"]["field"] = "temperature_f"
        editor.fill(json.dumps(definition, indent=2))
        with console.expect(r"status of 422"):
            page.click("#rule-save")
            expect(page.locator("#rule-edit-errors")).to_contain_text("temperature_f")
        assert editor.get_attribute("aria-invalid") == "true"
        page.screenshot(path=str(SCREENSHOTS / "rule-edit.png"), full_page=True)
        with world.http() as http:
            assert http.get(f"/api/v1/rules/{rule['id']}").json()["version"] == 1

        definition["when"] = {"field": "temperature_c", "op": ">", "value": 45}
        editor.fill(json.dumps(definition))
        page.click("#rule-save")
        expect(page.locator("#rule-edit")).to_be_hidden()
        expect(row.locator("td.num")).to_have_text("2")
        expect(row).to_contain_text('"value":45')
        with world.http() as http:
            saved = http.get(f"/api/v1/rules/{rule['id']}").json()
        assert saved["version"] == 2 and saved["when"]["value"] == 45

        row.get_by_role("button", name=f"Delete rule {name}").click()
        expect(row).to_have_count(0)
        with world.http() as http:
            assert http.get(f"/api/v1/rules/{rule['id']}").status_code == 404
