"""Pure checks behind the API's hostile-input bounds: reserved names, JSON depth, rule bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from device_registry import legacy_dynsec
from device_registry.broker_admin import ForeignEntryError, refuse_reserved
from device_registry.schemas import DeviceCreate
from device_registry.schemas_rules import stored_rule_problem
from iotfleet import dynsec
from iotfleet.json_limits import json_depth, raw_depth
from iotfleet.reserved_names import PLATFORM_ROLES, PLATFORM_USERS, is_reserved, reserved_reason
from rules_engine.models import MAX_CONDITION_DEPTH, Rule, StoredRule


def test_every_platform_account_and_role_is_reserved() -> None:
    # The shared list covers what the broker bootstrap really creates (catches drift between the two).
    bootstrap = dynsec.bootstrap_config(dynsec.new_passwords())
    assert {c["username"] for c in bootstrap["clients"]} == set(PLATFORM_USERS)
    assert {r["rolename"] for r in bootstrap["roles"]} == set(PLATFORM_ROLES)
    for name in (*PLATFORM_USERS, *PLATFORM_ROLES, dynsec.ADMIN_USER, *dynsec.SERVICE_USERS):
        assert is_reserved(name), name
    # Service client ids: the rules engine's, the registry's links, the ingest replicas'.
    for client_id in ("iotfleet-rules-out", "iotfleet-registry-admin-0a1b", "ingest-thermostat-0"):
        assert is_reserved(client_id), client_id


@pytest.mark.parametrize(
    "name", ["IOTFLEET-INGEST", "IotFleet-Rules", "Ingest-x", "SVC-INGEST", "Admin", "ROOT"]
)
def test_case_variants_are_reserved(name: str) -> None:
    assert is_reserved(name)


@pytest.mark.parametrize(
    "name", ["thermostat-0001", "fleet-iotfleet", "my-ingest-1", "administrator2", "device-1"]
)
def test_ordinary_ids_are_free(name: str) -> None:
    assert reserved_reason(name) is None


def test_configured_client_ids_can_be_reserved_too() -> None:
    assert reserved_reason("reg-tracker-1") is None
    assert "client id" in (reserved_reason("REG-tracker-1", extra=["reg-tracker"]) or "")
    assert reserved_reason("reg-x", extra=["", "reg-tracker"]) is None


def test_device_create_refuses_reserved_ids_with_their_own_error_type() -> None:
    with pytest.raises(ValidationError) as caught:
        DeviceCreate.model_validate({"id": "iotfleet-ingest", "type": "thermostat"})
    [error] = caught.value.errors()
    assert error["type"] == "reserved_name" and "reserved" in error["msg"]
    assert DeviceCreate.model_validate({"id": "thermostat-1", "type": "thermostat"}).id == "thermostat-1"


def test_broker_commands_naming_platform_entries_never_leave_the_registry() -> None:
    refuse_reserved(legacy_dynsec.delete_commands("thermostat-1"))
    for command in (
        {"command": "deleteClient", "username": "iotfleet-ingest"},
        {"command": "setClientPassword", "username": "Iotfleet-Rules", "password": "x"},
        {"command": "deleteRole", "rolename": "svc-ingest"},
        {"command": "addRoleACL", "rolename": "admin", "acltype": "subscribePattern", "topic": "#"},
    ):
        with pytest.raises(ForeignEntryError):
            refuse_reserved([command])


# --- JSON depth --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:\n'),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k'), children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_raw_depth_agrees_with_the_parsed_depth(value: Any) -> None:
    text = json.dumps(value).encode()
    assert raw_depth(text, limit=1_000) == json_depth(value)
    # Past the limit it only says "deeper".
    if json_depth(value) > 2:
        assert raw_depth(text, limit=2) == 3


def test_raw_depth_bounds_hostile_text() -> None:
    assert raw_depth(b"[" * 1_000_000, limit=32) == 33
    assert raw_depth(b"[" * 40 + b"]" * 40, limit=32) == 33
    assert raw_depth(b'{"a": "' + b"[" * 100 + b'"}', limit=32) == 1
    assert raw_depth(b'["\\"[[[[", "\\\\", [[]]]', limit=32) == 3
    assert raw_depth(b'"' + b'\\"' * 100_000, limit=32) == 0
    assert json_depth([[[[1]]]], limit=2) == 3
    # Shapes that defeat one method or the other: sawtooth, flat, wrapped, unbalanced.
    for k in (1, 3, 5, 9, 12, 31):
        saw = b"[" + b",".join([b"[" * k + b"]" * k] * 1000) + b"]"
        assert raw_depth(saw, limit=32) == k + 1, k
    assert raw_depth(b"[" * 9 + b"[[],[]]," * 1000 + b"]" * 9, limit=32) == 11
    assert raw_depth(b"]" * 100 + b"[" * 10, limit=32) == 0


# --- rules ------------------------------------------------------------------------------------


def _rule(levels: int, **extra: Any) -> dict[str, Any]:
    condition: dict[str, Any] = {"field": "temperature_c", "op": ">", "value": 30}
    for _ in range(levels - 1):
        condition = {"any": [condition]}
    return {
        "name": "r",
        "scope": {"device_type": "thermostat"},
        "when": condition,
        "then": [{"alert": {"message": "hot"}}],
        **extra,
    }


def _error_types(data: dict[str, Any], model: type[Rule] = Rule) -> set[str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return {e["type"] for e in caught.value.errors()}


def test_condition_depth_is_bounded() -> None:
    Rule.model_validate(_rule(MAX_CONDITION_DEPTH))
    assert _error_types(_rule(MAX_CONDITION_DEPTH + 1)) == {"rule_too_deep"}
    assert _error_types(_rule(127)) == {"rule_too_deep"}  # the case
    assert _error_types(_rule(1, clear_when=_rule(MAX_CONDITION_DEPTH + 1)["when"])) == {"rule_too_deep"}
    # The engine parses served rules with the same bounds.
    assert _error_types({**_rule(127), "id": "x"}, StoredRule) == {"rule_too_deep"}


def test_condition_count_json_depth_and_size_are_bounded() -> None:
    wide = {"all": [{"any": [{"field": "temperature_c", "op": ">", "value": 1}] * 32}] * 9}
    assert _error_types({**_rule(1), "when": wide}) == {"rule_too_large"}
    deep_args = _rule(1)
    deep_args["then"] = [{"command": "set_mode", "args": {"mode": json.loads('{"a":' * 30 + "1" + "}" * 30)}}]
    assert _error_types(deep_args) == {"rule_too_deep"}
    big = _rule(1)
    big["scope"]["tags"] = {f"k{i}": "v" * 300 for i in range(300)}
    assert _error_types(big) == {"rule_too_large"}


def test_stored_rows_past_the_bounds_are_named_not_served() -> None:
    assert stored_rule_problem(_rule(3)) is None
    assert "deeper" in (stored_rule_problem(_rule(127)) or "")
    assert stored_rule_problem(["not", "an", "object"]) is not None
