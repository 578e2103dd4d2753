"""`iotfleet simulate` end to end with the real ingest: dead letters with reasons, --verify, report.

The CLI entry (``simulators.cli.run``) runs against a broker, InfluxDB and a
thermostat ingest; devices come from a credentials file (the registry is not
needed); the observer uses the registry's MQTT account.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulators import cli
from simulators.provisioning import save_credentials
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess
from tests.simulator_support import provisioned

pytestmark = pytest.mark.integration


def _cli_args(broker: Broker, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--state-dir",
        str(tmp_path / "state"),
        "--mqtt-port",
        str(broker.port),
        "--credentials",
        str(tmp_path / "credentials.json"),
        "--observer-user",
        "iotfleet-registry",
        # One argv item: a random password may start with "-" (token_urlsafe), which argparse takes for a flag.
        f"--observer-password={broker.passwords['iotfleet-registry']}",
        "--report",
        str(tmp_path / "report.json"),
        "--quiet",
        *extra,
    ]


def test_faulty_fleet_dead_letters_and_verify_with_the_ingest(  # noqa: PLR0917 (fixtures)
    fresh_broker: Broker,
    influxd: Influxd,
    database: str,
    tmp_path: Path,
    uid: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = fresh_broker
    creds = provisioned(broker, uid("e2e"), {"thermostat": 20})
    save_credentials(tmp_path / "credentials.json", creds)
    ids = [c.id for c in creds]
    monkeypatch.setenv("IOTFLEET_INFLUX__URL", influxd.url)
    monkeypatch.setenv("IOTFLEET_INFLUX__DATABASE", database)
    ingest = IngestProcess(broker, influxd, database, tmp_path / "ingest").start()
    try:
        ingest.wait_healthy()
        args = cli.make_parser().parse_args(
            _cli_args(
                broker,
                tmp_path,
                "--type",
                "thermostat=20",
                "--duration",
                "4s",
                "--interval",
                "200ms",
                "--ramp-up",
                "200",
                "--seed",
                "3",
                "--fault",
                f"malformed,probability=0.3,devices={'+'.join(ids[0:4])}",
                "--fault",
                f"out_of_range,probability=0.3,field=temperature_c,devices={'+'.join(ids[4:8])}",
                "--fault",
                f"clock_skew,skew_s=7200,devices={ids[8]}",
                "--fault",
                "duplicate:0.3,probability=0.5",
                "--fault",
                "out_of_order:0.3,probability=0.3",
                "--fault",
                f"disconnect,at_s=1.5,offline_s=0.5,devices={'+'.join(ids[10:14])}",
                "--commands-rate",
                "10",
                "--verify",
                "--verify-source",
                "influx",
                "--verify-timeout",
                "30s",
            )
        )
        code = cli.run(args)
    finally:
        ingest.terminate()
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report
    faults = report["faults"]
    platform = report["platform"]
    verify = report["verify"]
    # Each injected invalid reading came back as a dead letter, with its reason (a duplicated or
    # resent bad reading is dead-lettered each time it arrives: count distinct payloads).
    assert faults["malformed_sent"] > 0 and faults["out_of_range_sent"] > 0 and faults["skewed_sent"] > 0
    assert platform["dead_letters_distinct"] == faults["readings_expected_rejected"]
    assert platform["dead_letters"] >= platform["dead_letters_distinct"]
    assert {"payload", "temperature_c", "ts"} <= set(platform["dead_letter_fields"])
    assert platform["dead_letter_fields"].get("temperature_c", 0) >= faults["out_of_range_sent"]
    # Every valid reading stored exactly once: duplicates collapsed, out-of-order and
    # readings taken while disconnected included, nothing rejected was stored.
    assert faults["duplicates_sent"] > 0 and faults["out_of_order_sent"] > 0
    assert faults["disconnects_injected"] > 0 and platform["status_offline"] >= faults["disconnects_injected"]
    assert verify["source"] == "influxdb"
    assert verify["missing"] == 0 and verify["duplicates"] == 0, verify
    assert verify["stored"] == verify["expected"] > 0
    assert verify["stored_despite_fault"] == 0
    # Commands: sent by the simulator through the observer account, acked, round trip measured.
    commands = report["commands"]
    assert commands["sent_by_simulator"] > 10
    # A few land while their device is away (disconnect fault, ramp-up): a clean-start device
    # session does not keep them.
    assert commands["received"] >= commands["sent_by_simulator"] * 0.7
    assert commands["acked"] >= commands["received"] - 1  # one may land as its device says goodbye
    assert commands["round_trip_ms"]["n"] > 0 and commands["round_trip_ms"]["p50"] < 1_000
    assert report["published"]["broker_acked"] == report["published"]["readings"]


def test_verify_reports_missing_readings_when_nothing_is_stored(  # noqa: PLR0917 (fixtures)
    broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ingest running: every reading is missing, and the exit code says so."""
    creds = provisioned(broker, uid("lost"), {"smart_plug": 3})
    save_credentials(tmp_path / "credentials.json", creds)
    monkeypatch.setenv("IOTFLEET_INFLUX__URL", influxd.url)
    monkeypatch.setenv("IOTFLEET_INFLUX__DATABASE", database)
    args = cli.make_parser().parse_args(
        _cli_args(
            broker,
            tmp_path,
            "--type",
            "smart_plug=3",
            "--duration",
            "1.5",
            "--interval",
            "0.5",
            "--verify",
            "--verify-source",
            "influx",
            "--verify-timeout",
            "2s",
        )
    )
    assert cli.run(args) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    verify = report["verify"]
    assert (
        verify["stored"] == 0 and verify["missing"] == verify["expected"] == report["published"]["readings"]
    )
    assert verify["devices_with_missing"] == 3 and verify["samples"]


def test_two_fleet_processes_share_the_fleet_and_one_report(broker: Broker, tmp_path: Path, uid: Any) -> None:
    creds = provisioned(broker, uid("mp"), 40)
    save_credentials(tmp_path / "credentials.json", creds)
    args = cli.make_parser().parse_args(
        _cli_args(
            broker, tmp_path, "--devices", "40", "--duration", "3", "--interval", "0.5", "--processes", "2"
        )
    )
    assert cli.run(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2
    assert report["connections"]["connects"] == 40 and report["connections"]["connect_failures"] == 0
    assert report["published"]["readings"] == report["published"]["broker_acked"] >= 40 * 4
    assert report["platform"]["status_online"] == 40 == report["platform"]["status_offline"]
    # The seq counters were recorded for the next run of the same credentials file.
    saved = json.loads((tmp_path / "credentials.json").read_text())["devices"]
    assert all(d["next_seq"] >= 4 for d in saved)
