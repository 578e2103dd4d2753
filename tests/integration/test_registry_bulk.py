"""Bulk provisioning: thousands of devices in one request, all or nothing.

The 10,000- and 100,000-device runs are the benchmark (bench/provisioning.py,
docs/benchmarks.md). Here: 600 devices end to end, and a 10,000-device request
going through validation, the DB and the rollback when the broker (and its
agent) is away. tests/integration/test_provisioning_files.py covers the
broker's device file at a few thousand devices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Broker
from tests.registry_harness import connect_device, registry_settings, running_registry, wait_for

pytestmark = pytest.mark.integration


async def test_bulk_provisioning_end_to_end(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    count = 600
    prefix = uid("bulk")
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        body = {"devices": [{"id": f"{prefix}-{i:05d}", "type": "smart_plug", "tags": {"batch": prefix}}
                            for i in range(count)]}  # fmt: skip
        started = time.perf_counter()
        bulk = asyncio.create_task(api.http.post("/api/v1/devices/bulk", json=body))
        # While the broker works through the bulk, the DB is not held: other writes go through.
        await wait_for(lambda: bool(api.state.reconciler.busy), what="bulk in progress", within=10)
        key = await api.http.post("/api/v1/api-keys", json={"name": "during-bulk", "role": "viewer"})
        assert key.status_code == 201, key.text
        assert not bulk.done(), "bulk finished too fast to show concurrency"
        busy = await api.http.post("/api/v1/devices", json={"id": f"{prefix}-00007", "type": "smart_plug"})
        assert busy.status_code == 409  # that id is being provisioned right now
        resp = await bulk
        elapsed = time.perf_counter() - started
        assert resp.status_code == 201, resp.text
        devices = resp.json()["devices"]
        print(f"{count} devices in {elapsed:.1f} s = {count / elapsed:.0f} devices/s")
        assert len(devices) == count and len({d["credentials"]["password"] for d in devices}) == count
        for dev in (devices[0], devices[count // 2], devices[-1]):
            client = connect_device(fresh_broker, dev["id"], dev["credentials"]["password"])
            assert not client.connack.is_failure  # type: ignore[union-attr]
            assert client.publish(dev["topics"]["telemetry"], b"{}").value in (0, 16)
            client.close()
        page = (
            await api.http.get("/api/v1/devices", params={"tag": f"batch={prefix}", "limit": 1000})
        ).json()
        assert len(page["items"]) == count and page["next_cursor"] is None
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert report["drift_count"] == 0 and report["devices_checked"] == count


async def test_ten_thousand_rolled_back_when_the_broker_fails(
    fresh_broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(fresh_broker, tmp_path)) as api:
        fresh_broker.stop()
        body = {"devices": [{"id": f"{uid('gone')}-{i:05d}", "type": "thermostat"} for i in range(10_000)]}
        resp = await api.http.post("/api/v1/devices/bulk", json=body)
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.headers["retry-after"]
        assert (await api.http.get("/api/v1/devices")).json()["items"] == []
