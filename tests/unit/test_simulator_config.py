"""Scenarios, fault specs, the CLI's flag parsing, provisioning files and verification maths."""

from __future__ import annotations

import argparse
import os
import random
import statistics
from pathlib import Path

import pytest

from iotfleet.errors import ConfigError
from simulators import addresses, cli
from simulators.faults import FaultKind, FaultSpec, assign_faults
from simulators.fleet import DeviceCredentials, FleetConfig, backoff_delay
from simulators.provisioning import (
    ProvisioningError,
    load_credentials,
    missing_counts,
    save_credentials,
    select,
    spread,
)
from simulators.scenario import SCENARIO_DIR, Scenario, load_scenario, parse_duration
from simulators.verify import SAMPLE_SEQS, SeqLedger, check_device, summarize


def test_durations() -> None:
    assert parse_duration(90) == 90.0
    assert parse_duration("90") == 90.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300.0
    assert parse_duration("1.5h") == 5400.0
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")


def test_bundled_scenarios_load() -> None:
    for path in SCENARIO_DIR.glob("*.yaml"):
        scenario = load_scenario(path)
        assert scenario.counts()
    demo = load_scenario(SCENARIO_DIR / "demo.yaml")
    assert demo.counts() == {"thermostat": 10, "air_quality": 10, "smart_plug": 10, "gps_tracker": 10}
    assert {f.kind for f in demo.faults} >= {FaultKind.OUT_OF_RANGE, FaultKind.DISCONNECT}


def test_scenario_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("types: {toaster: 3}\nfaults: [{kind: malformed}]\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert "toaster" in str(info.value) and "faults.0" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")


def test_counts_spread_and_scale() -> None:
    assert spread(10) == {"thermostat": 3, "air_quality": 3, "smart_plug": 2, "gps_tracker": 2}
    assert Scenario(devices=7).counts() == spread(7)
    scaled = Scenario(types={"thermostat": 10, "smart_plug": 30}, devices=8).counts()
    assert scaled == {"thermostat": 2, "smart_plug": 6}
    assert (
        sum(
            Scenario(types={"thermostat": 1, "smart_plug": 1, "gps_tracker": 1}, devices=100)
            .counts()
            .values()
        )
        == 100
    )


def test_cli_flags_override_the_scenario() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--scenario",
            str(SCENARIO_DIR / "demo.yaml"),
            "--devices",
            "8",
            "--duration",
            "30s",
            "--fault",
            "malformed:0.5,probability=0.2",
            "--fault",
            "disconnect,devices=a+b,every_s=10",
        ]
    )
    scenario = cli.build_scenario(args)
    assert sum(scenario.counts().values()) == 8
    assert scenario.duration == 30.0 and scenario.interval == 5.0
    extra = scenario.faults[-2:]
    assert extra[0].kind == FaultKind.MALFORMED and extra[0].fraction == 0.5 and extra[0].rate == 0.2
    assert extra[1].devices == ["a", "b"] and extra[1].every_s == 10


def test_bad_fault_flag_is_a_clear_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="kinds: malformed"):
        cli.parse_fault("meltdown:0.1")
    with pytest.raises(argparse.ArgumentTypeError, match="fraction"):
        cli.parse_fault("malformed")


def test_fault_selection_is_deterministic_and_proportional() -> None:
    devices = [(f"d{i}", "thermostat" if i % 2 else "smart_plug") for i in range(2_000)]
    specs = [
        FaultSpec(kind="stuck", fraction=0.1),
        FaultSpec(kind="malformed", fraction=0.5, types=["thermostat"]),
    ]
    first = assign_faults(devices, specs, seed=1)
    again = assign_faults(devices, specs, seed=1)
    assert {k: v.kinds() for k, v in first.items()} == {k: v.kinds() for k, v in again.items()}
    stuck = sum(1 for f in first.values() if f.stuck is not None)
    malformed = [k for k, f in first.items() if f.malformed is not None]
    assert 150 < stuck < 250
    assert 400 < len(malformed) < 600
    assert all(int(k[1:]) % 2 == 1 for k in malformed)  # thermostats only
    with pytest.raises(ValueError, match="not in the fleet"):
        assign_faults(devices, [FaultSpec(kind="stuck", devices=["nope"])], seed=1)


def test_credentials_file_round_trip_and_selection(tmp_path: Path) -> None:
    creds = [
        DeviceCredentials(f"d{i}", "thermostat" if i < 3 else "smart_plug", f"d{i}", "pw", f"d{i}")
        for i in range(5)
    ]
    path = tmp_path / "c.json"
    save_credentials(path, creds)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_credentials(path)
    assert loaded == creds
    assert [c.id for c in select(loaded, {"thermostat": 2, "smart_plug": 1})] == ["d0", "d1", "d3"]
    assert missing_counts(loaded, {"thermostat": 5, "gps_tracker": 1}) == {"thermostat": 2, "gps_tracker": 1}
    path.write_text("{}")
    with pytest.raises(ProvisioningError, match="format"):
        load_credentials(path)


def test_verify_maths() -> None:
    outcome = {
        "id": "d",
        "type": "thermostat",
        "seqs": 10,
        "rejected": [3],
        "dropped": [9],
        "unacked": [8],
        "faults": [],
    }
    check = check_device(outcome, [0, 1, 2, 4, 5, 5, 6, 3])
    assert check.expected == 8  # 0..9 minus rejected 3 minus dropped 9
    assert check.missing == [7, 8] and check.missing_unacked == [8]
    assert check.duplicates == [5] and check.stored_despite_fault == [3]
    assert (check.missing_count, check.duplicates_count, check.stored_despite_fault_count) == (2, 1, 1)
    result = summarize("test", [check], 0.0)
    assert not result.ok and result.samples[0]["missing"] == "7-8"
    assert (result.missing, result.missing_unacked, result.duplicates, result.stored) == (2, 1, 1, 8)


def test_verify_ledger_is_a_bitmap_bounded_per_device() -> None:
    """Memory per device is one bit per seq of its run: 100,000 devices x 20 readings stay small."""
    ledger = SeqLedger(first=100, end=120)
    assert len(ledger.seen) == 3
    for seq in (99, 100, 105, 105, 119, 120, 5):  # seqs outside [100, 120) are an earlier run's
        ledger.add(seq)
    assert ledger.stored == 4 and ledger.has(100) and ledger.has(119) and not ledger.has(101)
    assert ledger.duplicated(105) and not ledger.duplicated(100)
    outcome = {
        "id": "d",
        "type": "thermostat",
        "first_seq": 100,
        "seqs": 120,
        "rejected": [],
        "dropped": [],
        "unacked": [],
    }
    check = check_device(outcome, ledger)
    assert check.expected == 20 and check.missing_count == 17 and check.duplicates == [105]
    everything_missing = check_device({**outcome, "seqs": 100_100}, [])
    assert everything_missing.missing_count == 100_000 and len(everything_missing.missing) == SAMPLE_SEQS


def test_iotfleet_demo_runs_the_demo_scenario_and_simulate_takes_the_flags() -> None:
    from iotfleet.cli import make_parser

    demo = cli.build_scenario(make_parser().parse_args(["demo", "--devices", "40"]))
    assert demo.name == "demo" and sum(demo.counts().values()) == 40 and demo.faults
    adhoc = cli.build_scenario(
        make_parser().parse_args(["simulate", "--devices", "100", "--duration", "60", "--verify"])
    )
    assert adhoc.name == "adhoc" and adhoc.duration == 60 and adhoc.verify and not adhoc.faults


def test_reconnect_backoff_is_full_jitter_capped() -> None:
    """uniform(0, min(cap, base * 2**attempt)): spread over the whole window, never beyond the cap."""
    config = FleetConfig(backoff_base_s=0.5, backoff_cap_s=30.0)
    rng = random.Random(1)
    for attempt, ceiling in ((0, 0.5), (3, 4.0), (6, 30.0), (40, 30.0)):
        delays = [backoff_delay(attempt, config, rng) for _ in range(2_000)]
        assert 0.0 <= min(delays) < ceiling * 0.05 and ceiling * 0.95 < max(delays) <= ceiling
        assert abs(statistics.mean(delays) - ceiling / 2) < ceiling * 0.05


def test_source_addresses_spread_large_loopback_fleets_only() -> None:
    assert addresses.choose("127.0.0.1", 20_000) == []
    assert addresses.choose("localhost", 100_000) == [f"127.0.0.{i}" for i in range(2, 7)]
    assert addresses.choose("10.1.2.3", 100_000) == []  # not loopback: the machine's own addresses
    assert addresses.choose("127.0.0.1", 45, per_source=20) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with pytest.raises(ConfigError, match="devices-per-source"):
        addresses.choose("127.0.0.1", 1_000_000, per_source=1_000)
    with pytest.raises(ConfigError, match="not an IPv4"):
        addresses.parse(["127.0.0.300"])


def test_default_processes_one_per_core_at_most_one_per_thousand_devices() -> None:
    cores = os.cpu_count() or 1
    assert Scenario(devices=100).process_count() == 1
    assert Scenario(devices=100_000).process_count() == min(cores, 100)
    assert Scenario(devices=100_000, processes=3).process_count() == 3


def test_resend_unrouted_is_on_unless_turned_off() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.build_scenario(parser.parse_args([])).resend_unrouted
    assert not cli.build_scenario(parser.parse_args(["--no-resend-unrouted"])).resend_unrouted
