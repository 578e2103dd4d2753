from __future__ import annotations

import pytest

from iotfleet import topics
from iotfleet.errors import TopicError
from iotfleet.topics import Channel


def test_build_and_parse_round_trip() -> None:
    topic = topics.device_topic("thermostat", "t-001", Channel.TELEMETRY)
    assert topic == "devices/thermostat/t-001/telemetry"
    parsed = topics.parse_device_topic(topic)
    assert (parsed.device_type, parsed.device_id, parsed.channel) == (
        "thermostat",
        "t-001",
        Channel.TELEMETRY,
    )
    assert str(parsed) == topic


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x y", "-lead", "a" * 65, "é"])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.device_topic("thermostat", bad, Channel.STATUS)


@pytest.mark.parametrize(
    "bad",
    [
        "devices/thermostat/t1",
        "things/thermostat/t1/status",
        "devices/thermostat/t1/other",
        "devices/Thermo/t1/status",
        "devices/thermostat/t1/status/extra",
    ],
)
def test_parse_rejects_non_device_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse_device_topic(bad)


def test_filters() -> None:
    assert topics.device_filter(Channel.TELEMETRY, "smart_plug") == "devices/smart_plug/+/telemetry"
    assert topics.shared_filter(topics.ingest_group("smart_plug"), "devices/smart_plug/+/telemetry") == (
        "$share/ingest-smart_plug/devices/smart_plug/+/telemetry"
    )
    assert topics.deadletter_topic("thermostat", "t1") == "deadletter/thermostat/t1"
    with pytest.raises(TopicError):
        topics.shared_filter("a/b", "x")
