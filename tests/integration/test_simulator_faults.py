"""Each fault kind's effect as the platform sees it at the broker, plus the device protocol.

Effects that need the ingest (dead letters with reasons, duplicates stored
once, zero missing) are in test_simulator_ingest.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from iotfleet import topics
from iotfleet.catalogue import get_device_type
from iotfleet.topics import Channel
from simulators.faults import FaultSpec
from simulators.fleet import DeviceCredentials, Fleet, FleetConfig, _poll
from tests.harness import Broker
from tests.simulator_support import Watcher, provisioned, send_command

pytestmark = pytest.mark.integration


def _config(broker: Broker, *faults: FaultSpec, **kw: Any) -> FleetConfig:
    base: dict[str, Any] = {"port": broker.port, "interval_s": 0.1, "jitter": 0.0, "publish_on_start": True}
    base.update(kw)
    return FleetConfig(faults=list(faults), **base)


def _readings(watcher: Watcher, device: DeviceCredentials) -> list[bytes]:
    return [m.payload for m in watcher.on(device, Channel.TELEMETRY)]


async def _run(creds: list[DeviceCredentials], config: FleetConfig, seconds: float) -> Fleet:
    fleet = Fleet(creds, config)
    await fleet.run(seconds, tick_s=0.05)
    return fleet


async def _wait_all(watcher: Watcher, fleet: Fleet) -> None:
    await watcher.wait(
        lambda: (
            sum(1 for m in watcher.messages if m.topic.endswith("/telemetry"))
            >= fleet.stats.messages_published
        ),
        "all telemetry at the broker",
    )


async def test_malformed_payloads_arrive_as_invalid_json(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("mal"), {"thermostat": 1})
    async with Watcher(broker) as watcher:
        fleet = await _run(
            [device], _config(broker, FaultSpec(kind="malformed", fraction=1, probability=0.5)), 1.0
        )
        await _wait_all(watcher, fleet)
    payloads = _readings(watcher, device)
    invalid = []
    for payload in payloads:
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError:
            invalid.append(payload)
    assert invalid and len(invalid) == fleet.stats.malformed_sent
    assert len(invalid) < len(payloads)  # probability 0.5: valid ones flow too
    outcome = fleet.outcomes()[0]
    assert len(outcome["rejected"]) == len(invalid)


async def test_out_of_range_values_fail_catalogue_validation_on_the_named_field(
    broker: Broker, uid: Any
) -> None:
    (device,) = provisioned(broker, uid("oor"), {"air_quality": 1})
    spec = FaultSpec(kind="out_of_range", fraction=1, probability=1, field="co2_ppm")
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 0.6)
        await _wait_all(watcher, fleet)
    payloads = _readings(watcher, device)
    assert payloads
    for payload in payloads:
        assert orjson.loads(payload)["co2_ppm"] > 40_000
        with pytest.raises(ValidationError) as info:
            get_device_type("air_quality").parse_payload(payload)
        assert any("co2_ppm" in [str(p) for p in e["loc"]] for e in info.value.errors())


async def test_stuck_sensor_repeats_its_values(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("stk"), {"smart_plug": 1})
    spec = FaultSpec(kind="stuck", fraction=1, field="voltage_v")
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 1.0)
        await _wait_all(watcher, fleet)
    readings = [orjson.loads(p) for p in _readings(watcher, device)]
    assert len(readings) >= 5
    assert len({r["voltage_v"] for r in readings}) == 1
    assert len({r["seq"] for r in readings}) == len(readings)  # still fresh readings, frozen value


async def test_spikes_are_large_but_valid(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("spk"), {"thermostat": 1})
    spec = FaultSpec(kind="spike", fraction=1, probability=1)
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 0.6)
        await _wait_all(watcher, fleet)
    payloads = _readings(watcher, device)
    assert payloads
    for payload in payloads:
        reading = get_device_type("thermostat").parse_payload(payload)[0]  # in range: stored
        assert abs(reading.temperature_c - reading.setpoint_c) > 12  # a 25 °C jump off a ~20 °C room


async def test_clock_skew_shifts_the_device_timestamp(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("skw"), {"gps_tracker": 1})
    spec = FaultSpec(kind="clock_skew", fraction=1, skew_s=-120)
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 0.6)
        await _wait_all(watcher, fleet)
    messages = watcher.on(device, Channel.TELEMETRY)
    assert messages
    now_ms = time.time() * 1000
    for message in messages:
        lag_s = (now_ms - orjson.loads(message.payload)["ts"]) / 1000
        assert 119 < lag_s < 130
    assert fleet.outcomes()[0]["rejected"] == []  # 2 min is within the ingest's limits: stored


async def test_duplicates_carry_the_same_seq_and_ts(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("dup"), {"thermostat": 1})
    spec = FaultSpec(kind="duplicate", fraction=1, probability=1)
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 0.6)
        await _wait_all(watcher, fleet)
    payloads = _readings(watcher, device)
    counts = Counter(payloads)
    assert counts and all(n == 2 for n in counts.values())  # byte-identical: same seq, same ts
    seqs = Counter(orjson.loads(p)["seq"] for p in payloads)
    assert all(n == 2 for n in seqs.values())
    assert fleet.stats.duplicates_sent == len(counts)


async def test_out_of_order_readings_are_swapped(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("ooo"), {"smart_plug": 1})
    spec = FaultSpec(kind="out_of_order", fraction=1, probability=1)
    async with Watcher(broker) as watcher:
        fleet = await _run([device], _config(broker, spec), 1.0)
        await _wait_all(watcher, fleet)
    seqs = [orjson.loads(p)["seq"] for p in _readings(watcher, device)]
    assert sorted(seqs) == list(range(len(seqs)))  # nothing lost, nothing doubled
    assert any(a > b for a, b in itertools.pairwise(seqs))  # but not in order


async def test_abrupt_disconnect_fires_the_retained_lwt_and_the_device_comes_back(
    broker: Broker, uid: Any
) -> None:
    (device,) = provisioned(broker, uid("lwt"), {"thermostat": 1})
    spec = FaultSpec(kind="disconnect", fraction=1, at_s=0.5, offline_s=1.5)
    status_topic = topics.device_topic(device.type, device.id, Channel.STATUS)
    async with Watcher(broker) as watcher:
        fleet = Fleet([device], _config(broker, spec))
        run = asyncio.create_task(fleet.run(4.0, tick_s=0.05))
        status = lambda: [m.payload for m in watcher.on(device, Channel.STATUS)]  # noqa: E731
        await watcher.wait(lambda: status()[:2] == [b"online", b"offline"], "LWT offline")
        # The will is retained: a dashboard that subscribes while the device is away sees it.
        async with Watcher(broker, filters=(status_topic,)) as late:
            retained = await late.wait(lambda: late.messages, "retained status")
        await watcher.wait(lambda: status()[:3] == [b"online", b"offline", b"online"], "back online")
        await run
        await _wait_all(watcher, fleet)
    assert retained[0].retain and retained[0].payload == b"offline"
    assert fleet.stats.disconnects_injected == 1 and fleet.stats.reconnects == 1
    seqs = sorted(orjson.loads(p)["seq"] for p in _readings(watcher, device))
    assert seqs == list(range(fleet.outcomes()[0]["seqs"]))  # buffered while offline, nothing lost


async def test_reconnect_storm_drops_and_reconnects_every_member_at_once(broker: Broker, uid: Any) -> None:
    creds = provisioned(broker, uid("storm"), 20)
    spec = FaultSpec(kind="reconnect_storm", fraction=1, at_s=0.5)
    async with Watcher(broker, filters=("devices/+/+/status",)) as watcher:
        fleet = await _run(creds, _config(broker, spec, interval_s=0.5), 2.5)
        await watcher.wait(
            lambda: sum(m.payload == b"offline" for m in watcher.messages) >= 40, "LWT + final offline"
        )
    assert fleet.stats.storms_injected == 1
    assert fleet.stats.reconnects == 20 and fleet.stats.connect_failures == 0
    for device in creds:
        assert [m.payload for m in watcher.on(device, Channel.STATUS)] == [
            b"online",
            b"offline",
            b"online",
            b"offline",
        ]


async def test_command_gets_an_ack_with_its_correlation_id_and_changes_behaviour(
    broker: Broker, uid: Any
) -> None:
    (device,) = provisioned(broker, uid("cmd"), {"smart_plug": 1})
    async with Watcher(broker) as watcher:
        fleet = Fleet([device], _config(broker, interval_s=0.1))
        run = asyncio.create_task(fleet.run(2.5, tick_s=0.05))
        await watcher.wait(lambda: watcher.on(device, Channel.STATUS), "online")
        await asyncio.sleep(0.2)  # the device's SUBSCRIBE follows its online status
        command_id = await send_command(broker, device, "set_relay", {"on": False})
        ack = await watcher.wait(lambda: watcher.on(device, Channel.ACKS), "ack")
        sent_at = time.monotonic()
        bad_id = await send_command(broker, device, "set_relay", {"on": "yes"})
        await watcher.wait(lambda: len(watcher.on(device, Channel.ACKS)) >= 2, "second ack")
        await run
        await _wait_all(watcher, fleet)
    body = ack[0].json()
    assert body == {"id": command_id, "status": "succeeded", "detail": "relay open"}
    assert ack[0].correlation == command_id.encode()
    failed = watcher.on(device, Channel.ACKS)[1].json()
    assert failed["id"] == bad_id and failed["status"] == "failed" and "on" in failed["detail"]
    # Closed loop: once the relay opened, power and current read zero.
    after = [orjson.loads(m.payload) for m in watcher.on(device, Channel.TELEMETRY) if m.at > sent_at + 0.2]
    assert after and all(r["power_w"] == 0 and r["current_a"] == 0 and not r["relay_on"] for r in after)


async def test_ignored_and_slow_commands(broker: Broker, uid: Any) -> None:
    ignoring, slow = provisioned(broker, uid("ign"), {"thermostat": 2})
    faults = [
        FaultSpec(kind="ignore_commands", devices=[ignoring.id]),
        FaultSpec(kind="slow_ack", devices=[slow.id], delay_s=1.0),
    ]
    async with Watcher(broker) as watcher:
        fleet = Fleet([ignoring, slow], _config(broker, *faults, interval_s=1.0))
        run = asyncio.create_task(fleet.run(3.0, tick_s=0.05))
        # Only these two devices: the shared broker holds other tests' retained statuses.
        await watcher.wait(
            lambda: all(
                any(m.payload == b"online" for m in watcher.on(d, Channel.STATUS)) for d in (ignoring, slow)
            ),
            "online",
        )
        await asyncio.sleep(0.2)
        sent = time.monotonic()
        await send_command(broker, ignoring, "set_mode", {"mode": "cool"})
        await send_command(broker, slow, "set_mode", {"mode": "cool"})
        ack = await watcher.wait(lambda: watcher.on(slow, Channel.ACKS), "slow ack")
        await run
    assert ack[0].at - sent >= 0.95
    assert watcher.on(ignoring, Channel.ACKS) == []
    assert fleet.stats.commands_received == 2 and fleet.stats.commands_ignored == 1


async def test_wrong_password_is_a_counted_connect_failure(broker: Broker, uid: Any) -> None:
    (device,) = provisioned(broker, uid("pw"), {"thermostat": 1})
    wrong = DeviceCredentials(device.id, device.type, device.username, "not-the-password", device.client_id)
    fleet = await _run([wrong], _config(broker, backoff_base_s=0.1, backoff_cap_s=0.2), 1.0)
    assert fleet.stats.connects == 0 and fleet.stats.connect_failures >= 2  # retried with backoff
    # Mosquitto's dynsec answers a wrong password with 0x87 (not authorized), others with 0x86.
    assert any(code in reason for reason in fleet.stats.connect_errors for code in ("0x86", "0x87"))
    assert topics.STATUS_ONLINE == b"online"


async def test_command_sent_while_the_device_is_away_is_answered_after_it_reconnects(
    broker: Broker, uid: Any
) -> None:
    (device,) = provisioned(broker, uid("away"), {"thermostat": 1})
    spec = FaultSpec(kind="disconnect", fraction=1, at_s=0.5, offline_s=1.5)
    async with Watcher(broker) as watcher:
        fleet = Fleet([device], _config(broker, spec, interval_s=0.5))
        run = asyncio.create_task(fleet.run(4.0, tick_s=0.05))
        status = lambda: [m.payload for m in watcher.on(device, Channel.STATUS)]  # noqa: E731
        await watcher.wait(lambda: status()[:2] == [b"online", b"offline"], "LWT offline")
        command_id = await send_command(broker, device, "set_setpoint", {"setpoint_c": 23.5})
        ack = await watcher.wait(lambda: watcher.on(device, Channel.ACKS), "ack after reconnect")
        back_online = [m for m in watcher.on(device, Channel.STATUS) if m.payload == b"online"][1]
        await run
    # The broker kept the device's session (session expiry) and delivered the queued command.
    assert ack[0].json()["id"] == command_id and ack[0].json()["status"] == "succeeded"
    assert ack[0].at >= back_online.at


async def test_broker_restart_devices_reconnect_with_backoff_and_resend(
    fresh_broker: Broker, uid: Any
) -> None:
    creds = provisioned(fresh_broker, uid("rst"), 50)
    fleet = Fleet(creds, _config(fresh_broker, interval_s=0.2, backoff_base_s=0.2, backoff_cap_s=2.0))
    run = asyncio.create_task(fleet.run(7.0, tick_s=0.05))
    await _poll(lambda: fleet.stats.connected == 50, 10.0)
    await asyncio.to_thread(fresh_broker.stop)  # every connection drops; readings pile up offline
    await asyncio.sleep(1.0)
    await asyncio.to_thread(fresh_broker.start)
    await run
    stats = fleet.stats
    assert stats.reconnects == 50 and stats.disconnects >= 100
    assert stats.connect_failures > 0  # refused while the broker was down, retried with backoff
    # Everything measured while the broker was away was sent after the reconnect and acked.
    assert stats.readings_acked == stats.readings_published
    assert all(not o["unacked"] and not o["dropped"] for o in fleet.outcomes())
