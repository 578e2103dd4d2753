"""The desired-state job kind's pure parts: validation against the state model, the action's shape."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from device_registry import device_state
from device_registry.job_actions import DesiredStateKind, _holds
from device_registry.problems import Problem
from device_registry.schemas_jobs import JobCreate
from iotfleet.catalogue import DeviceType, Reading

KIND = DesiredStateKind(None)


def test_validate_normalises_and_names_the_refused_field() -> None:
    assert KIND.validate("thermostat", {"set": {"mode": "eco", "setpoint_c": 19.5}}) == {
        "set": {"mode": "eco", "setpoint_c": 19.5}
    }
    with pytest.raises(Problem) as refused:
        KIND.validate("thermostat", {"set": {"mode": "warp"}})
    assert refused.value.status == 422
    assert [e["field"] for e in refused.value.extra["errors"]] == ["body.action.desired_state.set.mode"]
    with pytest.raises(Problem, match="cannot remove"):
        KIND.validate("thermostat", {"set": {"mode": None}})


def test_a_type_without_state_is_422(monkeypatch: pytest.MonkeyPatch) -> None:
    bare = DeviceType(name="bare", reading=Reading, commands={})
    monkeypatch.setattr(device_state, "get_device_type", lambda _name: bare)
    with pytest.raises(Problem) as refused:
        KIND.validate("bare", {"set": {"mode": "eco"}})
    assert refused.value.status == 422 and "no configurable state" in refused.value.detail
    assert refused.value.extra["errors"][0]["field"] == "body.action.desired_state"


def test_the_action_is_one_key_and_the_command_contract_is_unchanged() -> None:
    target = {"device_type": "thermostat"}
    job = JobCreate.model_validate({"action": {"desired_state": {"set": {"mode": "eco"}}}, "target": target})
    assert job.action.model_dump() == {"desired_state": {"set": {"mode": "eco"}}}
    command = {"command": {"name": "set_mode", "args": {"mode": "eco"}}}
    assert JobCreate.model_validate({"action": command, "target": target}).action.model_dump() == command
    for action in ({"desired_state": {"set": {}}}, {"desired_state": {"mode": "eco"}}, {**command, "x": {}}):
        with pytest.raises(ValidationError):
            JobCreate.model_validate({"action": action, "target": target})
    assert not KIND.ready()


def test_success_means_every_field_reported_with_its_value() -> None:
    assert _holds({"mode": "eco", "setpoint_c": 19.5, "x": 1}, {"mode": "eco", "setpoint_c": 19.5})
    assert not _holds({"mode": "eco"}, {"mode": "eco", "setpoint_c": 19.5})
    assert not _holds({"mode": "eco", "setpoint_c": 20.0}, {"mode": "eco", "setpoint_c": 19.5})
