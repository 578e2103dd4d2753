"""Jobs against the real stack: the registry as a process (kill -9 is one test), mosquitto, acking devices.

One registry and 40 provisioned thermostats for the module: 30 that answer
``succeeded`` (tag group=main) and 10 that answer ``failed`` (group=bad). Each
test runs its own job and judges only the command ids of that job's executions.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotfleet.stack import probes
from tests.harness import Broker
from tests.jobs_support import JobDevice
from tests.registry_harness import RegistryProcess

pytestmark = pytest.mark.integration

MAIN, BAD = 30, 10


@dataclass
class Fleet:
    registry: RegistryProcess
    http: httpx.Client
    viewer: httpx.Client
    devices: dict[str, JobDevice]
    main: list[str]
    bad: list[str]

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

    def wait_status(self, job_id: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
        probes.wait_until(lambda: self.job(job_id)["status"] == status, timeout=timeout, what=f"job {status}")
        return self.job(job_id)

    def executions(self, job_id: str, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            resp = self.http.get(f"/api/v1/jobs/{job_id}/executions", params=query)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items


def command(mode: str = "cool") -> dict[str, Any]:
    return {"command": {"name": "set_mode", "args": {"mode": mode}}}


@pytest.fixture(scope="module")
def fleet(session_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    state_dir: Path = tmp_path_factory.mktemp("jobs") / "state"
    registry = RegistryProcess(
        session_broker,
        state_dir,
        extra_env={"IOTFLEET_JOBS__TICK_S": "0.1", "IOTFLEET_RULES__TRACKER_SWEEP_S": "0.2"},
    ).start()
    http = registry.client()
    devices: dict[str, JobDevice] = {}
    try:
        suffix = secrets.token_hex(3)
        specs = [(f"jm{suffix}-{i:02d}", "main") for i in range(MAIN)]
        specs += [(f"jb{suffix}-{i:02d}", "bad") for i in range(BAD)]
        body = {"devices": [{"id": d, "type": "thermostat", "tags": {"group": g}} for d, g in specs]}
        resp = http.post("/api/v1/devices/bulk", json=body)
        assert resp.status_code == 201, resp.text
        for item in resp.json()["devices"]:
            group = item["tags"]["group"]
            device = JobDevice(
                session_broker,
                item["id"],
                item["credentials"]["password"],
                answer="succeeded" if group == "main" else "failed",
            )
            devices[item["id"]] = device.connect()
        key = http.post("/api/v1/api-keys", json={"name": f"viewer-{suffix}", "role": "viewer"}).json()["key"]
        viewer = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        yield Fleet(
            registry,
            http,
            viewer,
            devices,
            sorted(d for d, g in specs if g == "main"),
            sorted(d for d, g in specs if g == "bad"),
        )
        viewer.close()
    finally:
        for device in devices.values():
            device.disconnect()
        http.close()
        registry.stop()


def _summary(fleet: Fleet, job_id: str) -> Any:
    """The frozen counts, read from the registry's database (the API serves them the same either way)."""
    with sqlite3.connect(fleet.registry.state_dir / "registry.db") as db:
        [(raw,)] = db.execute("SELECT summary FROM jobs WHERE id = ?", (job_id,)).fetchall()
    return json.loads(raw) if raw is not None else None


def _command_ids(fleet: Fleet, job_id: str) -> dict[str, str]:
    return {e["device_id"]: e["command_id"] for e in fleet.executions(job_id) if e["command_id"]}


def test_job_to_30_devices_all_succeed_with_roles_paging_and_problems(fleet: Fleet) -> None:
    # Validation is the single-command check: 422 problem naming the argument.
    bad = fleet.http.post(
        "/api/v1/jobs", json={"action": command("warp"), "target": {"tags": {"group": "main"}}}
    )
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["field"].startswith("body.action.command.args")
    none = fleet.http.post("/api/v1/jobs", json={"action": command(), "target": {"tags": {"group": "none"}}})
    assert none.status_code == 422, none.text
    kind = fleet.http.post(
        "/api/v1/jobs", json={"action": {"reboot": {}}, "target": {"device_type": "thermostat"}}
    )
    assert kind.status_code == 422 and "exactly one key" in kind.text
    viewer_create = fleet.viewer.post("/api/v1/jobs", json={"action": command(), "target": {"q": "x"}})
    assert viewer_create.status_code == 403
    assert fleet.http.get("/api/v1/jobs/nope").status_code == 404

    start = datetime.now(UTC) + timedelta(seconds=1)
    job = fleet.create(
        {
            "name": "cool everywhere",
            "action": command(),
            "target": {"device_type": "thermostat", "tags": {"group": "main"}},
            "start_at": start.isoformat(),
        }
    )
    assert job["status"] == "scheduled" and job["total"] == MAIN and job["counts"]["queued"] == MAIN
    done = fleet.wait_status(job["id"], "completed")
    assert done["counts"]["succeeded"] == MAIN and done["released"] == MAIN
    assert datetime.fromisoformat(done["started_at"]) >= start

    # Viewers read; executions page by device id and filter by state; each is a tracked command.
    assert fleet.viewer.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    first = fleet.viewer.get(f"/api/v1/jobs/{job['id']}/executions", params={"limit": 7}).json()
    assert len(first["items"]) == 7 and first["next_cursor"]
    executions = fleet.executions(job["id"], status="succeeded", limit=7)
    assert [e["device_id"] for e in executions] == fleet.main
    assert fleet.executions(job["id"], status="failed") == []
    cmd = fleet.http.get(f"/api/v1/commands/{executions[0]['command_id']}").json()
    assert (
        cmd["status"] == "succeeded"
        and cmd["source"] == f"job:{job['id']}"
        and cmd["args"] == {"mode": "cool"}
    )
    ids = _command_ids(fleet, job["id"])
    for device_id in fleet.main:
        assert fleet.devices[device_id].ids(set(ids.values())) == [ids[device_id]]
    # Once nothing can change, the counts are frozen with the job (lists stop counting executions).
    probes.wait_until(lambda: _summary(fleet, job["id"]) is not None, timeout=10, what="counts frozen")
    assert _summary(fleet, job["id"]) == {"counts": done["counts"], "released": MAIN}
    listed = fleet.viewer.get("/api/v1/jobs", params={"status": "completed"}).json()["items"]
    assert [j["counts"] for j in listed if j["id"] == job["id"]] == [done["counts"]]


def test_rollout_rate_limit_and_growth_are_respected(fleet: Fleet) -> None:
    targets = fleet.main[:8]
    job = fleet.create(
        {
            "action": command("heat"),
            "target": {"device_ids": targets},
            "rollout": {"max_per_minute": 120, "increase_by_factor": 2, "every_n_succeeded": 4},
        }
    )
    assert job["current_rate"] == 120
    done = fleet.wait_status(job["id"], "completed")
    assert done["counts"]["succeeded"] == 8 and done["current_rate"] == 480
    released = sorted(
        datetime.fromisoformat(e["released_at"]).timestamp() for e in fleet.executions(job["id"])
    )
    # 120/min = one every 0.5 s until 4 succeeded: the first four span ≥ 1.5 s less the DB's commit jitter,
    # and never 3 within 0.4 s (the bucket holds one tick's worth plus one: no bursts).
    assert released[3] - released[0] >= 1.0, released
    assert all(b - a >= 0.4 for a, b in zip(released, released[2:4], strict=False)), released
    # Then 240/min (and 480 once all 8 succeeded): the devices saw the pacing too.
    ids = set(_command_ids(fleet, job["id"]).values())
    times = sorted(t for d in targets for t in fleet.devices[d].times(ids))
    assert len(times) == 8 and times[-1] - times[0] >= 1.5, times


def test_abort_rule_stops_the_rollout(fleet: Fleet) -> None:
    job = fleet.create(
        {
            "action": command(),
            "target": {"tags": {"group": "bad"}},
            "rollout": {"max_per_minute": 300},
            "abort": {"failure_pct": 5, "min_finished": 3},
        }
    )
    done = fleet.wait_status(job["id"], "aborted")
    counts = done["counts"]
    assert counts["failed"] >= 3 and counts["canceled"] >= 1, counts
    assert done["released"] + counts["canceled"] == BAD
    assert "failed" in done["detail"]
    canceled = fleet.executions(job["id"], status="canceled")
    assert len(canceled) == counts["canceled"] and all(e["command_id"] is None for e in canceled)


def test_cancel_stops_the_rollout(fleet: Fleet) -> None:
    job = fleet.create(
        {"action": command("auto"), "target": {"tags": {"group": "main"}}, "rollout": {"max_per_minute": 60}}
    )
    probes.wait_until(lambda: fleet.job(job["id"])["released"] >= 1, timeout=10, what="first release")
    assert fleet.viewer.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 403
    resp = fleet.http.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200, resp.text
    canceled = resp.json()
    assert canceled["status"] == "canceled"
    released = canceled["released"]
    assert 1 <= released <= 3 and canceled["counts"]["canceled"] == MAIN - released
    again = fleet.http.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["job_status"] == "canceled"
    # What was released still finishes; nothing else is ever sent.
    probes.wait_until(
        lambda: fleet.job(job["id"])["counts"]["succeeded"] == released, timeout=10, what="released finished"
    )
    ids = set(_command_ids(fleet, job["id"]).values())
    assert len(ids) == released
    assert sum(len(fleet.devices[d].ids(ids)) for d in fleet.main) == released


def test_offline_device_gets_its_execution_on_reconnect(fleet: Fleet) -> None:
    targets = fleet.main[-3:]
    offline = fleet.devices[targets[0]]
    offline.disconnect()
    try:
        job = fleet.create(
            {
                "action": command("off"),
                "target": {"device_ids": targets},
                "deadline": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
            }
        )
        probes.wait_until(
            lambda: fleet.job(job["id"])["counts"]["succeeded"] == 2, timeout=10, what="online ones succeeded"
        )
        probes.wait_until(
            lambda: fleet.job(job["id"])["counts"]["sent"] == 1, timeout=10, what="offline one sent"
        )
        assert fleet.job(job["id"])["status"] == "in_progress"
    finally:
        offline.connect()
    done = fleet.wait_status(job["id"], "completed")
    assert done["counts"]["succeeded"] == 3
    ids = _command_ids(fleet, job["id"])
    assert offline.ids(set(ids.values())) == [ids[targets[0]]]


def test_per_device_timeout_fails_a_device_that_took_it_and_never_answered(fleet: Fleet) -> None:
    device = fleet.devices[fleet.main[0]]
    device.answer = "received"  # takes the command, then goes silent
    try:
        job = fleet.create(
            {"action": command("heat"), "target": {"device_ids": [device.device_id]}, "timeout_s": 1}
        )
        done = fleet.wait_status(job["id"], "completed", timeout=15)
    finally:
        device.answer = "succeeded"
    assert done["counts"]["failed"] == 1, done["counts"]
    [execution] = fleet.executions(job["id"])
    assert execution["status"] == "failed" and "timed out" in execution["detail"]


def test_registry_kill9_mid_job_resumes_and_each_device_gets_one_command_id(fleet: Fleet) -> None:
    job = fleet.create(
        {"action": command("auto"), "target": {"tags": {"group": "main"}}, "rollout": {"max_per_minute": 600}}
    )
    probes.wait_until(lambda: fleet.job(job["id"])["released"] >= 8, timeout=15, what="8 released")
    fleet.registry.kill()
    fleet.registry.start()
    done = fleet.wait_status(job["id"], "completed", timeout=30)
    assert done["counts"]["succeeded"] == MAIN and done["released"] == MAIN
    ids = _command_ids(fleet, job["id"])
    assert len(set(ids.values())) == MAIN
    for device_id in fleet.main:
        got = fleet.devices[device_id].ids(set(ids.values()))
        # Once, or again with the same id (republished after the crash): never another id.
        assert got and set(got) == {ids[device_id]}, (device_id, got)


# --- the dashboard in a real browser (Debian's Chromium through Playwright) ---------------------

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def test_dashboard_creates_a_job_shows_progress_and_failures_and_cancels(fleet: Fleet) -> None:
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
            # Signed in as the sign-in page would leave it: the key in sessionStorage, never in a URL.
            context.add_init_script(f"sessionStorage.setItem('iotfleet.apiKey', {key!r})")
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("console", console.on_console)
            page.on("pageerror", console.on_page_error)
            page.goto(fleet.registry.url + "/jobs?type=thermostat")
            page.wait_for_selector("body[data-state=ready]")

            # A job from the type's command form: the failing group, so the failures list fills.
            page.get_by_label("Command", exact=True).select_option("set_mode")
            page.get_by_label("Mode").select_option("heat")
            page.get_by_label("Only devices tagged").fill("group=bad")
            page.get_by_label("Name (optional)").fill("dashboard heat")
            page.get_by_role("button", name="Create job").click()
            page.wait_for_selector("#job-form[data-last-job-id]")
            job_id = page.get_attribute("#job-form", "data-last-job-id")
            row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
            expect(row).to_have_attribute("data-status", "completed", timeout=20_000)
            expect(row.locator(".jobbar")).to_have_attribute(
                "aria-label", re.compile(f"^0 succeeded, {BAD} failed")
            )
            row.get_by_role("button", name="Failures").click()
            expect(page.locator("#failures-table tbody tr")).to_have_count(BAD)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "jobs.png"), full_page=True)

            # A slow job, canceled from its row.
            page.get_by_label("Only devices tagged").fill("group=main")
            page.get_by_label("Max devices per minute").fill("1")
            page.get_by_label("Name (optional)").fill("dashboard slow")
            page.get_by_role("button", name="Create job").click()
            expect(page.locator("#job-form")).not_to_have_attribute("data-last-job-id", job_id or "")
            slow_id = page.get_attribute("#job-form", "data-last-job-id")
            slow = page.locator(f"#jobs-table tr[data-job-id='{slow_id}']")
            slow.get_by_role("button", name="Cancel").click()
            expect(slow).to_have_attribute("data-status", "canceled")
            assert fleet.job(slow_id or "")["counts"]["canceled"] >= MAIN - 1
            context.close()
        finally:
            browser.close()
    console.assert_clean()
