"""The device-set filter that registry tags resolve to: bound ids, balanced OR tree."""

from __future__ import annotations

import math
import re

import pytest

from device_registry.telemetry import query


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("count", [1, 2, 3, 7, 1000, 10_000])
def test_every_id_is_a_bound_parameter_in_a_balanced_tree(count: int) -> None:
    ids = [f"dev-{i}" for i in range(count)]
    params: dict[str, str] = {}
    text = query.device_set_condition(ids, params, "g0_d")
    assert sorted(params.values()) == sorted(ids)
    assert text.count('"device_id" = $g0_d') == count
    assert not any(device_id in text for device_id in ids[:5])  # values never in the text
    assert _depth(text) <= math.ceil(math.log2(count)) if count > 1 else "(" not in text
    assert re.fullmatch(r'[()"$ a-zA-Z0-9_=]*', text)


def test_no_device_matches_nothing_and_ids_are_validated() -> None:
    params: dict[str, str] = {}
    text = query.device_set_condition([], params, "d")
    assert text == '"device_id" = $dnone' and params == {"dnone": ""}
    with pytest.raises(query.QueryError):
        query.device_set_condition(["ok", "not ok/"], {}, "d")


def test_statements_sharing_params_do_not_collide() -> None:
    params: dict[str, str] = {}
    a = query.device_set_condition(["x", "y"], params, "g0_d")
    b = query.device_set_condition(["z"], params, "g1_d")
    names = re.findall(r"\$(\w+)", a + b)
    assert len(names) == len(set(names)) == 3 and set(names) == set(params)
