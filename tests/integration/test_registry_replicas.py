"""Two registry processes on one PostgreSQL and one broker: both serve the API, one holds the lease
and does the once-only work; kill -9 of the holder hands the work to the other within the TTL.

Every command is created with an Idempotency-Key, through either replica, and must reach the
device and end ``succeeded`` — including one created on the survivor while the lease is still
the dead holder's, and one acknowledged by the device only after the takeover.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest

from iotfleet import topics
from iotfleet.stack import probes
from iotfleet.topics import Channel
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    DeviceClient,
    Postgres,
    RegistryProcess,
    connect_device,
    postgres,
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
