"""The registry API suite, run on SQLite and on a throwaway PostgreSQL (real broker both times)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from device_registry.routers import api_keys, device_types, devices, reconcile
from device_registry.routers import health as health_router
from iotfleet.catalogue import DEVICE_TYPES
from tests.harness import Broker
from tests.registry_harness import (  # noqa: F401  (fixtures)
    Api,
    database_url,
    postgres,
    registry_settings,
    running_registry,
)

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


@pytest.fixture
async def api(broker: Broker, tmp_path: Path, database_url: str) -> AsyncIterator[Api]:  # noqa: F811
    async with running_registry(registry_settings(broker, tmp_path, database_url)) as running:
        yield running


async def _key(api: Api, role: str) -> str:
    resp = await api.http.post("/api/v1/api-keys", json={"name": f"{role} key", "role": role})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


def _is_problem(resp: object, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    assert resp.headers["content-type"].startswith(PROBLEM)  # type: ignore[attr-defined]
    body: dict[str, object] = resp.json()  # type: ignore[attr-defined]
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


# Every route but /healthz, with a body valid enough to pass validation.
ROUTES = [
    ("GET", "/api/v1/device-types", None),
    ("GET", "/api/v1/device-types/thermostat", None),
    ("GET", "/api/v1/devices", None),
    ("POST", "/api/v1/devices", {"type": "thermostat"}),
    ("POST", "/api/v1/devices/bulk", {"devices": [{"type": "thermostat"}]}),
    ("GET", "/api/v1/devices/x", None),
    ("PATCH", "/api/v1/devices/x", {"name": "n"}),
    ("DELETE", "/api/v1/devices/x", None),
    ("POST", "/api/v1/devices/x/disable", None),
    ("POST", "/api/v1/devices/x/enable", None),
    ("POST", "/api/v1/devices/x/rotate-credentials", None),
    ("GET", "/api/v1/api-keys/me", None),
    ("GET", "/api/v1/api-keys", None),
    ("POST", "/api/v1/api-keys", {"name": "k", "role": "viewer"}),
    ("DELETE", "/api/v1/api-keys/x", None),
    ("GET", "/api/v1/reconcile", None),
    ("POST", "/api/v1/reconcile", None),
    ("GET", "/metrics", None),
]
VIEWER_MAY = {
    ("GET", p)
    for m, p, _ in ROUTES
    if m == "GET" and ("api-keys" not in p or p.endswith("/me")) and "reconcile" not in p
}


async def test_every_endpoint_needs_a_key_and_the_right_role(api: Api) -> None:
    # ROUTES covers every operation of the registry's own routers.
    ours = {
        (method, route.path)
        for module in (api_keys, device_types, devices, health_router, reconcile)
        for route in module.router.routes
        if isinstance(route, APIRoute) and route.path != "/healthz"
        for method in route.methods
    }
    templated = {(m, p.replace("/x", "/{device_id}").replace("keys/{device_id}", "keys/{key_id}")
                  .replace("types/thermostat", "types/{type_name}")) for m, p, _ in ROUTES}  # fmt: skip
    assert ours == templated, ours ^ templated

    # Every operation of the whole API (other routers' too) refuses a request without a key.
    schema = api.app.openapi()
    async with api.as_(None) as anonymous:
        for path, operations in schema["paths"].items():
            if path == "/healthz":
                continue
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            for method in operations:
                resp = await anonymous.request(method.upper(), concrete, json={})
                _is_problem(resp, 401)
                assert operations[method].get("security"), f"{method} {path} documents no security"

    viewer = await _key(api, "viewer")
    operator = await _key(api, "operator")
    async with api.as_(None) as anonymous, api.as_("ifk_not-a-key") as forged:
        for method, path, body in ROUTES:
            resp = await anonymous.request(method, path, json=body)
            _is_problem(resp, 401)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            _is_problem(await forged.request(method, path, json=body), 401)
    for key in (viewer, operator):
        async with api.as_(key) as client:
            for method, path, body in ROUTES:
                resp = await client.request(method, path, json=body)
                if (method, path) in VIEWER_MAY:
                    assert resp.status_code in (200, 404), (method, path, resp.text)
                else:
                    _is_problem(resp, 403)
    async with api.as_(None) as anonymous:
        health = await anonymous.get("/healthz")
        assert (await anonymous.get("/docs")).status_code == 200
        assert (await anonymous.get("/openapi.json")).json()["components"]["securitySchemes"]
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"
    assert health.json()["reconcile"]["ok"] is True


async def test_device_types_expose_the_catalogue_schemas(api: Api) -> None:
    resp = await api.http.get("/api/v1/device-types")
    assert resp.status_code == 200
    assert [t["name"] for t in resp.json()["items"]] == list(DEVICE_TYPES)
    resp = await api.http.get("/api/v1/device-types/air_quality")
    body = resp.json()
    assert body["reading_schema"] == DEVICE_TYPES["air_quality"].reading_schema()
    assert "reboot" in body["command_schemas"]
    _is_problem(await api.http.get("/api/v1/device-types/toaster"), 404)


async def test_device_lifecycle_and_problems(api: Api, uid: Callable[[str], str]) -> None:
    device_id = uid("life")
    resp = await api.http.post(
        "/api/v1/devices",
        json={"id": device_id, "type": "gps_tracker", "name": "Truck 7", "tags": {"site": "north"},
              "metadata": {"vin": "X1"}},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["credentials"]["password"] and created["enabled"] and not created["online"]
    assert created["metadata"] == {"vin": "X1"} and created["last_seen"] is None

    body = _is_problem(
        await api.http.post("/api/v1/devices", json={"id": device_id, "type": "gps_tracker"}), 409
    )
    assert device_id in str(body["detail"])
    generated = (await api.http.post("/api/v1/devices", json={"type": "smart_plug"})).json()
    assert generated["id"].startswith("smart-plug-")

    got = (await api.http.get(f"/api/v1/devices/{device_id}")).json()
    assert "credentials" not in got and got["tags"] == {"site": "north"} and got["type"] == "gps_tracker"

    resp = await api.http.patch(f"/api/v1/devices/{device_id}", json={"tags": {"site": "south", "tier": "1"}})
    assert resp.status_code == 200 and resp.json()["tags"] == {"site": "south", "tier": "1"}
    assert resp.json()["name"] == "Truck 7"  # untouched
    _is_problem(await api.http.patch(f"/api/v1/devices/{device_id}", json={"type": "thermostat"}), 422)

    rotated = await api.http.post(f"/api/v1/devices/{device_id}/rotate-credentials")
    assert rotated.status_code == 200
    assert rotated.json()["credentials"]["password"] != created["credentials"]["password"]
    assert (await api.http.post(f"/api/v1/devices/{device_id}/disable")).json()["enabled"] is False
    assert (await api.http.post(f"/api/v1/devices/{device_id}/enable")).json()["enabled"] is True

    assert (await api.http.delete(f"/api/v1/devices/{device_id}")).status_code == 204
    for method, suffix in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/disable"),
                           ("POST", "/enable"), ("POST", "/rotate-credentials")]:  # fmt: skip
        _is_problem(await api.http.request(method, f"/api/v1/devices/{device_id}{suffix}", json={}), 404)


async def test_bad_input_is_422_with_errors(api: Api) -> None:
    cases = [
        {"type": "toaster"},
        {"id": "bad id/with+wildcards", "type": "thermostat"},
        {"id": "x" * 65, "type": "thermostat"},
        {"type": "thermostat", "tags": {"bad key": "v"}},
        {"type": "thermostat", "tags": {"k": 1}},
        {"type": "thermostat", "unexpected": True},
        {},
    ]
    for body in cases:
        problem = _is_problem(await api.http.post("/api/v1/devices", json=body), 422)
        assert problem["errors"], body
    _is_problem(
        await api.http.post(
            "/api/v1/devices", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
    )
    _is_problem(await api.http.post("/api/v1/devices/bulk", json={"devices": []}), 422)
    too_many = {"devices": [{"type": "thermostat"}] * 10_001}
    _is_problem(await api.http.post("/api/v1/devices/bulk", json=too_many), 422)
    _is_problem(await api.http.get("/api/v1/devices", params={"limit": 0}), 422)
    _is_problem(await api.http.get("/api/v1/devices", params={"cursor": "%%%"}), 422)
    _is_problem(await api.http.get("/api/v1/devices", params={"tag": "novalue"}), 422)
    _is_problem(await api.http.get("/api/v1/devices", params={"online": "maybe"}), 422)
    _is_problem(await api.http.post("/api/v1/api-keys", json={"name": "k", "role": "root"}), 422)


async def test_bulk_conflicts_are_all_or_nothing(api: Api, uid: Callable[[str], str]) -> None:
    existing = uid("bulk-x")
    assert (
        await api.http.post("/api/v1/devices", json={"id": existing, "type": "thermostat"})
    ).status_code == 201
    fresh = uid("bulk-new")
    body = {"devices": [{"id": fresh, "type": "thermostat"}, {"id": existing, "type": "thermostat"}]}
    problem = _is_problem(await api.http.post("/api/v1/devices/bulk", json=body), 409)
    assert problem["conflicting_ids"] == [existing]
    _is_problem(await api.http.get(f"/api/v1/devices/{fresh}"), 404)
    repeated = {"devices": [{"id": fresh, "type": "thermostat"}, {"id": fresh, "type": "smart_plug"}]}
    _is_problem(await api.http.post("/api/v1/devices/bulk", json=repeated), 409)


async def test_list_filters_and_cursor_pagination(api: Api, uid: Callable[[str], str]) -> None:
    prefix = uid("lst")
    devices = [
        {"id": f"{prefix}-{i:02d}", "type": "thermostat" if i % 2 else "smart_plug",
         "name": f"Room {i}", "tags": {"floor": str(i % 3), "site": "hq"}}
        for i in range(25)
    ]  # fmt: skip
    assert (await api.http.post("/api/v1/devices/bulk", json={"devices": devices})).status_code == 201

    seen: list[str] = []
    cursor = None
    while True:
        params = {"q": prefix, "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = (await api.http.get("/api/v1/devices", params=params)).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(d["id"] for d in devices)

    async def ids(**params: object) -> set[str]:
        resp = await api.http.get("/api/v1/devices", params={"q": prefix, "limit": 1000, **params})
        assert resp.status_code == 200, resp.text
        return {d["id"] for d in resp.json()["items"]}

    assert await ids(type="thermostat") == {d["id"] for d in devices if d["type"] == "thermostat"}
    assert await ids(tag="floor=1") == {d["id"] for d in devices if d["tags"]["floor"] == "1"}
    assert await ids(tag=["floor=1", "site=hq"]) == await ids(tag="floor=1")
    assert await ids(tag="floor=9") == set()
    assert await ids(online="true") == set()
    assert len(await ids(online="false")) == 25
    assert await ids(q="room 1") <= await ids()
    assert await ids(q=f"{prefix}-07") == {f"{prefix}-07"}
    assert await ids(q="%") == set()  # LIKE wildcards are literal


async def test_api_keys(api: Api) -> None:
    created = (await api.http.post("/api/v1/api-keys", json={"name": "ci", "role": "operator"})).json()
    assert created["key"].startswith("ifk_") and created["role"] == "operator"
    listed = (await api.http.get("/api/v1/api-keys")).json()["items"]
    assert {k["name"] for k in listed} >= {"ci", "bootstrap-admin"}
    assert all("key" not in k for k in listed)
    async with api.as_(created["key"]) as operator:
        assert (await operator.get("/api/v1/devices")).status_code == 200
    assert (await api.http.delete(f"/api/v1/api-keys/{created['id']}")).status_code == 204
    async with api.as_(created["key"]) as operator:
        _is_problem(await operator.get("/api/v1/devices"), 401)
    _is_problem(await api.http.delete(f"/api/v1/api-keys/{created['id']}"), 404)
    # The last admin key cannot be deleted (nobody could manage keys any more).
    [bootstrap] = [k for k in listed if k["name"] == "bootstrap-admin"]
    _is_problem(await api.http.delete(f"/api/v1/api-keys/{bootstrap['id']}"), 409)


async def test_metrics_and_reconcile_endpoints(api: Api) -> None:
    await api.http.get("/api/v1/devices")
    text = (await api.http.get("/metrics")).text
    assert 'registry_http_requests_total{method="GET",route="/api/v1/devices",status="200"}' in text
    assert 'registry_broker_connected{link="admin"} 1.0' in text
    report = (await api.http.post("/api/v1/reconcile")).json()
    assert report["ok"] is True
    assert (await api.http.get("/api/v1/reconcile")).json()["finished_at"] == report["finished_at"]
