"""Registry tags reach telemetry queries: group and filter by tags set on devices in the registry.

Same data set as test_query_api.py (tests/query_harness.py): the points carry
only ``device_id`` (and a ``site`` point tag on some), while ``building`` exists
only in the registry, set here through the API. Expected values are written
out by hand from the data set.
"""

from __future__ import annotations

import pytest

from device_registry.telemetry import registry_tags
from tests.query_harness import World, get, world_fixture  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PATH = "/api/v1/device-types/thermostat/telemetry/aggregate"


async def _tag(w: World, device_id: str, tags: dict[str, str]) -> None:
    resp = await w.api.http.patch(f"/api/v1/devices/{device_id}", json={"tags": tags})
    assert resp.status_code == 200, resp.text


async def test_group_by_and_filter_by_a_registry_tag(world: World) -> None:
    w = world
    await _tag(w, w.a, {"building": "north"})
    await _tag(w, w.multi, {"building": "north"})
    await _tag(w, w.b, {"building": "south"})
    window = {"fields": "temperature_c", "start": w.t0, "end": w.t(5), "fn": "mean", "every": "5m"}
    # In the first 5 minutes: a 20..29 (sum 245, 10 points), multi 1, 2, 3, 4, b 10 x 5.
    body = await get(w, PATH, **window, group_by="building")
    assert body["group_by"] == "building"
    by_building = {g["tags"]["building"]: g["points"][0]["temperature_c"] for g in body["groups"]}
    assert by_building == {"north": pytest.approx(255 / 14), "south": 10.0}
    # Per-minute buckets keep their gaps (fill=null), like any aggregate.
    minutes = await get(w, PATH, **{**window, "every": "1m"}, group_by="building", fill="null")
    south = next(g for g in minutes["groups"] if g["tags"] == {"building": "south"})
    assert [p["temperature_c"] for p in south["points"]] == [10.0] * 5

    body = await get(w, PATH, **window, tag="building=north")
    assert body["tags"] == {"building": "north"}
    assert [g["points"][0]["temperature_c"] for g in body["groups"]] == [pytest.approx(255 / 14)]
    # A registry tag and a point tag together: both must match (a is north and at site paris).
    body = await get(w, PATH, **window, tag=["building=north", "site=paris"])
    assert [g["points"][0]["temperature_c"] for g in body["groups"]] == [24.5]
    # Filter and group: only the groups that pass the filter.
    body = await get(w, PATH, **window, group_by="building", tag="building=south")
    assert [(g["tags"], g["points"][0]["temperature_c"]) for g in body["groups"]] == [
        ({"building": "south"}, 10.0)
    ]
    # Per device within a registry tag.
    body = await get(w, PATH, **window, group_by="device", tag="building=north")
    assert {g["tags"]["device_id"]: g["points"][0]["temperature_c"] for g in body["groups"]} == {
        w.a: 24.5,
        w.multi: 2.5,
    }
    # A value nobody has, or text that would be InfluxQL if spliced: no devices, no points.
    assert (await get(w, PATH, **window, tag="building=east"))["groups"] == []
    assert (await get(w, PATH, **window, tag="building=' OR device_id =~ /.*/ OR 'a'='a"))["groups"] == []

    # Retagging applies at once (to the whole history: tags are resolved at query time).
    await _tag(w, w.multi, {"building": "south"})
    body = await get(w, PATH, **window, group_by="building")
    by_building = {g["tags"]["building"]: g["points"][0]["temperature_c"] for g in body["groups"]}
    assert by_building == {"north": 24.5, "south": pytest.approx(60 / 9)}

    # Point tags keep working as before for keys the registry does not have.
    body = await get(w, PATH, **window, group_by="site")
    assert {g["tags"]["site"] for g in body["groups"]} == {"paris", "lyon", "x", "y", "z"}


async def test_a_registry_tag_matching_too_many_devices_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    await _tag(w, w.a, {"building": "north"})
    await _tag(w, w.multi, {"building": "north"})
    monkeypatch.setattr(registry_tags, "MAX_RESOLVED_DEVICES", 1)
    window = {"fields": "temperature_c", "start": w.t0, "end": w.t(5), "every": "5m"}
    problem = await get(w, PATH, 422, **window, tag="building=north")
    assert problem["errors"][0]["field"] == "query.tag" and "more than 1" in problem["detail"]
    problem = await get(w, PATH, 422, **window, group_by="building")
    assert problem["errors"][0]["field"] == "query.group_by"
