"""The broker agent's device table without a broker: coalescing, atomic files, the platform namespace."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from broker_agent.agent import PROBE_USER, Agent, AgentFiles, AgentMetrics
from iotfleet import broker_files


def _agent(tmp_path: Path) -> Agent:
    files = AgentFiles(tmp_path / "devices", tmp_path / "no-broker.pid")
    return Agent(files, "127.0.0.1", 1, AgentMetrics(CollectorRegistry()), batch_window_s=0.005)


async def test_concurrent_changes_share_one_write_and_survive_a_restart(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.load()
    writer = asyncio.create_task(agent.run())
    try:
        hashes = {
            f"dev-{i:03d}": broker_files.DeviceEntry("thermostat", broker_files.hash_password(f"pw-{i}"))
            for i in range(50)
        }
        results = await asyncio.gather(*(agent.submit({u: h}, []) for u, h in hashes.items()))
        # 50 requests, one initial write and very few batches: they were coalesced.
        assert {r.devices for r in results} <= set(range(1, 51)) and results[-1].devices == 50
        assert agent.generation <= 3, agent.generation
        assert not any(r.reloaded for r in results)  # no broker here: written, reported as not reloaded
        assert "not running" in agent.broker_state

        removed = await agent.submit({}, ["dev-000"])
        assert removed.devices == 49
        with pytest.raises(ValueError, match="platform namespace"):
            await agent.submit({"iotfleet-registry": hashes["dev-001"]}, [])
    finally:
        writer.cancel()

    on_disk = broker_files.parse_devices_file((tmp_path / "devices").read_text())
    assert set(on_disk) == {*hashes, PROBE_USER} - {"dev-000"}
    assert on_disk["dev-001"] == hashes["dev-001"]
    assert sorted(os.listdir(tmp_path)) == ["devices"]  # no temp files left
    assert (tmp_path / "devices").stat().st_mode & 0o777 == 0o600

    restarted = _agent(tmp_path)
    restarted.load()
    assert restarted.entries == {u: h for u, h in hashes.items() if u != "dev-000"}
    assert restarted.boot_id != agent.boot_id
