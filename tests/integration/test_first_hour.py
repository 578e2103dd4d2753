"""A new user's first hour against a real stack started with `iotfleet up` on free ports.

The stack is started once for the module (like a user would) and every test is
a client of it: what `up`/`status` print, `iotfleet simulate` without repeating
the ports, the README's "Connect a device" commands run literally, `iotfleet demo`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iotfleet.stack import probes

pytestmark = pytest.mark.integration

IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]
REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningStack:
    state_dir: Path
    env: dict[str, str]  # the environment `up` ran with (ports as IOTFLEET_* variables)
    client_env: dict[str, str]  # the same without any IOTFLEET_* variable: what a user's shell has
    mqtt_port: int
    api_port: int
    up_output: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def admin_key(self) -> str:
        return (self.state_dir / "admin-api-key").read_text().strip()


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOTFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("first-hour")
    mqtt_port, influx_port, api_port, rpc_port, base = probes.free_ports(4, block=8)
    client_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IOTFLEET_")}
    client_env["COLUMNS"] = "200"
    env = {
        **client_env,
        "IOTFLEET_STATE_DIR": str(tmp / "state"),
        "IOTFLEET_MQTT__PORT": str(mqtt_port),
        "IOTFLEET_INFLUX__URL": f"http://127.0.0.1:{influx_port}",
        "IOTFLEET_REGISTRY__PORT": str(api_port),
        "IOTFLEET_STACK__INFLUX_RPC_PORT": str(rpc_port),
        "IOTFLEET_STACK__SERVICE_PORT_BASE": str(base),
        # the broker's device-facing TLS listeners (8883/8884 by default): free ports too
        **dict(
            zip(
                ("IOTFLEET_TLS__PORT", "IOTFLEET_TLS__CERT_PORT"), map(str, probes.free_ports(2)), strict=True
            )
        ),
    }
    up = run(env, "up", "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield RunningStack(tmp / "state", env, client_env, mqtt_port, api_port, up.stdout + up.stderr)
    finally:
        run(env, "down", timeout=90)


def test_up_and_status_print_the_dashboard_url(stack: RunningStack) -> None:
    dashboard = f"http://127.0.0.1:{stack.api_port}/"
    assert f"Dashboard: {dashboard}" in stack.up_output
    status = run(stack.env, "status")
    assert status.returncode == 0, status.stderr
    assert f"Dashboard: {dashboard}" in status.stdout
    info = json.loads(run(stack.env, "status", "--json").stdout)
    assert info["dashboard"] == dashboard
    assert httpx.get(dashboard, timeout=10).status_code == 200


def test_simulate_finds_the_running_stack_from_the_state_dir(stack: RunningStack) -> None:
    # Only the state dir: no port flag, no IOTFLEET_* variable (the stack is on non-default ports).
    done = run(
        stack.client_env,
        "simulate",
        "--state-dir",
        str(stack.state_dir),
        "--devices",
        "4",
        "--duration",
        "3",
        "--interval",
        "1s",
        "--verify",
        "--quiet",
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"against 127.0.0.1:{stack.mqtt_port}" in done.stderr
    report_path = re.search(r"report written to (\S+)", done.stderr)
    assert report_path is not None, done.stderr
    report = json.loads(Path(report_path.group(1)).read_text())
    assert report["verify"]["ok"] and report["verify"]["stored"] >= 4, report["verify"]


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_api_docs_render_in_a_browser_with_no_outside_network(stack: RunningStack) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    # Every request that leaves the page is recorded (and refused, as if offline). The pages' policy
    # (default-src 'self') keeps ReDoc's decorative cdn.redoc.ly logo from being requested at all.
    outside: list[str] = []

    def only_loopback(route: Route) -> None:
        if httpx.URL(route.request.url).host == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(f"{stack.api}/docs")
            # Swagger UI rendered the operations from /openapi.json.
            expect(page.locator(".opblock-summary-path", has_text="/api/v1/devices").first).to_be_visible(
                timeout=20_000
            )
            page.goto(f"{stack.api}/redoc")
            expect(page.get_by_text("iotfleet registry", exact=False).first).to_be_visible(timeout=20_000)
            expect(page.locator("[data-section-id]").first).to_be_attached(timeout=20_000)
        finally:
            browser.close()
    assert outside == [], f"the docs pages asked for outside resources: {outside}"


def readme_walkthrough() -> list[str]:
    """The ```sh blocks of README.md's "Connect a device" section, in order, as written."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Connect a device\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], flags=re.DOTALL)


def _for_this_stack(block: str, stack: RunningStack) -> str:
    # Only the ports and the state dir differ from what a user types.
    return (
        block.replace("http://127.0.0.1:8000/", f"http://127.0.0.1:{stack.api_port}/")
        .replace("-p 1883 ", f"-p {stack.mqtt_port} ")
        .replace("cat .iotfleet/", f"cat {stack.state_dir}/")
    )


def test_readme_connect_a_device_runs_as_written(stack: RunningStack, tmp_path: Path) -> None:
    blocks = readme_walkthrough()
    assert len(blocks) == 5, blocks
    substituted = [_for_this_stack(block, stack) for block in blocks]
    for original, block in zip(blocks, substituted, strict=True):
        assert (block != original) == ("8000" in original or "1883" in original or ".iotfleet" in original)
    # What each step must show; read-backs are repeated until they do (the ingest writes within ms,
    # a person typing the next command never sees the difference).
    expected = [
        ('"telemetry":"devices/thermostat/kitchen-1/telemetry"', False),
        ("", False),
        ('"temperature_c":{"value":21.5', True),
        ('"name":"set_setpoint"', False),
        ('"status":"succeeded"', True),
    ]
    variables = tmp_path / "variables.sh"
    variables.write_text("")
    for number, (block, (wanted, retried)) in enumerate(zip(substituted, expected, strict=True), start=1):
        # One shell session across blocks, as in a terminal: variables of a block reach the next.
        script = f"set -eo pipefail\nset -a\nsource {variables}\n{block}\nexport -p > {variables}\n"
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=tmp_path,
                env=stack.client_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            compact = re.sub(r"\s+", "", done.stdout)
            if (done.returncode == 0 and wanted.replace(" ", "") in compact) or not retried:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done.returncode == 0, f"block {number} failed:\n{block}\n{done.stdout}\n{done.stderr}"
        assert wanted.replace(" ", "") in compact, f"block {number}:\n{block}\n{done.stdout}\n{done.stderr}"
    # The operator's command is on record with its author, and the device's reading is stored.
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    commands = httpx.get(f"{stack.api}/api/v1/devices/kitchen-1/commands", headers=headers, timeout=10).json()
    (command,) = commands["items"]
    assert command["source"] == "operator:bootstrap-admin", command
    assert command["args"] == {"setpoint_c": 22.5} and command["completed_at"]


def test_demo_creates_example_rules_and_sends_operator_commands_through_the_api(stack: RunningStack) -> None:
    from iotfleet.stack.demo import DEMO_RULES

    done = run(
        stack.env,
        "demo",
        "--devices",
        "8",
        "--duration",
        "12",
        "--interval",
        "1s",
        "--commands-rate",
        "3",
        "--quiet",
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "using the stack already running" in done.stderr  # and leaves it running
    assert f"Dashboard: http://127.0.0.1:{stack.api_port}/" in done.stdout
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    rules = httpx.get(f"{stack.api}/api/v1/rules", params={"limit": 100}, headers=headers, timeout=10).json()
    names = {rule["name"] for rule in rules["items"] if rule["enabled"]}
    assert {rule["name"] for rule in DEMO_RULES} <= names
    # Every command the demo sent is an operator's, on record with its author and lifecycle.
    commands = httpx.get(f"{stack.api}/api/v1/commands", params={"limit": 1000}, headers=headers, timeout=10)
    demo_commands = [c for c in commands.json()["items"] if c["source"] == "operator:demo-operator"]
    sent = int(re.search(r"(\d+) operator command\(s\) sent through the API", done.stderr).group(1))  # type: ignore[union-attr]
    assert sent >= 10 and len(demo_commands) == sent, (sent, len(demo_commands))
    assert any(c["status"] == "succeeded" and c["completed_at"] for c in demo_commands), demo_commands
    # The simulator itself published no command over MQTT: its devices received only the operator's
    # (and the example rules'), each of which the registry tracks.
    report_path = re.search(r"report written to (\S+)", done.stderr)
    assert report_path is not None
    report = json.loads(Path(report_path.group(1)).read_text())
    tracked = httpx.get(f"{stack.api}/api/v1/commands", params={"limit": 1000}, headers=headers, timeout=10)
    assert report["commands"]["received"] <= len(tracked.json()["items"])
    # A second demo on the same stack keeps the rules (no duplicates, no failure).
    again = run(stack.env, "demo", "--devices", "8", "--duration", "2", "--quiet", timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_dashboard_iso_dates_gaps_and_friendly_not_found_pages(stack: RunningStack) -> None:
    import asyncio

    from playwright.sync_api import expect, sync_playwright

    from iotfleet.influx import InfluxClient, encode_point
    from iotfleet.settings import InfluxSettings

    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    created = httpx.post(
        f"{stack.api}/api/v1/devices",
        json={"id": "gappy-1", "type": "thermostat"},
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    # 20 readings 10 s apart, 10 minutes without any, 20 more: the chart must break, not bridge.
    now_ms = int(time.time() * 1000)
    first = now_ms - 20 * 60_000
    times = [first + i * 10_000 for i in range(20)] + [
        first + 200_000 + 600_000 + i * 10_000 for i in range(20)
    ]
    fields = {"temperature_c": 21.0, "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "auto"}
    lines = [encode_point("thermostat", {"device_id": "gappy-1"}, fields, t) for t in times]

    async def write() -> None:
        settings = InfluxSettings(url=stack.env["IOTFLEET_INFLUX__URL"], database="iotfleet")
        async with InfluxClient(settings) as client:
            await client.write("\n".join(lines))

    asyncio.run(write())

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{stack.api}/signin")
            page.fill("#api-key", stack.admin_key)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{stack.api}/")  # signed in (the sign-in page itself is "ready" too)
            page.wait_for_selector("body[data-state=ready]")

            page.goto(f"{stack.api}/devices/gappy-1")
            chart = page.locator("figure.chart[data-field=temperature_c]")
            expect(chart).to_have_attribute("data-points", "40", timeout=20_000)
            assert int(chart.get_attribute("data-gaps") or "0") >= 1
            # Dates in ISO order (YYYY-MM-DD HH:MM:SS), never 01/12/2026 vs 12/01/2026.
            reported = page.locator("#latest-table tbody tr").first.locator("td").nth(1)
            iso = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
            expect(reported).to_have_attribute("title", iso, timeout=10_000)
            assert not re.search(r"\d{1,2}/\d{1,2}/\d{2,4}", page.locator("main").inner_text())

            page.goto(f"{stack.api}/devices/no-such-device")
            expect(page.get_by_role("heading", name="Device not found")).to_be_visible(timeout=10_000)
            expect(page.get_by_role("link", name="Search the device list")).to_have_attribute(
                "href", "/devices?q=no-such-device"
            )

            response = page.goto(f"{stack.api}/no/such/page")
            assert response is not None and response.status == 404
            expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
            expect(page.get_by_role("link", name="device list")).to_have_attribute("href", "/devices")
        finally:
            browser.close()
    # Machines still get the API's problem+json for unknown API paths.
    api_404 = httpx.get(f"{stack.api}/api/v1/no-such-thing", headers=headers, timeout=10)
    assert api_404.status_code == 404 and api_404.headers["content-type"].startswith(
        "application/problem+json"
    )


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_dashboard_manages_devices_and_disables_what_a_role_cannot_do(stack: RunningStack) -> None:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    admin = {"Authorization": f"Bearer {stack.admin_key}"}
    keys = {}
    for role in ("viewer", "operator"):
        made = httpx.post(
            f"{stack.api}/api/v1/api-keys",
            json={"name": f"dash {role}", "role": role},
            headers=admin,
            timeout=10,
        )
        assert made.status_code == 201, made.text
        keys[role] = made.json()["key"]
    me = httpx.get(f"{stack.api}/api/v1/api-keys/me", headers={"Authorization": f"Bearer {keys['viewer']}"})
    assert me.status_code == 200 and me.json()["role"] == "viewer" and me.json()["name"] == "dash viewer"
    assert "key" not in me.json()
    httpx.post(f"{stack.api}/api/v1/devices", json={"id": "dash-seen-1", "type": "thermostat"}, headers=admin)

    def signed_in(browser: Browser, key: str) -> Page:
        page = browser.new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of rotate and delete
        page.goto(f"{stack.api}/signin")
        page.fill("#api-key", key)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{stack.api}/")  # signed in (the sign-in page itself is "ready" too)
        page.wait_for_selector("body[data-state=ready]")
        return page

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = signed_in(browser, stack.admin_key)
            # Provision from the device list: the credentials are shown once.
            page.goto(f"{stack.api}/devices")
            page.wait_for_selector("body[data-state=ready]")
            page.fill("#p-id", "dash-new-1")
            page.select_option("#p-type", "smart_plug")
            page.fill("#p-tags", "site=lyon, floor=2")
            page.click("#provision-form button[type=submit]")
            expect(page.locator("#provision-result code.secret")).to_have_text(re.compile(r".{16,}"))
            device = httpx.get(f"{stack.api}/api/v1/devices/dash-new-1", headers=admin, timeout=10).json()
            assert device["type"] == "smart_plug" and device["tags"] == {"site": "lyon", "floor": "2"}

            # Disable, enable, rotate, delete from the device page.
            page.goto(f"{stack.api}/devices/dash-new-1")
            page.wait_for_selector("body[data-state=ready]")
            page.click("#device-toggle")
            expect(page.locator("#device-toggle")).to_have_text("Enable")
            assert not httpx.get(f"{stack.api}/api/v1/devices/dash-new-1", headers=admin).json()["enabled"]
            page.click("#device-toggle")
            expect(page.locator("#device-toggle")).to_have_text("Disable")
            before = httpx.get(f"{stack.api}/api/v1/devices/dash-new-1", headers=admin).json()
            page.click("#device-rotate")
            expect(page.locator("#manage-result code.secret")).to_have_text(re.compile(r".{16,}"))
            after = httpx.get(f"{stack.api}/api/v1/devices/dash-new-1", headers=admin).json()
            assert after["enabled"] and after["credentials_rotated_at"] != before["credentials_rotated_at"]
            page.click("#device-delete")
            page.wait_for_url(re.compile(r"/devices\?deleted=dash-new-1$"))
            expect(page.locator("#devices-note")).to_contain_text("dash-new-1 was deleted")
            assert httpx.get(f"{stack.api}/api/v1/devices/dash-new-1", headers=admin).status_code == 404

            # A viewer is not offered what it may not do; an operator may send commands only.
            viewer = signed_in(browser, keys["viewer"])
            viewer.goto(f"{stack.api}/devices/dash-seen-1")
            viewer.wait_for_selector("body[data-state=ready]")
            for control in ("#command-send", "#device-toggle", "#device-rotate", "#device-delete"):
                expect(viewer.locator(control)).to_be_disabled()
            assert "admin" in (viewer.get_attribute("#device-delete", "title") or "")
            viewer.goto(f"{stack.api}/rules")
            viewer.wait_for_selector("body[data-state=ready]")
            expect(viewer.locator("#rule-form button[type=submit]")).to_be_disabled()
            viewer.goto(f"{stack.api}/devices")
            viewer.wait_for_selector("body[data-state=ready]")
            expect(viewer.locator("#provision-form button[type=submit]")).to_be_disabled()

            operator = signed_in(browser, keys["operator"])
            operator.goto(f"{stack.api}/devices/dash-seen-1")
            operator.wait_for_selector("body[data-state=ready]")
            expect(operator.locator("#device-delete")).to_be_disabled()
            expect(operator.locator("#command-send")).to_be_enabled()
        finally:
            browser.close()
