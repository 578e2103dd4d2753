"""Issue #19's acceptance: a service host lost mid-stream, on five hosts (network namespaces).

Hosts, each started as docs/deployment.md says: ``core`` (``iotfleet up --roles
broker,influxdb --listen``: mosquitto + broker agent + influxd), ``db``
(PostgreSQL), ``svc1`` and ``svc2`` (``iotfleet up --roles registry,ingest,rules``
after ``iotfleet secrets import``: a registry, an ingest replica and a partitioned
rules engine each, MQTT/InfluxDB/agent over TLS to core), ``fleet`` (1,000
simulated smart plugs over TLS, ``python -m simulators``). A rule fires on mains
over-voltage and clears below a lower threshold (commands ``set_relay`` off / on,
an alert on firing): the plugs' voltage noise crosses it about once a device
and minute.

Mid-stream every process on the service host whose registry holds the lease
(the once-only work: command tracker, presence, …) is killed with SIGKILL at
once (a host dying; the kernel still closes its sockets). While it is down the
API is polled through the other host, the survivor; then the lost host is
started again on its own disk (a reboot: its ingest journal and its sessions
are where it left them — the broker keeps that ingest replica's share queued in
its session meanwhile: Mosquitto 2.0 cannot hand a shared-subscription member's
queue to another member, so those readings are stored when the host is back).

Checked at the end:
- every reading the broker acknowledged is stored exactly once (the simulator's
  ``--verify`` against InfluxDB, and each device's seqs counted here);
- for each transition the stored readings call for (the rule's semantics
  replayed over them), exactly one command id was sent (off on firing, on on
  clearing, in order), one alert raised at the reading's time, and the registry
  recorded every command id sent — none lost, none twice with different ids;
- the API answered through the survivor throughout (longest gap < API_GAP_BOUND_S)
  and its registry took the lease over;
- work resumed: the longest reading → command latency of transitions whose
  reading came after the kill (the rules takeover) and the registry's lease
  takeover are within TAKEOVER_BOUND_S (both measured and printed; see
  docs/benchmarks.md, "Hosts: 1 vs 2 service hosts, and a host lost").
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.multihost_checks import (
    RULE,
    ApiPoller,
    BrokerWatcher,
    check_transitions,
    expected_transitions,
    percentile,
    stored_seq_counts,
    stored_voltages,
)
from tests.multihost_stack import INFLUX_DATABASE, MultiHostPlatform
from tests.netns_hosts import HostNetwork, require_netns

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 1_000
INTERVAL_S = 2.0  # 500 readings/s from the fleet: leaves CPU for two full service hosts on 2 cores
# Long enough for the lost host to come back (~20 s under load) and take its share of the rules
# partitions back (one a second) while readings still flow: the hand-back is checked too.
STREAM_S = 60.0
KILL_AFTER_S = 10.0  # of streaming
DOWN_FOR_S = 10.0
# A rule transition of a reading taken after the kill is acted on within this: the dead engine's
# partition leases expire (LEASE_TTL_S, 5 s), the survivor replays its hand-over buffer; measured
# 5.6-8.7 s here (registry lease: 5.2-6.7 s). The bound leaves room for a loaded 2-core machine
# (3 x the lease TTL).
TAKEOVER_BOUND_S = 15.0
# Measured 0.3-1.6 s (the poller's own 2 s timeout and a loaded 2-core machine included).
API_GAP_BOUND_S = 3.0
# After the lost host is back, its rules engine first reads what its session queued meanwhile (all
# readings of DOWN_FOR_S + its restart); partitions handed back to it wait for that. Measured 1.2 s.
HANDBACK_BOUND_S = 30.0
SETTLE_S = 60.0  # at most this long after the fleet's run for the last transitions


def _stats(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return {}
    return json.loads(lines[-1]) if lines else {}


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[MultiHostPlatform]:
    require_netns()
    with HostNetwork(["core", "db", "svc1", "svc2", "fleet"]) as network:
        stack = MultiHostPlatform(network, tmp_path, ["smart_plug"], use_roles=True)
        try:
            yield stack
        finally:
            stack.close()


def test_a_service_host_killed_mid_stream_loses_nothing_and_fires_each_transition_once(
    platform: MultiHostPlatform, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    started = time.monotonic()
    platform.start_servers()
    svc1 = platform.add_service_host("svc1")
    svc2 = platform.add_service_host("svc2")
    endpoints = platform.endpoints()
    auth = {"Authorization": f"Bearer {endpoints.api_key}"}
    http = httpx.Client(base_url=svc1.api_url, headers=auth, timeout=30, verify=endpoints.http_verify())
    created = http.post("/api/v1/rules", json=RULE)
    assert created.status_code == 201, created.text
    credentials = tmp_path / "credentials.json"
    devices = platform.provision({"smart_plug": DEVICES}, credentials, via="svc1")
    device_ids = [d.id for d in devices]
    # Both hosts' API see the same fleet (one database).
    with httpx.Client(base_url=svc2.api_url, headers=auth, verify=endpoints.http_verify()) as other:
        assert other.get(f"/api/v1/devices/{device_ids[-1]}").status_code == 200
    # The host to lose is the one whose registry holds the lease (the once-only work: the command
    # tracker, presence, …): its loss then tests the registry's takeover as well as the rules'.
    holder = _wait(lambda: _lease_holder(platform), "a registry holding the lease", 30, None)
    victim, survivor = (svc1, svc2) if holder == "svc1" else (svc2, svc1)
    print(f"\nsetup: {time.monotonic() - started:.1f} s (servers, 2 service hosts, {DEVICES} devices);"
          f" the registry lease is on {holder}")  # fmt: skip

    watcher = BrokerWatcher(endpoints).start()
    request.addfinalizer(watcher.stop)
    poller = ApiPoller(survivor.api_url, endpoints).start()
    stats_file, report_file = tmp_path / "fleet-stats.jsonl", tmp_path / "fleet-report.json"
    fleet = platform.start_fleet(
        "fleet",
        [
            "--state-dir", str(tmp_path / "fleet"),
            "--credentials", str(credentials),
            "--no-observer", "--quiet",
            "--report", str(report_file),
            "--stats-file", str(stats_file),
            "--type", f"smart_plug={DEVICES}",
            "--interval", f"{INTERVAL_S}s",
            "--duration", f"{STREAM_S}s",
            "--ramp-up", "1000",
            "--seed", "19",
            "--verify", "--verify-source", "influx", "--verify-timeout", "60s",
        ],
        tmp_path / "fleet.log",
    )  # fmt: skip
    try:
        _wait(lambda: _stats(stats_file).get("connected") == DEVICES, "the fleet connected", 30, fleet)
        time.sleep(KILL_AFTER_S)  # pacing: let the stream run on both hosts before the kill
        killed_at_ms, killed_at = int(time.time() * 1000), time.monotonic()
        killed = victim.host.kill_all()
        print(f"killed {killed} processes on {victim.host.name}")
        lease_taken_s = None
        while time.monotonic() - killed_at < DOWN_FOR_S:  # the survivor alone carries the platform
            if lease_taken_s is None and _lease_holder(platform, only=survivor.host.name):
                lease_taken_s = time.monotonic() - killed_at
            time.sleep(0.2)
        down_until = time.monotonic()
        victim.processes.clear()
        restarted_at_ms = int(time.time() * 1000)
        platform.start_service_host(victim.host.name)  # a reboot: same disk, same replica names
        print(f"{victim.host.name} back after {time.monotonic() - killed_at:.1f} s")
        _wait(lambda: fleet.proc.poll() is not None, "the fleet's run and --verify", STREAM_S + 120, None)
    finally:
        poller.stop()
    stream_done = time.monotonic()
    report = json.loads(report_file.read_text())
    print(json.dumps({k: report[k] for k in ("published", "commands", "verify") if k in report}, indent=1))

    # 1. every acknowledged reading stored exactly once
    published, verify = report["published"], report["verify"]
    assert published["broker_acked"] == published["readings"], published
    assert verify["missing"] == 0 and verify["duplicates"] == 0, verify
    # ... checked here too: each device took seqs 0 … next_seq-1 (the simulator records next_seq in the
    # credentials file), all acked (above); stored: each of them once.
    taken = {d["id"]: d["next_seq"] for d in json.loads(credentials.read_text())["devices"]}
    stored = stored_seq_counts(endpoints, INFLUX_DATABASE)
    wrong = {d: stored.get(d) for d, n in taken.items() if stored.get(d) != (n, n, n - 1)}
    assert not wrong, (
        f"{len(wrong)} devices (points, distinct seqs, last seq) != (n, n, n-1): {list(wrong.items())[:5]}"
    )
    assert sum(taken.values()) == verify["expected"] == published["readings"]
    assert fleet.proc.returncode == 0, fleet.log_tail()

    # 2. every rule transition fired exactly once, no command lost or sent twice with different ids
    expected = expected_transitions(stored_voltages(endpoints, INFLUX_DATABASE))
    # The engine that came back catches up on what its session queued while it was down (it reads every
    # reading, keeps those of partitions it does not own for hand-overs): wait for the last transitions.
    while True:
        watcher_commands, watcher_alerts = watcher.snapshot()
        check = check_transitions(expected, watcher_commands, watcher_alerts, device_ids)
        if (
            not check.devices_wrong and not check.alerts_raised_wrong
        ) or time.monotonic() > stream_done + SETTLE_S:
            break
        time.sleep(1.0)
    _settled(watcher)  # nothing more comes (a command sent twice with another id would)
    watcher_commands, watcher_alerts = watcher.snapshot()
    check = check_transitions(expected, watcher_commands, watcher_alerts, device_ids)
    print(f"transitions settled {time.monotonic() - stream_done:.1f} s after the fleet's run")
    print(
        f"transitions: {check.expected} expected, {check.distinct_commands} command ids"
        f" ({check.commands_seen} deliveries), devices wrong: {len(check.devices_wrong)},"
        f" alerts wrong: {len(check.alerts_raised_wrong)}"
    )
    # 3. (checked before the rest of 2, so that a failing run still prints these figures) the API
    # answered through the survivor while the victim was down, and its registry took the lease over
    gap = poller.longest_gap_s(killed_at - 1.0, down_until)
    print(
        f"API through {survivor.host.name}: longest gap {gap:.2f} s while {victim.host.name} was down"
        f" ({poller.failures} failures); registry lease taken over after {lease_taken_s or float('nan'):.1f} s"
    )
    assert gap < API_GAP_BOUND_S
    assert lease_taken_s is not None and lease_taken_s < TAKEOVER_BOUND_S

    # 4. work resumed within the bound: the latency of transitions read while the victim was down
    before = [latency for ts, latency in check.latencies_ms if ts < killed_at_ms]
    down = [latency for ts, latency in check.latencies_ms if killed_at_ms <= ts < restarted_at_ms]
    back = [latency for ts, latency in check.latencies_ms if ts >= restarted_at_ms]
    takeover_s, back_s = max(down) / 1000, max(back, default=0) / 1000
    print(
        f"reading → command: before the kill p50 {percentile(before, 0.5):.0f} ms"
        f" p99 {percentile(before, 0.99):.0f} ms; while {victim.host.name} was down max {takeover_s:.2f} s"
        f" (takeover); after it came back max {back_s:.2f} s (hand-back, catching up)"
    )
    assert takeover_s < TAKEOVER_BOUND_S
    assert back_s < HANDBACK_BOUND_S

    # 2. (continued)
    if check.devices_wrong:  # what the engines say about themselves, for the failure's reader
        for name in platform.services:
            wanted = ("iotfleet_rules_readings", "iotfleet_rules_partitions_", "iotfleet_rules_firings",
                      "iotfleet_rules_commands", "iotfleet_rules_mqtt", "iotfleet_rules_handover",
                      "iotfleet_rules_loaded", "iotfleet_rules_devices", "iotfleet_rules_shared")  # fmt: skip
            lines = [line for line in platform.rules_metrics(name).splitlines() if line.startswith(wanted)]
            print(f"--- {name} rules metrics ---", *lines, sep="\n")
    assert check.expected > DEVICES // 4, "the rule must fire often enough to mean something"
    assert not check.devices_wrong, (
        f"killed at {killed_at_ms}, restarted at {restarted_at_ms}: {list(check.devices_wrong.items())[:5]}"
    )
    assert not check.alerts_raised_wrong, list(check.alerts_raised_wrong.items())[:5]
    # ... and the registry recorded each of them once (its tracker may trail the devices a little)
    sent = {c.id: c for c in watcher_commands}
    deadline = time.monotonic() + 30
    while (recorded := _registry_rule_commands(http, device_ids)) != set(
        sent
    ) and time.monotonic() < deadline:
        time.sleep(1.0)
    unrecorded = sorted((sent[i].at_ms - killed_at_ms, sent[i].device_id) for i in set(sent) - recorded)
    assert not unrecorded, (
        f"{len(unrecorded)} sent, not recorded (ms after the kill, device): {unrecorded[:10]}"
    )
    assert recorded == set(sent), f"recorded, never sent: {sorted(recorded - set(sent))[:10]}"

    print(f"test took {time.monotonic() - started:.1f} s")


def _wait(check: Any, what: str, timeout: float, process: Any) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if process is not None and not process.alive():
            raise AssertionError(f"{what}: the fleet exited:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.1)
    return result


def _lease_holder(platform: MultiHostPlatform, only: str | None = None) -> str | None:
    """The service host whose registry says it holds the lease (its /healthz), or None."""
    endpoints = platform.endpoints()
    for name, service in platform.services.items():
        if only is not None and name != only:
            continue
        try:
            body = httpx.get(f"{service.api_url}/healthz", timeout=2, verify=endpoints.http_verify()).json()
        except (httpx.HTTPError, ValueError):
            continue
        if body.get("lease", {}).get("holder"):
            return name
    return None


def _settled(watcher: BrokerWatcher, quiet_s: float = 3.0, within_s: float = 30.0) -> tuple[Any, Any]:
    """The watcher's records once no command or alert came for ``quiet_s``."""
    deadline = time.monotonic() + within_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        commands, alerts = watcher.snapshot()
        if len(commands) + len(alerts) != last:
            last, last_change = len(commands) + len(alerts), time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            break
        time.sleep(0.2)
    return watcher.snapshot()


def _registry_rule_commands(http: httpx.Client, device_ids: list[str]) -> set[str]:
    """The ids of every command the registry recorded for the fleet (all rule commands here)."""
    wanted, ids = set(device_ids), set()
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = http.get("/api/v1/commands", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        ids.update(c["id"] for c in body["items"] if c["device_id"] in wanted)
        cursor = body.get("next_cursor")
        if not cursor:
            return ids
