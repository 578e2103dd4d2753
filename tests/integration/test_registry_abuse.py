"""API abuse against the real registry (real broker, SQLite): each case gets a 4xx problem, never a 5xx,
and the platform keeps working afterwards (service accounts intact, health ok, an ingest still stores).

Cases: device ids colliding with the platform's broker accounts (exact, case variants, whitespace,
look-alikes), malformed ids (wildcards, '/', '$', NUL, over-long), bodies too large or nested too
deep on every endpoint taking one, huge tags/metadata, rule definitions too deep or too large, a bad
rule row left by an older version, and broker entries the registry did not create.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_registry.models import Device
from device_registry.models_rules import RuleRow
from iotfleet import dynsec
from iotfleet.reserved_names import PLATFORM_ROLES, PLATFORM_USERS
from iotfleet.settings import RulesSettings
from iotfleet.stack import probes
from iotfleet.topics import Channel, device_topic
from rules_engine.sources import parse_rules
from tests.harness import Broker, Influxd
from tests.ingest_support import IngestProcess, device_rows, wait_for
from tests.registry_harness import Api, connect_device, registry_settings, running_registry

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"

RESERVED_IDS = [
    *PLATFORM_USERS,
    "IOTFLEET-INGEST",
    "Iotfleet-Rules",
    "iotfleet-rules-out",
    "iotfleet-registry-admin-1a2b3c4d",
    "iotfleet",
    "iotfleetx",
    "ingest-thermostat-0",
    "INGEST-thermostat-0",
    "svc-ingest",
    "admin",
    "ADMIN",
    "root",
    "mosquitto",
]
MALFORMED_IDS = [
    " iotfleet-ingest",
    "iotfleet-ingest ",
    "iotfleet-ingest\n",
    "iotfleet-ingest\t",
    "іotfleet-ingest",  # Cyrillic і: ids are ASCII only, so look-alikes never pass
    "ｉｏｔｆｌｅｅｔ-ingest",  # fullwidth
    "iotfleet\u200b-ingest",  # zero-width space
    "a" * 65,
    "a" * 10_000,
    "",
    "dev/1",
    "dev+1",
    "dev#",
    "#",
    "+",
    "$SYS",
    "$share",
    "dev\x00x",
    "-starts-with-dash",
    ".hidden",
    "dev 1",
    "dev%2F1",
]


def assert_problem(resp: httpx.Response, status: int, *, error_type: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text[:500]}"
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["detail"], body
    if error_type is not None:
        assert error_type in {e["type"] for e in body.get("errors", [])}, body
    return body


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def deep_when(levels: int) -> dict[str, Any]:
    """A condition tree ``levels`` deep: ``all`` wrappers around one field condition."""
    condition: dict[str, Any] = {"field": "temperature_c", "op": ">", "value": 30}
    for _ in range(levels - 1):
        condition = {"all": [condition]}
    return condition


def rule(name: str, when: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "scope": {"device_type": "thermostat"},
        "when": when,
        "then": [{"alert": {"severity": "major", "message": "hot"}}],
        **extra,
    }


async def assert_platform_intact(api: Api, broker: Broker) -> None:
    """Service accounts still hold their roles, still log in; the registry is healthy."""
    clients = {c["username"]: c for c in await api.state.broker.list_clients()}
    roles_of = {u: sorted(r["rolename"] for r in c.get("roles", [])) for u, c in clients.items()}
    assert roles_of["iotfleet-ingest"] == ["svc-ingest"]
    assert roles_of["iotfleet-rules"] == ["svc-rules"]
    assert roles_of["iotfleet-registry"] == ["admin", "svc-registry"]
    assert roles_of[dynsec.ADMIN_USER] == ["admin"]
    for username in ("iotfleet-ingest", "iotfleet-rules"):
        assert clients[username].get("textname") != "iotfleet device"
        assert probes.mqtt_ok(broker.host, broker.port, username, broker.passwords[username])
    role_names = {r["rolename"] for r in await api.state.broker.list_roles()}
    assert set(PLATFORM_ROLES) <= role_names
    health = await api.http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


async def test_reserved_and_malformed_ids_are_refused(
    broker: Broker, registry_root: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, registry_root)) as api:
        for device_id in RESERVED_IDS:
            body = assert_problem(
                await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"}),
                422,
                error_type="reserved_name",
            )
            assert "reserved" in body["detail"], body
        for device_id in MALFORMED_IDS:
            assert_problem(
                await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"}), 422
            )
        # Bulk: all or nothing; the problem names the entry.
        ok_id = uid("fine")
        body = assert_problem(
            await api.http.post(
                "/api/v1/devices/bulk",
                json={
                    "devices": [
                        {"id": ok_id, "type": "thermostat"},
                        {"id": "iotfleet-ingest", "type": "thermostat"},
                    ]
                },
            ),
            422,
            error_type="reserved_name",
        )
        assert any(e["field"] == "body.devices.1.id" for e in body["errors"]), body
        assert (await api.http.get(f"/api/v1/devices/{ok_id}")).status_code == 404
        # Path ids of other endpoints: bounded, never a 5xx.
        for device_id in ("iotfleet-ingest", "a" * 65, "%24SYS", "x%00y"):
            resp = await api.http.post(f"/api/v1/devices/{device_id}/disable")
            assert resp.status_code in (404, 422), resp.text
            assert resp.headers["content-type"].startswith(PROBLEM)
        await assert_platform_intact(api, broker)


async def test_configured_service_client_ids_are_reserved_too(broker: Broker, registry_root: Path) -> None:
    # A deployment may give the rules engine another client id; the engine derives -out, -tracker-… from it.
    settings = registry_settings(broker, registry_root).model_copy(
        update={"rules": RulesSettings(client_id="fleet-rules")}
    )
    async with running_registry(settings) as api:
        for device_id in ("fleet-rules", "Fleet-Rules-out", "fleet-rules-tracker-x"):
            body = assert_problem(
                await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"}),
                422,
                error_type="reserved_name",
            )
            assert body["errors"][0]["field"] == "body.id", body
        body = assert_problem(
            await api.http.post(
                "/api/v1/devices/bulk",
                json={"devices": [{"type": "thermostat"}, {"id": "fleet-rules-out", "type": "thermostat"}]},
            ),
            422,
            error_type="reserved_name",
        )
        assert body["errors"][0]["field"] == "body.devices.1.id", body
        created = await api.http.post("/api/v1/devices", json={"id": "fleet-rule", "type": "thermostat"})
        assert created.status_code == 201, created.text
        assert (await api.http.delete("/api/v1/devices/fleet-rule")).status_code == 204


async def test_bodies_too_large_or_too_deep_on_every_endpoint(
    broker: Broker, registry_root: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, registry_root)) as api:
        device_id = uid("dev")
        assert (
            await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"})
        ).status_code == 201
        created = await api.http.post("/api/v1/rules", json=rule(uid("r"), deep_when(1)))
        assert created.status_code == 201, created.text
        rule_id = created.json()["id"]
        endpoints = [
            ("POST", "/api/v1/devices"),
            ("POST", "/api/v1/devices/bulk"),
            ("PATCH", f"/api/v1/devices/{device_id}"),
            ("POST", f"/api/v1/devices/{device_id}/commands"),
            ("POST", "/api/v1/rules"),
            ("PUT", f"/api/v1/rules/{rule_id}"),
            ("POST", "/api/v1/api-keys"),
        ]
        for depth in (40, 5_000, 200_000):
            for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
                for method, path in endpoints:
                    resp = await api.http.request(
                        method, path, content=text, headers={"content-type": "application/json"}
                    )
                    assert_problem(resp, 422, error_type="json_too_deep")
        # Just under the bound, a body is parsed and judged on its content (here: not a device).
        assert_problem(await api.http.post("/api/v1/devices", json=nested(31)), 422)
        # Metadata is bounded in depth too (deeper could not be served back).
        assert_problem(
            await api.http.patch(f"/api/v1/devices/{device_id}", json={"metadata": nested(9)}), 422
        )
        assert (
            await api.http.patch(f"/api/v1/devices/{device_id}", json={"metadata": nested(7)})
        ).status_code == 200
        # Too large: by Content-Length at once, and a chunked body while it arrives.
        big = b'{"devices": [' + b'{"type": "thermostat", "name": "' + b"x" * (9 * 1024 * 1024) + b'"}]}'
        assert_problem(
            await api.http.post(
                "/api/v1/devices/bulk", content=big, headers={"content-type": "application/json"}
            ),
            413,
        )

        async def chunks() -> Any:
            for start in range(0, len(big), 1 << 20):
                yield big[start : start + (1 << 20)]

        assert_problem(
            await api.http.post(
                "/api/v1/devices/bulk", content=chunks(), headers={"content-type": "application/json"}
            ),
            413,
        )
        # Without a key, nothing is read: 401 before any parsing, whatever the body.
        async with api.as_(None) as anonymous:
            for content in (big, b"[" * 100_000, b'{"type": "thermostat"}'):
                resp = await anonymous.post(
                    "/api/v1/devices/bulk", content=content, headers={"content-type": "application/json"}
                )
                assert_problem(resp, 401)
                assert resp.headers["www-authenticate"].startswith("Bearer")
        # Bulk past its item bound, huge tags and metadata: 422.
        too_many = {"devices": [{"type": "thermostat"}] * 10_001}
        assert_problem(await api.http.post("/api/v1/devices/bulk", json=too_many), 422)
        tags_cases: list[dict[str, Any]] = [
            {f"k{i}": "v" for i in range(65)},
            {"k": "v" * 257},
            {"k" * 65: "v"},
            {"bad key": "v"},
            {"k": {"nested": "v"}},
        ]
        for tags in tags_cases:
            assert_problem(
                await api.http.post("/api/v1/devices", json={"type": "thermostat", "tags": tags}), 422
            )
        assert_problem(
            await api.http.post(
                "/api/v1/devices", json={"type": "thermostat", "metadata": {"blob": "x" * 20_000}}
            ),
            422,
        )
        # Not UTF-8 JSON: a documented 400 or 422, never a 5xx.
        resp = await api.http.post(
            "/api/v1/devices", content=b"\xff\xfe{", headers={"content-type": "application/json"}
        )
        assert resp.status_code in (400, 422) and resp.headers["content-type"].startswith(PROBLEM), resp.text
        # Every list still serves.
        for path in (
            "/api/v1/devices",
            "/api/v1/rules",
            f"/api/v1/devices/{device_id}",
            f"/api/v1/rules/{rule_id}",
        ):
            assert (await api.http.get(path)).status_code == 200, path
        await assert_platform_intact(api, broker)


async def test_rule_depth_and_size_are_bounded_and_old_bad_rows_never_break_reads(
    broker: Broker, registry_root: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, registry_root)) as api:
        # The case of the issue: a `when` 127 levels deep: 422, not stored.
        deep_name = uid("deep")
        body = assert_problem(await api.http.post("/api/v1/rules", json=rule(deep_name, deep_when(127))), 422)
        # (The body bound answers first; the rule model refuses it too: see the unit tests.)
        assert {e["type"] for e in body["errors"]} & {"json_too_deep", "rule_too_deep"}, body
        assert_problem(
            await api.http.post("/api/v1/rules", json=rule(deep_name, deep_when(9))),
            422,
            error_type="rule_too_deep",
        )
        names = [
            r["name"] for r in (await api.http.get("/api/v1/rules", params={"limit": 1000})).json()["items"]
        ]
        assert deep_name not in names
        # At the bound: stored, and every read and the engine's parse work.
        ok = await api.http.post("/api/v1/rules", json=rule(deep_name, deep_when(8), clear_when=deep_when(8)))
        assert ok.status_code == 201, ok.text
        # Too many conditions, too large a definition: 422.
        wide = {"any": [{"all": [{"field": "temperature_c", "op": ">", "value": i}] * 32} for i in range(9)]}
        assert_problem(
            await api.http.post("/api/v1/rules", json=rule(uid("wide"), wide)),
            422,
            error_type="rule_too_large",
        )
        huge_scope = {"device_type": "thermostat", "tags": {f"k{i}": "v" * 200 for i in range(400)}}
        big = rule(uid("big"), deep_when(1))
        big["scope"] = huge_scope
        assert_problem(await api.http.post("/api/v1/rules", json=big), 422, error_type="rule_too_large")
        # PUT is bounded the same way and leaves the stored rule as it was.
        rule_id = ok.json()["id"]
        assert_problem(
            await api.http.put(f"/api/v1/rules/{rule_id}", json=rule(deep_name, deep_when(127))), 422
        )
        assert (await api.http.get(f"/api/v1/rules/{rule_id}")).json()["version"] == 1

        # A row an older registry stored past the bounds: reads flag it, never 500.
        bad_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        async with api.state.sessions() as session:
            session.add(
                RuleRow(
                    id=bad_id,
                    name=uid("legacy"),
                    device_type="thermostat",
                    enabled=True,
                    version=1,
                    definition=rule("legacy", deep_when(127)),
                    created_by="older-version",
                    created_at=now,
                    updated_at=now,
                )
            )
            await session.commit()
        listed = await api.http.get("/api/v1/rules", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        items = {r["id"]: r for r in listed.json()["items"]}
        assert "rule_too_deep" not in items[bad_id]["invalid"] and "deeper" in items[bad_id]["invalid"]
        assert "when" not in items[bad_id] and "when" in items[rule_id]
        one = await api.http.get(f"/api/v1/rules/{bad_id}")
        assert one.status_code == 200 and one.json()["invalid"], one.text
        assert_problem(
            await api.http.post(
                f"/api/v1/rules/{bad_id}/backtest",
                params={"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
            ),
            409,
        )
        # The engine loads what the API serves: the good rule, the flagged one skipped.
        parsed = {r.id for r in parse_rules(listed.json()["items"])}
        assert rule_id in parsed and bad_id not in parsed
        # The flagged rule can be replaced with a valid definition, or deleted.
        fixed = await api.http.put(f"/api/v1/rules/{bad_id}", json=rule(uid("fixed"), deep_when(2)))
        assert fixed.status_code == 200 and "invalid" not in fixed.json(), fixed.text
        assert (await api.http.delete(f"/api/v1/rules/{bad_id}")).status_code == 204
        await assert_platform_intact(api, broker)


async def test_registry_never_touches_broker_entries_it_did_not_create(
    broker: Broker, registry_root: Path, uid: Callable[[str], str]
) -> None:
    async with running_registry(registry_settings(broker, registry_root)) as api:
        # Another tool's client under a would-be device id: provisioning refuses, the entry survives.
        foreign = uid("foreign")
        await api.state.broker.run(
            [{"command": "createClient", "username": foreign, "password": "theirs", "textname": "other tool"}]
        )
        body = assert_problem(
            await api.http.post("/api/v1/devices", json={"id": foreign, "type": "thermostat"}), 409
        )
        assert body["type"].endswith("broker-entry-not-managed") and body["device_ids"] == [foreign], body
        # A bulk with it: nothing of the bulk remains, the foreign entry does.
        other = uid("other")
        assert_problem(
            await api.http.post(
                "/api/v1/devices/bulk",
                json={
                    "devices": [{"id": other, "type": "thermostat"}, {"id": foreign, "type": "thermostat"}]
                },
            ),
            409,
        )
        clients = {c["username"]: c for c in await api.state.broker.list_clients()}
        assert clients[foreign].get("textname") == "other tool" and other not in clients
        still = connect_device(broker, foreign, "theirs")
        assert not still.connack.is_failure  # type: ignore[union-attr]
        still.close()

        # A device another tool made a dynsec client for (dynsec answers before the device file): no change goes through.
        device_id = uid("taken")
        assert (
            await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"})
        ).status_code == 201
        await api.state.broker.run(
            [
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": "theirs",
                    "textname": "other tool",
                },
            ]
        )
        for method, path in (
            ("POST", f"/api/v1/devices/{device_id}/disable"),
            ("POST", f"/api/v1/devices/{device_id}/rotate-credentials"),
            ("DELETE", f"/api/v1/devices/{device_id}"),
        ):
            assert_problem(await api.http.request(method, path), 409)
        report = (await api.http.post("/api/v1/reconcile")).json()
        kinds = {d["device_id"]: d["kind"] for d in report["drift"]}
        assert kinds.get(device_id) == "foreign_entry", report
        clients = {c["username"]: c for c in await api.state.broker.list_clients()}
        assert clients[device_id].get("textname") == "other tool" and not clients[device_id].get("disabled")

        # A device row an older registry let in under a platform name: reconcile leaves the
        # account alone, and deleting the device drops the row only.
        async with api.state.sessions() as session:
            now = datetime.now(UTC)
            session.add(
                Device(
                    id="iotfleet-ingest", type="thermostat", tags={}, meta={}, enabled=False, online=False,
                    credentials_rotated_at=now, created_at=now, updated_at=now,
                )
            )  # fmt: skip
            await session.commit()
        report = (await api.http.post("/api/v1/reconcile")).json()
        assert {d["device_id"]: d["kind"] for d in report["drift"]}.get("iotfleet-ingest") == "foreign_entry"
        assert (await api.http.post("/api/v1/devices/iotfleet-ingest/disable")).status_code == 409
        assert (await api.http.delete("/api/v1/devices/iotfleet-ingest")).status_code == 204
        assert (await api.http.get("/api/v1/devices/iotfleet-ingest")).status_code == 404
        # The clean-up of this test's foreign entries (as another tool would).
        await api.state.broker.run([{"command": "deleteClient", "username": u} for u in (foreign, device_id)])
        async with api.state.sessions() as session:
            row = await session.get(Device, device_id)
            assert row is not None
            await session.delete(row)
            await session.commit()
        await assert_platform_intact(api, broker)


async def test_405_lists_every_method_and_openapi_documents_problems(
    broker: Broker, registry_root: Path
) -> None:
    async with running_registry(registry_settings(broker, registry_root)) as api:
        resp = await api.http.put("/api/v1/devices/some-device")
        assert_problem(resp, 405)
        assert {"GET", "PATCH", "DELETE"} <= {m.strip() for m in resp.headers["allow"].split(",")}
        resp = await api.http.request("OPTIONS", "/api/v1/rules")
        assert {"GET", "POST"} <= {m.strip() for m in resp.headers["allow"].split(",")}
        schema = (await api.http.get("/openapi.json")).json()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                for status, response in operation["responses"].items():
                    if int(status) >= 400 and (path, status) != ("/healthz", "503"):
                        assert list(response["content"]) == [PROBLEM], (method, path, status)
                if "requestBody" in operation:
                    assert {"400", "413", "422"} <= operation["responses"].keys(), (method, path)


@pytest.fixture
def ingest(fresh_broker: Broker, influxd: Influxd, database: str, tmp_path: Path) -> Iterator[IngestProcess]:
    # A broker of its own: on the shared one, an earlier test's offline ingest session (shared
    # subscription, persistent) would take a share of the readings (telemetry_ingest/README.md).
    process = IngestProcess(fresh_broker, influxd, database, tmp_path / "ingest").start()
    process.wait_healthy()
    yield process
    process.terminate()


async def test_after_the_abuse_an_ingest_still_stores_a_valid_reading(  # noqa: PLR0917  (fixtures)
    fresh_broker: Broker,
    influxd: Influxd,
    database: str,
    ingest: IngestProcess,
    registry_root: Path,
    uid: Callable[[str], str],
) -> None:
    broker = fresh_broker
    async with running_registry(registry_settings(broker, registry_root)) as api:
        for device_id in ("iotfleet-ingest", "IOTFLEET-INGEST", "ingest-thermostat-0"):
            assert_problem(
                await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"}), 422
            )
        assert_problem(await api.http.post("/api/v1/rules", json=rule(uid("deep"), deep_when(127))), 422)
        device_id = uid("after")
        created = await api.http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"})
        assert created.status_code == 201, created.text
        password = created.json()["credentials"]["password"]
        await assert_platform_intact(api, broker)
    device = connect_device(broker, device_id, password)
    try:
        reading = {"ts": int(datetime.now(UTC).timestamp() * 1000), "seq": 1, "temperature_c": 21.5,
                   "humidity_pct": 40.0, "setpoint_c": 21.0, "mode": "heat"}  # fmt: skip
        # 0, not 16 (no subscriber): the ingest's subscription is live, so the reading is routed to it.
        assert (
            device.publish(
                device_topic("thermostat", device_id, Channel.TELEMETRY), json.dumps(reading)
            ).value
            == 0
        )
    finally:
        device.close()
    rows = wait_for(
        lambda: device_rows(influxd, database, "thermostat", device_id), timeout=20, what="the reading stored"
    )
    assert rows[0]["temperature_c"] == 21.5
    assert ingest.health() is not None and ingest.proc is not None and ingest.proc.poll() is None
