"""The fleet at scale, in miniature: worker processes, source-address spreading, a broker restart.

`iotfleet simulate` (the CLI entry, in a thread so the test can restart the
broker under it) runs 60 thermostats in 2 worker processes, 20 connections per
source address (so 127.0.0.2-4, as 100,000 devices use 127.0.0.2-6 at 20,000
each), against a real broker, the real ingest and InfluxDB. Mid-run the broker
is restarted: every device reconnects with jittered exponential backoff, resends
what the broker never acknowledged and what it measured while away, and
``--verify`` finds every reading stored exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from iotfleet.stack import probes
from simulators import cli
from simulators.provisioning import save_credentials
from simulators.verify import InfluxSource
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess
from tests.simulator_support import provisioned

pytestmark = pytest.mark.integration

DEVICES = 60


def _last_stats(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def test_multi_process_fleet_spreads_sources_and_survives_a_broker_restart(  # noqa: PLR0917 (fixtures)
    fresh_broker: Broker,
    influxd: Influxd,
    database: str,
    tmp_path: Path,
    uid: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = fresh_broker
    save_credentials(
        tmp_path / "credentials.json", provisioned(broker, uid("scale"), {"thermostat": DEVICES})
    )
    # --verify streams InfluxDB's answer in chunks: small ones here, so the run spans many of them.
    monkeypatch.setattr(InfluxSource, "CHUNK", 100)
    monkeypatch.setenv("IOTFLEET_INFLUX__URL", influxd.url)
    monkeypatch.setenv("IOTFLEET_INFLUX__DATABASE", database)
    stats_file = tmp_path / "stats.jsonl"
    args = cli.make_parser().parse_args(
        [
            "--state-dir", str(tmp_path / "state"),
            "--mqtt-port", str(broker.port),
            "--credentials", str(tmp_path / "credentials.json"),
            "--no-observer",
            "--report", str(tmp_path / "report.json"),
            "--stats-file", str(stats_file),
            "--quiet",
            "--type", f"thermostat={DEVICES}",
            "--processes", "2",
            "--devices-per-source", "20",
            "--duration", "12s",
            "--interval", "0.5s",
            "--ramp-up", "200",
            "--backoff-base", "0.2s",
            "--backoff-cap", "2s",
            "--verify",
            "--verify-source", "influx",
            "--verify-timeout", "30s",
        ]
    )  # fmt: skip
    ingest = IngestProcess(broker, influxd, database, tmp_path / "ingest").start()
    codes: list[int] = []
    try:
        ingest.wait_healthy()
        fleet = threading.Thread(target=lambda: codes.append(cli.run(args)), daemon=True)
        fleet.start()
        probes.wait_until(
            lambda: _last_stats(stats_file).get("connected") == DEVICES, timeout=20, what="all connected"
        )
        broker.stop()  # every connection drops at once; readings pile up in the devices
        probes.wait_until(
            lambda: (
                (stats := _last_stats(stats_file)).get("connected") == 0
                and stats.get("connect_failures", 0) > 0
            ),
            timeout=20,
            what="every device offline and retrying",
        )
        broker.start()
        back_at = time.monotonic()
        probes.wait_until(
            lambda: _last_stats(stats_file).get("connected") == DEVICES, timeout=20, what="all reconnected"
        )
        reconnected_s = time.monotonic() - back_at
        fleet.join(timeout=120)
    finally:
        ingest.terminate()
    assert codes == [0], (
        (tmp_path / "report.json").read_text() if (tmp_path / "report.json").exists() else codes
    )
    report = json.loads((tmp_path / "report.json").read_text())
    connections = report["connections"]
    assert report["processes"] == 2
    # 20 devices per source address, each connected twice (start, after the restart), from the
    # socket's real local address.
    assert connections["source_addresses"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert connections["connects_by_source_address"] == {f"127.0.0.{i}": 40 for i in (2, 3, 4)}
    # Refused while the broker was down, back with backoff (windows capped at 2 s), well in time.
    assert connections["reconnects"] == DEVICES and connections["connect_failures"] > 0
    assert connections["backoff"] == {"base_s": 0.2, "cap_s": 2.0, "jitter": "full"}
    assert reconnected_s < 8.0
    published = report["published"]
    assert published["broker_acked"] == published["readings"] and published["resent_after_reconnect"] >= 0
    verify = report["verify"]
    assert verify["missing"] == 0 and verify["duplicates"] == 0, verify
    assert verify["stored"] == verify["expected"] == published["readings"] > DEVICES * 15
