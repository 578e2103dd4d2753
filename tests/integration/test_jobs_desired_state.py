"""Desired-state jobs against the real stack: the registry as a process, mosquitto, devices that converge.

One registry and 50 provisioned thermostats (tag site=paris) per backend (SQLite, then
PostgreSQL: row locks, the correlated timeout UPDATE). Each
device subscribes to its retained ``state/delta``, applies it and reports the
result on ``state/reported``; an execution succeeds when the registry records a
report holding every field the job sets. Each test sets its own ``setpoint_c``
so it judges only its own change.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotfleet.stack import probes
from tests.harness import Broker
from tests.jobs_support import StateDevice
from tests.registry_harness import Postgres, RegistryProcess, postgres  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

N = 50


@dataclass
class Fleet:
    registry: RegistryProcess
    http: httpx.Client
    devices: dict[str, StateDevice]

    @property
    def ids(self) -> list[str]:
        return sorted(self.devices)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post("/api/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def wait_status(self, job_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        probes.wait_until(lambda: self.job(job_id)["status"] == status, timeout=timeout, what=f"job {status}")
        return self.job(job_id)

    def executions(self, job_id: str, **params: Any) -> list[dict[str, Any]]:
        resp = self.http.get(f"/api/v1/jobs/{job_id}/executions", params={"limit": 1000, **params})
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["items"]
        return items

    def state(self, device_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v1/devices/{device_id}/state")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def desired_versions(self) -> dict[str, int]:
        return {d: int(self.state(d)["versions"]["desired"]) for d in self.ids}


def set_state(**fields: Any) -> dict[str, Any]:
    return {"desired_state": {"set": fields}}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fleet(
    request: pytest.FixtureRequest, session_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    state_dir: Path = tmp_path_factory.mktemp("jobs-state") / "state"
    database_url = None
    if request.param == "postgres":
        server: Postgres = request.getfixturevalue("postgres")
        database_url = server.create_database()
    registry = RegistryProcess(
        session_broker, state_dir, database_url=database_url, extra_env={"IOTFLEET_JOBS__TICK_S": "0.1"}
    ).start()
    http = registry.client()
    devices: dict[str, StateDevice] = {}
    try:
        suffix = secrets.token_hex(3)
        body = {
            "devices": [
                {"id": f"js{suffix}-{i:02d}", "type": "thermostat", "tags": {"site": "paris"}}
                for i in range(N)
            ]
        }
        resp = http.post("/api/v1/devices/bulk", json=body)
        assert resp.status_code == 201, resp.text
        for item in resp.json()["devices"]:
            devices[item["id"]] = StateDevice(
                session_broker, item["id"], item["credentials"]["password"]
            ).connect()
        yield Fleet(registry, http, devices)
    finally:
        for device in devices.values():
            device.disconnect()
        http.close()
        registry.stop()


def test_validation_is_the_state_model_with_the_field_named(fleet: Fleet) -> None:
    target = {"tags": {"site": "paris"}}
    bad = fleet.http.post("/api/v1/jobs", json={"action": set_state(mode="warp"), "target": target})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in bad.json()["errors"]] == ["body.action.desired_state.set.mode"]
    unknown = fleet.http.post("/api/v1/jobs", json={"action": set_state(colour="red"), "target": target})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "body.action.desired_state.set.colour"
    out_of_range = fleet.http.post(
        "/api/v1/jobs", json={"action": set_state(setpoint_c=99), "target": target}
    )
    assert out_of_range.status_code == 422 and "setpoint_c" in out_of_range.json()["errors"][0]["field"]
    null = fleet.http.post("/api/v1/jobs", json={"action": set_state(mode=None), "target": target})
    assert null.status_code == 422 and "cannot remove" in null.json()["detail"]
    empty = fleet.http.post("/api/v1/jobs", json={"action": set_state(), "target": target})
    assert empty.status_code == 422
    both = fleet.http.post(
        "/api/v1/jobs",
        json={"action": {**set_state(mode="eco"), "command": {"name": "reboot"}}, "target": target},
    )
    assert both.status_code == 422 and "command or desired_state" in both.text


def test_job_to_50_devices_some_offline_all_succeed_and_a_repeat_succeeds_at_once(fleet: Fleet) -> None:
    offline = [fleet.devices[d] for d in fleet.ids[:10]]
    before = fleet.desired_versions()
    for device in offline:
        device.disconnect()
    try:
        job = fleet.create(
            {
                "name": "eco for paris",
                "action": set_state(mode="eco", setpoint_c=19.5),
                "target": {"device_type": "thermostat", "tags": {"site": "paris"}},
                "rollout": {"max_per_minute": 6000},
                "deadline": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
            }
        )
        assert job["total"] == N and job["action"] == set_state(mode="eco", setpoint_c=19.5)
        probes.wait_until(
            lambda: fleet.job(job["id"])["counts"]["succeeded"] == N - 10, timeout=30, what="online ones"
        )
        waiting = fleet.job(job["id"])
        # Released and waiting for the offline ones: shown in flight ("sent"), the job still running.
        assert waiting["status"] == "in_progress" and waiting["counts"]["sent"] == 10, waiting
    finally:
        for device in offline:
            device.connect()  # the retained delta arrives with the subscription
    done = fleet.wait_status(job["id"], "completed")
    assert done["counts"]["succeeded"] == N and done["released"] == N, done["counts"]
    after = fleet.desired_versions()
    for device_id, device in fleet.devices.items():
        state = fleet.state(device_id)
        assert state["reported"]["mode"] == "eco" and state["reported"]["setpoint_c"] == 19.5
        assert state["delta"] == {} and state["desired_source"] == f"job:{job['id']}"
        assert after[device_id] == before[device_id] + 1  # one change, one version
        assert device.state["setpoint_c"] == 19.5

    # The same fields again: every device already reports them, so every execution succeeds at once
    # and no desired version moves.
    again = fleet.create({"action": set_state(setpoint_c=19.5), "target": {"tags": {"site": "paris"}}})
    done = fleet.wait_status(again["id"], "completed")
    assert done["counts"]["succeeded"] == N
    assert {e["detail"] for e in fleet.executions(again["id"])} == {"the reported state already held it"}
    assert fleet.desired_versions() == after


def test_silent_device_times_out_and_deadline_expires_the_offline_one(fleet: Fleet) -> None:
    silent, gone = fleet.devices[fleet.ids[0]], fleet.devices[fleet.ids[1]]
    silent.obey = False  # takes its delta, never reports
    gone.disconnect()
    try:
        job = fleet.create(
            {
                "action": set_state(setpoint_c=20.5),
                "target": {"device_ids": [silent.device_id, gone.device_id, fleet.ids[2]]},
                "timeout_s": 1,
                "deadline": (datetime.now(UTC) + timedelta(seconds=6)).isoformat(),
            }
        )
        done = fleet.wait_status(job["id"], "completed", timeout=20)
    finally:
        silent.obey = True
        gone.connect()
    assert done["counts"] == {**done["counts"], "succeeded": 1, "failed": 1, "expired": 1}, done["counts"]
    by_device = {e["device_id"]: e for e in fleet.executions(job["id"])}
    assert "timed out" in by_device[silent.device_id]["detail"]
    assert "deadline" in by_device[gone.device_id]["detail"]


def test_cancel_stops_releasing_and_the_state_already_set_stays(fleet: Fleet) -> None:
    job = fleet.create(
        {
            "action": set_state(setpoint_c=21.5),
            "target": {"tags": {"site": "paris"}},
            "rollout": {"max_per_minute": 60},
        }
    )
    probes.wait_until(lambda: fleet.job(job["id"])["released"] >= 1, timeout=10, what="first release")
    canceled = fleet.http.post(f"/api/v1/jobs/{job['id']}/cancel").json()
    assert canceled["status"] == "canceled"
    released = canceled["released"]
    assert 1 <= released <= 3 and canceled["counts"]["canceled"] == N - released
    probes.wait_until(
        lambda: fleet.job(job["id"])["counts"]["succeeded"] == released, timeout=10, what="released converged"
    )
    changed = [d for d in fleet.ids if fleet.state(d)["desired"].get("setpoint_c") == 21.5]
    assert len(changed) == released  # not rolled back, and nobody else got it


def test_registry_kill9_mid_job_loses_nothing_and_sets_nothing_twice(fleet: Fleet) -> None:
    before = fleet.desired_versions()
    marks = {d: len(device.versions) for d, device in fleet.devices.items()}
    job = fleet.create(
        {
            "action": set_state(setpoint_c=22.5),
            "target": {"tags": {"site": "paris"}},
            "rollout": {"max_per_minute": 600},
        }
    )
    probes.wait_until(lambda: fleet.job(job["id"])["released"] >= 8, timeout=15, what="8 released")
    fleet.registry.kill()
    fleet.registry.start()
    done = fleet.wait_status(job["id"], "completed", timeout=40)
    assert done["counts"]["succeeded"] == N and done["released"] == N, done["counts"]
    after = fleet.desired_versions()
    for device_id, device in fleet.devices.items():
        assert after[device_id] == before[device_id] + 1, device_id  # set exactly once
        got = set(device.versions[marks[device_id] :])
        # The delta of that one version, possibly republished after the crash: never another version.
        assert got == {after[device_id]}, (device_id, got)
        assert fleet.state(device_id)["reported"]["setpoint_c"] == 22.5


# --- the dashboard in a real browser (Debian's Chromium through Playwright) ---------------------

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def test_dashboard_creates_a_desired_state_job_and_shows_it_reach_100_percent(fleet: Fleet) -> None:
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`)")
    from playwright.sync_api import expect, sync_playwright

    from tests.integration.test_dashboard import CHROMIUM_ARGS, Console

    console = Console()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 860}, locale="en-GB")
            key = fleet.http.headers["Authorization"].removeprefix("Bearer ")
            context.add_init_script(f"sessionStorage.setItem('iotfleet.apiKey', {key!r})")
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("console", console.on_console)
            page.on("pageerror", console.on_page_error)
            page.goto(fleet.registry.url + "/jobs?type=thermostat")
            page.wait_for_selector("body[data-state=ready]")

            # The type's state model gives the fields; only the chosen action's inputs are in the form.
            page.get_by_label("Action", exact=True).select_option("desired_state")
            expect(page.get_by_label("Command", exact=True)).to_be_hidden()
            page.get_by_label("Desired mode").select_option(label="eco")
            page.get_by_label("Desired setpoint_c").fill("23.5")
            page.get_by_label("Only devices tagged").fill("site=paris")
            page.get_by_label("Name (optional)").fill("dashboard eco")
            page.get_by_role("button", name="Create job").click()
            page.wait_for_selector("#job-form[data-last-job-id]")
            job_id = page.get_attribute("#job-form", "data-last-job-id") or ""
            row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
            expect(row).to_contain_text('desired state {"setpoint_c":23.5,"mode":"eco"}')
            expect(row).to_have_attribute("data-status", "completed", timeout=30_000)
            expect(row.locator(".jobbar")).to_have_attribute(
                "aria-label", re.compile(f"^{N} succeeded, 0 failed")
            )
            expect(row).to_contain_text(f"{N} / {N} finished")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "jobs-desired-state.png"), full_page=True)
            context.close()
        finally:
            browser.close()
    console.assert_clean()
    job = fleet.job(job_id)
    assert job["action"] == set_state(mode="eco", setpoint_c=23.5) and job["counts"]["succeeded"] == N
    assert all(fleet.state(d)["reported"]["setpoint_c"] == 23.5 for d in fleet.ids)
