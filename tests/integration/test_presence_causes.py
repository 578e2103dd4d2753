"""Presence from what the broker knows: each way a connection ends, with its cause, on the real broker.

Devices here never publish ``status`` (except where said): presence must not need it.
Device processes are real subprocesses (``tests/presence_device.py``) so that they
can be killed with SIGKILL or frozen with SIGSTOP; the network cut runs the device
in a network namespace this test creates (and always deletes).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from device_registry.models import Device, PresenceTransition
from iotfleet import dynsec
from tests.harness import Broker, Influxd
from tests.presence_device import device_process, raw_connect, raw_disconnect
from tests.registry_harness import (
    Api,
    connect_device,
    registry_settings,
    running_registry,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLUSH_S = 1.0  # the registry's presence flush interval
CEILING_S = 20.0
"""What a timeout may take here at most (keepalive 2 s): a correctness ceiling, not the speed figure."""


async def _history(api: Api, device_id: str, **params: Any) -> list[tuple[bool, str]]:
    resp = await api.http.get(f"/api/v1/devices/{device_id}/presence", params=params)
    assert resp.status_code == 200, resp.text
    return [(t["online"], t["cause"]) for t in resp.json()["items"]]


async def _online(api: Api, device_id: str) -> bool:
    resp = await api.http.get(f"/api/v1/devices/{device_id}")
    assert resp.status_code == 200, resp.text
    return bool(resp.json()["online"])


async def _wait_state(api: Api, device_id: str, online: bool, within: float = 5.0) -> None:
    async def check() -> bool:
        return await _online(api, device_id) is online

    await wait_for(check, what=f"{device_id} {'online' if online else 'offline'}", within=within)


async def _provision(api: Api, ids: list[str]) -> dict[str, str]:
    body = {"devices": [{"id": i, "type": "smart_plug"} for i in ids]}
    resp = await api.http.post("/api/v1/devices/bulk", json=body)
    assert resp.status_code == 201, resp.text
    return {d["id"]: d["credentials"]["password"] for d in resp.json()["devices"]}


async def test_clean_disconnect_kill_9_keepalive_expiry_and_take_over(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        clean, killed, frozen, taken = (uid(n) for n in ("clean", "kill", "stop", "take"))
        passwords = await _provision(api, [clean, killed, frozen, taken])
        await wait_for(lambda: api.state.presence.connected, what="presence link", within=5)

        # Keepalive expiry first (it takes 1.5 × keepalive): a frozen process sends no PINGREQ.
        keepalive = 2
        with device_process(
            [], broker.host, broker.port, frozen, passwords[frozen], keepalive=keepalive
        ) as proc:
            await _wait_state(api, frozen, True)
            os.kill(proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()

            # Meanwhile: a clean DISCONNECT (a device that never publishes status).
            client = connect_device(broker, clean, passwords[clean])
            await _wait_state(api, clean, True)
            client.close()
            await _wait_state(api, clean, False)

            # kill -9: the socket closes without DISCONNECT, the broker sends the will.
            with device_process(
                [], broker.host, broker.port, killed, passwords[killed], keepalive=30
            ) as victim:
                await _wait_state(api, killed, True)
                victim.kill()
                await _wait_state(api, killed, False)

            # The broker's bound is 1.5 × keepalive; the registry adds ≤ one flush (and a poll). The
            # documented figure comes from quiet runs; here only a ceiling that a loaded CI box keeps.
            await _wait_state(api, frozen, False, within=CEILING_S)
            took = time.monotonic() - stopped
            assert took <= CEILING_S, f"timeout noticed after {took:.1f} s"

        # Take-over: a second connection under the same client id. The old one ends without an
        # end line of its own; the device must stay online, with no offline transition.
        _reader, first = await raw_connect(broker.host, broker.port, taken, taken, passwords[taken])
        await _wait_state(api, taken, True)
        second = connect_device(broker, taken, passwords[taken])
        await asyncio.sleep(2 * FLUSH_S)  # let any (wrong) offline from the old connection be flushed
        await raw_disconnect(first, clean=False)
        await asyncio.sleep(FLUSH_S)
        assert await _online(api, taken)
        assert await _history(api, taken) == [(True, "connected")]
        second.close()
        await _wait_state(api, taken, False)

        assert await _history(api, clean) == [(True, "connected"), (False, "disconnected")]
        assert await _history(api, killed) == [(True, "connected"), (False, "will")]
        assert await _history(api, frozen) == [(True, "connected"), (False, "timeout")]
        assert await _history(api, taken) == [(True, "connected"), (False, "disconnected")]

        # The API: newest first, paging, bounds, problems.
        assert await _history(api, clean, order="desc", limit=1) == [(False, "disconnected")]
        first_page = (await api.http.get(f"/api/v1/devices/{clean}/presence", params={"limit": 1})).json()
        assert first_page["next_cursor"]
        second_page = (
            await api.http.get(
                f"/api/v1/devices/{clean}/presence", params={"limit": 1, "cursor": first_page["next_cursor"]}
            )
        ).json()
        assert [t["cause"] for t in first_page["items"] + second_page["items"]] == [
            "connected",
            "disconnected",
        ]
        assert second_page["next_cursor"] is None
        assert await _history(api, clean, start="2000-01-01T00:00:00Z", end="2000-01-02T00:00:00Z") == []
        for params in ({"start": "yesterday"}, {"end": "2026-12-01T10:00:00"}, {"cursor": "!!"}, {"start": "-99999999w"},
                       {"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}, {"limit": 0}):  # fmt: skip
            bad = await api.http.get(f"/api/v1/devices/{clean}/presence", params=params)
            assert bad.status_code == 422, (params, bad.text)
            assert bad.headers["content-type"].startswith("application/problem+json")
        missing = await api.http.get("/api/v1/devices/no-such-device/presence")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith(
            "application/problem"
        )
        assert (await api.as_(None).get(f"/api/v1/devices/{clean}/presence")).status_code == 401


async def test_live_status_formats_are_hints_and_unknown_ones_are_counted(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        device = uid("hint")
        password = (await _provision(api, [device]))[device]
        client = connect_device(broker, device, password)
        await _wait_state(api, device, True)
        status = f"devices/smart_plug/{device}/status"
        for payload in (b'{"status": "online"}', b'{"online": true}', b"ONLINE", b"[1]", b"maybe"):
            assert client.publish(status, payload).value == 0
        # "offline" from a connected device is only its word: the broker says it is connected.
        assert client.publish(status, b'{"status": "offline"}').value == 0

        async def counted() -> bool:
            text = (await api.http.get("/metrics")).text
            return "registry_presence_status_unparsed_total 2.0" in text

        await wait_for(counted, what="2 unknown status formats counted", within=5)
        await asyncio.sleep(FLUSH_S)
        assert await _online(api, device)
        client.close()
        await _wait_state(api, device, False)
        assert await _history(api, device) == [(True, "connected"), (False, "disconnected")]

        # Retention: older than IOTFLEET_REGISTRY__PRESENCE_HISTORY_DAYS (30) is pruned.
        async with api.state.sessions() as session:
            old = datetime.now(UTC) - timedelta(days=31)
            session.add(PresenceTransition(device_id=device, at=old, online=True, cause="connected"))
            await session.commit()
        assert len(await _history(api, device, start="-32d")) == 3
        assert await api.state.presence.prune() == 1
        assert len(await _history(api, device, start="-32d")) == 2


async def test_rotated_credentials_kick_and_refused_reconnects_change_nothing(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        device = uid("rotate")
        password = (await _provision(api, [device]))[device]
        client = connect_device(broker, device, password)  # paho retries with the old password
        await _wait_state(api, device, True)
        assert (await api.http.post(f"/api/v1/devices/{device}/rotate-credentials")).status_code == 200
        await _wait_state(api, device, False)
        await asyncio.sleep(2.5)  # paho's retries ("disconnected, not authorised") are no events
        assert await _history(api, device) == [(True, "connected"), (False, "kicked")]
        client.close()


@contextmanager
def _namespace_pair() -> Iterator[tuple[str, str, str]]:
    """A network namespace with a veth pair 10.213.N.1/30 (here) ↔ 10.213.N.2/30 (there); always removed."""
    tag = secrets.token_hex(3)
    ns, here, there = f"iotf-h16-{tag}", f"vh16a{tag}", f"vh16b{tag}"
    net = int(tag, 16) % 250
    local, remote = f"10.213.{net}.1", f"10.213.{net}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", ns)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{local}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{remote}/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, there, local
    finally:
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
async def test_network_cut_without_fin_is_a_timeout(tmp_path: Path, uid: Callable[[str], str]) -> None:
    with _namespace_pair() as (ns, there, local):
        broker = Broker(tmp_path / "mosquitto", host=local).start()
        try:
            async with running_registry(registry_settings(broker, tmp_path / "registry")) as api:
                device = uid("cut")
                password = (await _provision(api, [device]))[device]
                keepalive = 2
                inside = ["ip", "netns", "exec", ns]
                with device_process(inside, local, broker.port, device, password, keepalive=keepalive):
                    await _wait_state(api, device, True)
                    # The device's link goes down inside its namespace: no FIN, no RST reaches the broker.
                    link_down = await asyncio.create_subprocess_exec(
                        *inside, "ip", "link", "set", "dev", there, "down"
                    )
                    assert await link_down.wait() == 0
                    cut = time.monotonic()
                    await _wait_state(api, device, False, within=CEILING_S)
                    took = time.monotonic() - cut
                assert took <= CEILING_S, f"cut noticed after {took:.1f} s"
                assert await _history(api, device) == [(True, "connected"), (False, "timeout")]
        finally:
            broker.stop()


async def test_broker_restart_marks_everyone_offline_until_heard_again(
    fresh_broker: Broker, influxd: Influxd, database: str, tmp_path: Path, uid: Callable[[str], str]
) -> None:
    settings = registry_settings(fresh_broker, tmp_path).model_copy(
        update={"influx": influxd.settings_for(database)}
    )
    async with running_registry(settings) as api:
        device = uid("restart")
        password = (await _provision(api, [device]))[device]
        client = connect_device(fresh_broker, device, password)  # paho reconnects on its own
        await _wait_state(api, device, True)
        fresh_broker.restart()
        await _wait_state(api, device, False)
        await wait_for(lambda: api.state.presence.connected, what="presence link back", within=15)
        await wait_for(lambda: client.is_connected, what="device back", within=15)
        # Its reconnect may precede the registry's (then the connect line is missed): its next
        # message re-confirms it either way.
        assert client.publish(f"devices/smart_plug/{device}/telemetry", b"{}").value in (0, 16)
        await _wait_state(api, device, True)
        history = await _history(api, device)
        assert history[:2] == [(True, "connected"), (False, "broker_restart")], history
        assert history[-1][0] is True and history[-1][1] in ("connected", "message"), history
        # The fleet summary's online count is the same truth as the devices' online flag.
        summary = (await api.http.get("/api/v1/fleet/summary")).json()
        listed = (await api.http.get("/api/v1/devices", params={"online": "true"})).json()["items"]
        assert summary["totals"]["online"] == len(listed) == 1
        client.close()


async def test_a_thousand_devices_flapping(broker: Broker, tmp_path: Path, uid: Callable[[str], str]) -> None:
    count, rounds = 1000, 3
    prefix = uid("flap")
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    admin, password = dynsec.ADMIN_USER, broker.passwords[dynsec.ADMIN_USER]
    async with running_registry(registry_settings(broker, tmp_path)) as api:
        # Registry rows only: presence keys on the client id, and 1,000 dynsec clients would cost
        # the shared broker minutes of file rewrites; the connections use the admin account.
        now = datetime.now(UTC)
        async with api.state.sessions() as session:
            await session.execute(
                insert(Device),
                [{"id": i, "type": "smart_plug", "tags": {}, "meta": {}, "enabled": True, "online": False,
                  "credentials_rotated_at": now, "created_at": now, "updated_at": now} for i in ids],
            )  # fmt: skip
            await session.commit()
        await wait_for(lambda: api.state.presence.connected, what="presence link", within=5)
        gate = asyncio.Semaphore(200)

        async def connect(device_id: str) -> asyncio.StreamWriter:
            async with gate:
                _r, writer = await raw_connect(broker.host, broker.port, device_id, admin, password)
                return writer

        async def online_count() -> int:
            async with api.state.sessions() as session:
                stmt = select(func.count()).where(Device.id.like(f"{prefix}-%"), Device.online.is_(True))
                return int((await session.execute(stmt)).scalar_one())

        async def settle(expected: int) -> None:
            async def check() -> bool:
                return await online_count() == expected

            await wait_for(check, what=f"{expected} of {count} online", within=20, interval=0.2)

        started = time.monotonic()
        for _ in range(rounds):
            writers = await asyncio.gather(*(connect(i) for i in ids))
            await settle(count)
            # Half leave cleanly, half drop the connection (will).
            await asyncio.gather(*(raw_disconnect(w, clean=n % 2 == 0) for n, w in enumerate(writers)))
            await settle(0)
        writers = await asyncio.gather(*(connect(i) for i in ids))
        await asyncio.gather(*(raw_disconnect(w, clean=True) for w in writers[count // 2 :]))
        await settle(count // 2)
        await asyncio.sleep(2 * FLUSH_S)  # nothing late changes the final state
        flapping_s = time.monotonic() - started

        async with api.state.sessions() as session:
            rows = await session.execute(
                select(Device.id, Device.online).where(Device.id.like(f"{prefix}-%")).order_by(Device.id)
            )
            final = dict(rows.all())
            per_device = dict(
                (
                    await session.execute(
                        select(PresenceTransition.device_id, func.count())
                        .where(PresenceTransition.device_id.like(f"{prefix}-%"))
                        .group_by(PresenceTransition.device_id)
                    )
                ).all()
            )
            causes = dict(
                (
                    await session.execute(
                        select(PresenceTransition.cause, func.count())
                        .where(PresenceTransition.device_id.like(f"{prefix}-%"))
                        .group_by(PresenceTransition.cause)
                    )
                ).all()
            )
        assert final == {i: n < count // 2 for n, i in enumerate(ids)}
        # Each round: online + offline; then online, and offline again for the second half.
        expected = {i: 2 * rounds + (1 if n < count // 2 else 2) for n, i in enumerate(ids)}
        assert per_device == expected
        assert causes == {
            "connected": count * (rounds + 1),
            "disconnected": count // 2 * rounds + count // 2,
            "will": count // 2 * rounds,
        }
        print(
            f"{count} devices × {rounds + 1} connections: {flapping_s:.1f} s, {sum(causes.values())} transitions"
        )
