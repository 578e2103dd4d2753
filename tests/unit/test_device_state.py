"""The device shadow's pure parts: merge patches, delta, If-Match, validation against the state models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from device_registry import device_state
from device_registry.device_state import NoStateError, PatchError, Shadow
from iotfleet.admission import Limits, Rejected, StateAdmission
from iotfleet.catalogue import DeviceType, Reading, get_device_type

AT = datetime(2026, 12, 1, tzinfo=UTC)


def test_merge_sets_and_removes_fields() -> None:
    assert device_state.merge({"a": 1, "b": 2}, {"b": None, "c": 3}) == {"a": 1, "c": 3}
    assert device_state.merge({}, {"x": None}) == {}


def test_delta_holds_desired_fields_not_reported_as_such() -> None:
    assert device_state.delta_of({"mode": "eco", "setpoint_c": 20.0}, {"mode": "eco"}) == {"setpoint_c": 20.0}
    assert device_state.delta_of({"relay_on": False}, {"relay_on": False, "other": 1}) == {}
    assert device_state.delta_of({"relay_on": False}, {}) == {"relay_on": False}
    assert device_state.delta_message(3, {}, 1) == b""


@pytest.mark.parametrize(
    ("header", "version"), [(None, None), ("*", None), ('"3"', 3), ("3", 3), ('W/"12"', 12)]
)
def test_if_match(header: str | None, version: int | None) -> None:
    assert device_state.parse_if_match(header) == version


@pytest.mark.parametrize("header", ["abc", '"-1"', '"1.5"', "", '"1' + "0" * 20 + '"'])
def test_if_match_refuses_what_is_no_version(header: str) -> None:
    with pytest.raises(ValueError, match="If-Match"):
        device_state.parse_if_match(header)


def test_validate_patch_against_the_type_model() -> None:
    assert device_state.validate_patch("thermostat", {"mode": "eco", "setpoint_c": 21}) == {
        "mode": "eco",
        "setpoint_c": 21.0,
    }
    assert device_state.validate_patch("thermostat", {"setpoint_c": None}) == {"setpoint_c": None}
    for bad in ({"setpoint_c": 99}, {"mode": "turbo"}, {"relay_on": True}, {"setpoint_c": "21"}):
        with pytest.raises(PatchError) as info:
            device_state.validate_patch("thermostat", bad)
        assert info.value.errors


def test_a_type_without_state_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    bare = DeviceType(name="bare", reading=Reading, commands={})
    assert bare.schema()["state_schema"] is None
    monkeypatch.setattr(device_state, "get_device_type", lambda _name: bare)
    with pytest.raises(NoStateError, match="no configurable state"):
        device_state.validate_patch("bare", {"x": 1})


def test_versions_move_only_on_change() -> None:
    shadow = Shadow("t1", "thermostat")
    assert shadow.set_desired({"mode": "eco"}, source="operator:x", at=AT)
    assert (shadow.desired_version, shadow.delta, shadow.delta_pending, shadow.delta_seq) == (
        1,
        {"mode": "eco"},
        True,
        1,
    )
    assert not shadow.set_desired({"mode": "eco"}, source="operator:x", at=AT)
    assert shadow.desired_version == 1
    assert shadow.set_reported({"mode": "eco", "setpoint_c": 20.0}, at=AT)
    assert (shadow.reported_version, shadow.delta, shadow.delta_seq) == (1, {}, 2)
    assert not shadow.set_reported({"mode": "eco"}, at=AT)
    assert shadow.reported_version == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"mode": "turbo"}', "invalid_value"),
        (b'{"fan": 1}', "unknown_field"),
        (b'{"setpoint_c": "21"}', "wrong_type"),
        (b'{"setpoint_c": 1e400}', "out_of_range"),
        (b"[{}]", "wrong_shape"),
        (b'{"mode": "eco", "mode": "off"}', "duplicate_key"),
        (b"{", "not_json"),
        (b"\xff", "invalid_utf8"),
        (b'{"mode": "' + b"x" * 3000 + b'"}', "payload_too_large"),
        (b'{"a": ' + b"[" * 20 + b"]" * 20 + b", " + b" " * 1100 + b"}", "too_deep"),
    ],
)
def test_reported_state_admission_refuses_like_the_ingest(payload: bytes, reason: str) -> None:
    admission = StateAdmission(get_device_type("thermostat"), Limits(max_payload_bytes=2048))
    with pytest.raises(Rejected) as info:
        admission.admit(payload)
    assert info.value.reason == reason


def test_reported_state_admission_returns_a_merge_patch() -> None:
    admission = StateAdmission(get_device_type("thermostat"), Limits())
    assert admission.admit(b'{"mode": "eco", "setpoint_c": null}') == {"mode": "eco", "setpoint_c": None}
    assert admission.admit(b"{}") == {}
