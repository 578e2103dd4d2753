"""Two registry processes on one PostgreSQL and one broker: both serve the API, one holds the lease
and does the once-only work; kill -9 of the holder hands the work to the other within the TTL.

Every command is created with an Idempotency-Key, through either replica, and must reach the
device and end ``succeeded`` — including one created on the survivor while the lease is still
the dead holder's, and one acknowledged by the device only after the takeover.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from device_registry.main import create_app
from device_registry.models_lease import LeaseRow
from iotfleet import topics
from iotfleet.settings import Settings
from iotfleet.stack import probes
from iotfleet.topics import Channel
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    ADMIN_KEY,
    DeviceClient,
    Postgres,
    RegistryProcess,
    admin_listener,
    connect_device,
    postgres,
    registry_settings,
    wait_for,
)

pytestmark = pytest.mark.integration

TTL_S = 3.0
TYPE = "smart_plug"


class AckingDevice:
    """A device that acks each command it receives (``succeeded``) unless ``hold`` is set."""

    def __init__(self, device: DeviceClient, device_id: str) -> None:
        self.device = device
        self.device_id = device_id
        self.received: list[str] = []
        self.hold = threading.Event()
        self.held: list[str] = []
        self._lock = threading.Lock()
        self.acks = topics.device_topic(TYPE, device_id, Channel.ACKS)
        device.client.on_message = self._on_message
        assert not device.subscribe(topics.device_topic(TYPE, device_id, Channel.COMMANDS)).is_failure

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        command_id = orjson.loads(msg.payload)["id"]
        with self._lock:
            self.received.append(command_id)
            if self.hold.is_set():
                self.held.append(command_id)
                return
        self._ack(command_id)

    def _ack(self, command_id: str) -> None:
        body = orjson.dumps({"id": command_id, "status": "succeeded"})
        self.device.client.publish(self.acks, body, qos=1)

    def release(self) -> None:
        with self._lock:
            self.hold.clear()
            held, self.held = self.held, []
        for command_id in held:
            self._ack(command_id)


def _health(replica: RegistryProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{replica.url}/healthz", timeout=10).json()
    return body


def _lease(replica: RegistryProcess) -> dict[str, Any]:
    lease: dict[str, Any] = _health(replica)["lease"]
    return lease


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exposed")


def _send(http: httpx.Client, device_id: str, key: str) -> str:
    resp = http.post(
        f"/api/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers={"Idempotency-Key": key}
    )
    assert resp.status_code == 202, resp.text
    command_id: str = resp.json()["id"]
    return command_id


def _wait_status(http: httpx.Client, command_id: str, status: str, within: float = 15) -> None:
    def reached() -> bool:
        return bool(http.get(f"/api/v1/commands/{command_id}").json()["status"] == status)

    probes.wait_until(reached, timeout=within, what=f"command {command_id} {status}")


@pytest.fixture
def replicas(
    fresh_broker: Broker,
    postgres: Postgres,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[RegistryProcess, RegistryProcess]]:
    url = postgres.create_database()

    def replica(name: str) -> RegistryProcess:
        env = {"IOTFLEET_REGISTRY__REPLICA": name, "IOTFLEET_REGISTRY__LEASE_TTL_S": str(TTL_S)}
        return RegistryProcess(fresh_broker, tmp_path / name, url, extra_env=env)

    one, two = replica("r1"), replica("r2")
    try:
        try:
            one.start()
            two.start()
        except Exception:
            print("----- r1 log -----\n" + one.log_tail(60) + "\n----- r2 log -----\n" + two.log_tail(60))
            for r in (one, two):
                try:
                    print(httpx.get(f"{r.url}/healthz", timeout=5).text)
                except httpx.HTTPError as exc:
                    print(exc)
            raise
        yield one, two
    finally:
        one.stop()
        two.stop()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print("----- r1 log -----\n" + one.log_tail(60) + "\n----- r2 log -----\n" + two.log_tail(60))


def test_two_replicas_one_lease_and_a_takeover(
    replicas: tuple[RegistryProcess, RegistryProcess], fresh_broker: Broker, uid: Callable[[str], str]
) -> None:
    first, second = replicas
    # r1 started first and took the lease at once; r2 is a healthy standby.
    assert _lease(first)["holder"] is True and _lease(second)["holder"] is False
    assert _health(second)["status"] == "ok", _health(second)
    epoch = _lease(first)["epoch"]
    with first.client() as h1, second.client() as h2:
        assert _metric(h1, "registry_lease_held") == 1 and _metric(h2, "registry_lease_held") == 0
        device_id = uid("plug")
        created = h2.post("/api/v1/devices", json={"id": device_id, "type": TYPE})  # through the standby
        assert created.status_code == 201, created.text
        creds = created.json()["credentials"]
        assert h1.get(f"/api/v1/devices/{device_id}").status_code == 200
        device = AckingDevice(connect_device(fresh_broker, creds["username"], creds["password"]), device_id)
        try:
            ids: dict[str, str] = {}
            # Commands through EITHER replica reach the device and are acked.
            ids["via-holder"] = _send(h1, device_id, "via-holder")
            ids["via-standby"] = _send(h2, device_id, "via-standby")
            for command_id in ids.values():
                _wait_status(h1, command_id, "succeeded")
            # A retry through the other replica is the same command.
            again = h1.post(
                f"/api/v1/devices/{device_id}/commands",
                json={"name": "reboot"},
                headers={"Idempotency-Key": "via-standby"},
            )
            assert again.status_code == 200 and again.json()["id"] == ids["via-standby"]

            # A rule created through the standby is announced to the rules engines all the same.
            listener = admin_listener(fresh_broker, topics.RULES_CHANGED)
            try:
                rule = {
                    "name": uid("hot"),
                    "scope": {"device_type": "thermostat"},
                    "when": {"field": "temperature_c", "op": ">", "value": 30},
                    "then": [{"alert": {"severity": "major", "message": "hot"}}],
                }
                made = h2.post("/api/v1/rules", json=rule)
                assert made.status_code == 201, made.text
                probes.wait_until(
                    lambda: any(
                        orjson.loads(m.payload)["rule_id"] == made.json()["id"] for m in listener.messages
                    ),
                    timeout=10,
                    what="rules/changed from the standby",
                )
            finally:
                listener.close()

            # The device holds its next ack; then the holder dies.
            device.hold.set()
            ids["acked-after-takeover"] = _send(h2, device_id, "acked-after-takeover")
            probes.wait_until(
                lambda: ids["acked-after-takeover"] in device.received,
                timeout=10,
                what="held command delivered",
            )
            first.kill()
            killed = time.monotonic()
            # Created on the survivor while the dead replica still holds the lease.
            ids["during-takeover"] = _send(h2, device_id, "during-takeover")
            assert _lease(second)["holder"] is False, "taken over before the dead holder's TTL ran out"
            probes.wait_until(lambda: _lease(second)["holder"], timeout=TTL_S + 5, what="r2 takes the lease")
            took_over = time.monotonic() - killed
            probes.wait_until(
                lambda: ids["during-takeover"] in device.received,
                timeout=TTL_S + 5,
                what="command created during the takeover delivered",
            )
            working = time.monotonic() - killed
            print(
                f"\nkill -9 of the holder → lease taken {took_over:.2f} s, commands flowing {working:.2f} s"
            )
            assert took_over < TTL_S + 1.5, f"takeover took {took_over:.2f} s (ttl {TTL_S} s)"
            assert working < TTL_S + 3.0, f"work resumed after {working:.2f} s"
            lease = _lease(second)
            assert lease["epoch"] == epoch + 1 and lease["takeovers"] == 1
            assert (
                _metric(h2, "registry_lease_held") == 1 and _metric(h2, "registry_lease_epoch") == epoch + 1
            )

            # The tracker's work resumed on the survivor: the held ack (sent now) is recorded.
            device.release()
            _wait_status(h2, ids["acked-after-takeover"], "succeeded")
            _wait_status(h2, ids["during-takeover"], "succeeded")
            ids["after-takeover"] = _send(h2, device_id, "after-takeover")
            _wait_status(h2, ids["after-takeover"], "succeeded")

            # Presence too: the device leaving is seen by the new holder.
            device.device.close()
            probes.wait_until(
                lambda: h2.get(f"/api/v1/devices/{device_id}").json()["online"] is False,
                timeout=15,
                what="presence on the new holder",
            )
        finally:
            device.device.close()

        # No request became two commands; the device got only those ids (repeats carry the same id).
        rows = h2.get(f"/api/v1/devices/{device_id}/commands", params={"limit": 100}).json()["items"]
        assert sorted(r["id"] for r in rows) == sorted(ids.values())
        assert {r["status"] for r in rows} == {"succeeded"}
        assert set(device.received) == set(ids.values())


@asynccontextmanager
async def _in_process(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The registry app with its real lifespan, served through httpx's ASGI transport."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://r", headers=headers) as http:
            yield app, http


async def test_a_deposed_replica_stops_and_works_again_when_the_lease_comes_back(
    fresh_broker: Broker,
    postgres: Postgres,  # noqa: F811
    tmp_path: Path,
    uid: Callable[[str], str],
) -> None:
    """The singleton work is restartable: lost (the holder paused past its term), then regained."""
    url = postgres.create_database()

    def settings(name: str) -> Settings:
        base = registry_settings(fresh_broker, tmp_path / name, url)
        base.registry = base.registry.model_copy(update={"replica": name, "lease_ttl_s": 2.0})
        return base

    async with _in_process(settings("a")) as (app_a, http_a):
        state_a = app_a.state.registry
        assert state_a.lease.holding
        tracker_a = app_a.state.command_tracker
        await wait_for(tracker_a.connected.is_set, what="a's tracker", within=10)
        async with _in_process(settings("b")) as (app_b, _http_b):
            state_b = app_b.state.registry
            assert not state_b.lease.holding
            # a stalls past its term (as after a long GC or VM pause): its lease expires in the DB.
            async with state_a.sessions() as session, session.begin():
                await session.execute(
                    update(LeaseRow)
                    .where(LeaseRow.name == "registry")
                    .values(expires_at=datetime(2000, 1, 1, tzinfo=UTC))
                )
            await wait_for(lambda: state_b.lease.holding, what="b takes the expired lease", within=10)
            await wait_for(lambda: not tracker_a.running, what="a stops its work", within=10)
            assert not state_a.lease.holding and not state_a.presence.running
            await wait_for(app_b.state.command_tracker.connected.is_set, what="b's tracker", within=10)
        # b stopped cleanly (released): a takes the lease back at its next try and works again.
        await wait_for(lambda: state_a.lease.holding, what="a takes the lease back", within=10)
        # (a loaded machine may starve a renewal and add a term: at least these two)
        assert state_a.lease.epoch >= 3 and state_a.lease.takeovers >= 2
        await wait_for(tracker_a.connected.is_set, what="a's tracker again", within=10)
        assert state_a.presence.running
        device_id = uid("plug")
        created = await http_a.post("/api/v1/devices", json={"id": device_id, "type": TYPE})
        assert created.status_code == 201, created.text
        creds = created.json()["credentials"]
        device = AckingDevice(connect_device(fresh_broker, creds["username"], creds["password"]), device_id)
        try:
            resp = await http_a.post(f"/api/v1/devices/{device_id}/commands", json={"name": "reboot"})
            assert resp.status_code == 202, resp.text
            command_id = resp.json()["id"]

            async def succeeded() -> bool:
                got = await http_a.get(f"/api/v1/commands/{command_id}")
                return bool(got.json()["status"] == "succeeded")

            await wait_for(succeeded, what="command acked through the restarted tracker", within=15)
        finally:
            device.device.close()
