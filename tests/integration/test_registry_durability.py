"""Kill -9 and restart loses nothing; reconcile finds and repairs drift; the registry starts before the broker."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from iotfleet import broker_files
from iotfleet.stack import probes
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    RegistryProcess,
    connect_device,
    database_url,
    postgres,
    registry_settings,
    running_registry,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def registry_process(
    fresh_broker: Broker,
    tmp_path: Path,
    database_url: str,  # noqa: F811  (SQLite, then PostgreSQL)
    request: pytest.FixtureRequest,
) -> Iterator[RegistryProcess]:
    process = RegistryProcess(fresh_broker, tmp_path / "registry", database_url)
    yield process
    process.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print("----- registry log -----\n" + process.log_tail())


def _reconcile_report(http: httpx.Client) -> dict[str, Any]:
    def done() -> bool:
        return http.get("/api/v1/reconcile").status_code == 200

    probes.wait_until(done, timeout=15, what="reconcile report")
    report: dict[str, Any] = http.get("/api/v1/reconcile").json()
    return report


def test_kill_9_and_restart_loses_nothing(
    registry_process: RegistryProcess, fresh_broker: Broker, uid: Callable[[str], str]
) -> None:
    registry_process.start()
    with registry_process.client() as http:
        created = http.post(
            "/api/v1/devices/bulk",
            json={"devices": [{"id": f"{uid('dur')}-{i}", "type": "air_quality", "tags": {"n": str(i)}}
                              for i in range(40)]},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        devices = created.json()["devices"]
        key = http.post("/api/v1/api-keys", json={"name": "survivor", "role": "viewer"}).json()
        assert http.post(f"/api/v1/devices/{devices[1]['id']}/disable").status_code == 200
        rotated = http.post(f"/api/v1/devices/{devices[2]['id']}/rotate-credentials").json()
        assert http.delete(f"/api/v1/devices/{devices[3]['id']}").status_code == 204
        before = http.get("/api/v1/devices", params={"limit": 1000}).json()["items"]

    registry_process.kill()
    registry_process.start()

    with registry_process.client() as http:
        after = http.get("/api/v1/devices", params={"limit": 1000}).json()["items"]
        assert [(d["id"], d["enabled"], d["tags"]) for d in after] == [
            (d["id"], d["enabled"], d["tags"]) for d in before
        ]
        assert len(after) == 39
        with httpx.Client(
            base_url=registry_process.url, headers={"Authorization": f"Bearer {key['key']}"}
        ) as viewer:
            assert viewer.get("/api/v1/devices").status_code == 200
        report = _reconcile_report(http)
        assert report["ok"] is True
        assert report["drift_count"] == 0, report["drift"]
        assert report["devices_checked"] == 39
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["reconcile"]["drift_count"] == 0

    # Credentials survived: original, rotated; the disabled one is still refused.
    ok = connect_device(fresh_broker, devices[0]["id"], devices[0]["credentials"]["password"])
    assert not ok.connack.is_failure  # type: ignore[union-attr]
    ok.close()
    new = connect_device(fresh_broker, devices[2]["id"], rotated["credentials"]["password"])
    assert not new.connack.is_failure  # type: ignore[union-attr]
    new.close()
    for device_id, password in [
        (devices[1]["id"], devices[1]["credentials"]["password"]),
        (devices[2]["id"], devices[2]["credentials"]["password"]),
        (devices[3]["id"], devices[3]["credentials"]["password"]),
    ]:
        refused = connect_device(fresh_broker, device_id, password)
        assert refused.connack.value == 135, device_id  # type: ignore[union-attr]
        refused.close()


def _agent(broker: Broker, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """Tamper with the broker's device file behind the registry's back, through its agent."""
    with httpx.Client(
        base_url=f"http://{broker.host}:{broker.agent_port}",
        headers={"Authorization": f"Bearer {broker.agent_token}"},
        timeout=30,
    ) as http:
        resp = http.request(method, path, json=body)
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result


def _broker_entries(broker: Broker) -> dict[str, str]:
    entries: dict[str, str] = _agent(broker, "GET", "/v1/devices")["devices"]
    return entries


async def test_reconcile_repairs_every_kind_of_drift(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    ids = [uid(f"drift{i}") for i in range(5)]
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        resp = await api.http.post(
            "/api/v1/devices/bulk", json={"devices": [{"id": i, "type": "thermostat"} for i in ids]}
        )
        assert resp.status_code == 201
        passwords = {d["id"]: d["credentials"]["password"] for d in resp.json()["devices"]}
        assert (await api.http.post(f"/api/v1/devices/{ids[2]}/disable")).status_code == 200
        stranger = broker_files.hash_password("a password the registry never issued")
        _agent(
            fresh_broker,
            "POST",
            "/v1/changes",
            {
                "remove": [ids[0]],
                "upsert": [{"id": ids[1], "type": "thermostat", "hash": stranger},
                           {"id": ids[2], "type": "thermostat", "hash": stranger},
                           {"id": "rogue", "type": "thermostat", "hash": stranger}],
            },
        )  # fmt: skip
        stolen = connect_device(fresh_broker, "rogue", "a password the registry never issued")
        assert stolen.is_connected
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert report["ok"]
        found = {(d["device_id"], d["kind"]) for d in report["drift"]}
        assert found == {
            (ids[0], "missing_entry"),
            (ids[1], "hash_mismatch"),
            (ids[2], "disabled_present"),
            ("rogue", "orphan_entry"),
        }
        await wait_for(lambda: stolen.disconnected_at is not None, what="orphan kicked", within=1.0)
        stolen.close()
        again = (await api.http.post("/api/v1/reconcile")).json()
        assert again["drift_count"] == 0, again["drift"]
        text = (await api.http.get("/metrics")).text
        assert "registry_reconcile_drift 0.0" in text

        # The repaired broker enforces the registry's view again: the stored hashes came
        # back, so the passwords issued at creation work without any rotation.
        refused = connect_device(fresh_broker, ids[2], passwords[ids[2]])
        assert refused.connack.value == 135  # type: ignore[union-attr]
        refused.close()
        for device_id in (ids[0], ids[1]):
            device = connect_device(fresh_broker, device_id, passwords[device_id])
            assert not device.connack.is_failure, device_id  # type: ignore[union-attr]
            assert device.publish(f"devices/thermostat/{ids[4]}/telemetry", b"{}").value == 135
            device.close()

        # The agent restarts with a file edited behind everyone's back: the registry sees
        # the new agent (boot id) and reconciles on its own, no POST needed.
        assert fresh_broker.agent is not None
        fresh_broker.agent.stop()
        passwd = fresh_broker.state_dir / "devices"
        passwd.write_text(
            "".join(line + "\n" for line in passwd.read_text().splitlines() if ids[3] not in line)
        )
        runs = api.state.reconciler.last
        fresh_broker.start_agent()
        await wait_for(
            lambda: api.state.reconciler.last is not runs, what="reconcile after agent restart", within=10
        )
        last = api.state.reconciler.last.as_dict()
        assert (ids[3], "missing_entry") in {(d["device_id"], d["kind"]) for d in last["drift"]}
        back = connect_device(fresh_broker, ids[3], passwords[ids[3]])
        assert not back.connack.is_failure  # type: ignore[union-attr]
        back.close()


async def test_registry_starts_before_the_broker(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late-broker")  # port chosen, not started yet
    settings = registry_settings(broker, tmp_path / "state")
    from device_registry.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded"
            assert health.json()["checks"]["database"] == "ok"
            # Writes that need the broker say so clearly; reads work.
            from tests.registry_harness import ADMIN_KEY

            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
            resp = await http.post("/api/v1/devices", json={"type": "thermostat"}, headers=auth)
            assert resp.status_code == 503 and resp.json()["type"].endswith("broker-unavailable")
            assert (await http.get("/api/v1/devices", headers=auth)).json()["items"] == []
            broker.start()
            try:
                await wait_for(lambda: app.state.registry.broker.connected, what="broker link", within=20)
                await wait_for(
                    lambda: (
                        app.state.registry.reconciler.last is not None
                        and app.state.registry.reconciler.last.ok
                    ),
                    what="reconcile",
                    within=10,
                )
                # Every link reconnects on its own backoff: healthy once the last one is up.
                await wait_for(lambda: app.state.registry.presence.connected, what="presence link", within=15)
                health = await http.get("/healthz")
                assert health.status_code == 200, health.text
                resp = await http.post("/api/v1/devices", json={"type": "thermostat"}, headers=auth)
                assert resp.status_code == 201
            finally:
                broker.stop()


@contextlib.contextmanager
def _writes_blocked(url: str) -> Iterator[None]:
    """Hold the registry DB's write lock (reads still work): its commit waits, the broker change is done."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("///", 1)[1])
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE devices IN EXCLUSIVE MODE")  # SELECT yes, INSERT waits
                locked.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    holder = threading.Thread(target=lambda: asyncio.run(hold()))
    holder.start()
    try:
        assert locked.wait(10), "could not lock the devices table"
        yield
    finally:
        release.set()
        holder.join(timeout=10)


def test_kill_9_in_the_middle_of_a_bulk_leaves_no_stray_credentials(
    registry_process: RegistryProcess, fresh_broker: Broker, uid: Callable[[str], str]
) -> None:
    registry_process.start()
    prefix = uid("mid")
    body = {"devices": [{"id": f"{prefix}-{i:04d}", "type": "thermostat"} for i in range(400)]}

    def post() -> None:
        with registry_process.client() as http, contextlib.suppress(httpx.HTTPError):
            http.post("/api/v1/devices/bulk", json=body)

    def device_clients() -> list[str]:
        return [c for c in _broker_entries(fresh_broker) if c.startswith(prefix)]

    assert registry_process.database_url is not None
    sender = threading.Thread(target=post)
    with _writes_blocked(registry_process.database_url):
        sender.start()
        probes.wait_until(lambda: len(device_clients()) == 400, timeout=30, what="broker entries written")
        registry_process.kill()  # broker entries exist, the DB commit never happened
    sender.join(timeout=30)
    assert len(device_clients()) == 400

    registry_process.start()
    with registry_process.client() as http:
        report = _reconcile_report(http)
        assert report["ok"] and report["devices_checked"] == 0
        assert report["drift_by_kind"] == {"orphan_entry": 400}
        assert http.get("/api/v1/devices").json()["items"] == []
        assert http.post("/api/v1/reconcile").json()["drift_count"] == 0
    assert device_clients() == []
