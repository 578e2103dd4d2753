"""Broker log lines and status payloads → presence events (pure)."""

from __future__ import annotations

import pytest

from device_registry.broker_log import Cause, parse_line
from device_registry.presence import _Event, _replay, parse_status


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"2026-12-01T05:38:10: New client connected from 127.0.0.1:38050 as dev-kill (p2, c1, k5).",
         ("dev-kill", True, Cause.connected)),
        (b"1796103282: New client connected from 10.0.0.2:1 as dev-1 (p5, c1, k60, u'nouser').",
         ("dev-1", True, Cause.connected)),
        (b"1796103282: Client dev-clean disconnected.", ("dev-clean", False, Cause.disconnected)),
        (b"1796103282: Client dev-kill closed its connection.", ("dev-kill", False, Cause.will)),
        (b"1796103282: Client dev-stop has exceeded timeout, disconnecting.", ("dev-stop", False, Cause.timeout)),
        (b"1796103282: Socket error on client dev-x, disconnecting.", ("dev-x", False, Cause.will)),
        (b"1796103282: Client dev-y has been disconnected by administrative action.",
         ("dev-y", False, Cause.kicked)),
        (b"2026-12-01T05:46:50: Client kk been disconnected by administrative action.",  # 2.0.11, verbatim
         ("kk", False, Cause.kicked)),
    ],
)  # fmt: skip
def test_connection_lines(line: bytes, expected: tuple[str, bool, Cause]) -> None:
    event = parse_line(line)
    assert event is not None
    assert (event.client_id, event.online, event.cause) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"1796103282: New connection from 127.0.0.1:50656 on port 18931.",
        # A refused CONNECT under a live device's id must not take that device offline.
        b"1796103282: Client dev-1 disconnected, not authorised.",
        b"1796103282: Client dev-take already connected, closing old connection.",
        b"no stamp here",
        b"\xff\xfe: Client x disconnected.",
        b"1: Client " + b"x" * 2000 + b" disconnected.",
    ],
)
def test_other_lines_are_no_event(line: bytes) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"online", True), (b" OFFLINE\n", False), (b'{"status": "online"}', True),
        (b'{"status": "Offline"}', False), (b'{"online": false}', False), (b'{"online": true, "x": 1}', True),
        (b"maybe", None), (b"[1]", None), (b'{"status": 1}', None), (b"{not json", None),
        (b"\xff\xfe", None), (b'{"online": true' + b" " * 2000 + b"}", None),
    ],
)  # fmt: skip
def test_status_formats(payload: bytes, expected: bool | None) -> None:
    assert parse_status(payload) is expected


def test_replay_applies_events_in_order_and_skips_unknown_clients() -> None:
    current = {"a": (False, None), "b": (True, 5.0), "c": (False, None)}
    events = [
        _Event("a", True, Cause.connected, 10.0),
        _Event("a", True, Cause.connected, 11.0),  # a take-over: no transition
        _Event("b", False, Cause.timeout, 12.0),
        _Event("iotfleet-ingest-1", True, Cause.connected, 12.5),  # no registry device
        _Event("a", False, Cause.will, 13.0),
        _Event("c", True, Cause.message, 14.0),  # spoke while shown offline
        _Event("c", True, Cause.message, 15.0),
    ]
    out = _replay(events, current)
    assert [(t["device_id"], t["online"], t["cause"]) for t in out.transitions] == [
        ("a", True, "connected"),
        ("b", False, "timeout"),
        ("a", False, "will"),
        ("c", True, "message"),
    ]
    assert out.states == {"a": (False, None), "b": (False, None), "c": (True, 14.0)}
    assert out.last_seen == {"a": 11.0, "c": 15.0}


def test_pending_events_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from device_registry import presence as module
    from iotfleet.settings import MqttSettings

    monkeypatch.setattr(module, "MAX_PENDING_EVENTS", 10)
    p = module.Presence(MqttSettings(), sessions=None, metrics=CollectorRegistry())  # type: ignore[arg-type]
    for i in range(25):
        p._append(_Event(f"d-{i}", True, Cause.connected, float(i)))
    # Over the bound, the backlog becomes "everyone offline" followed by what came since.
    assert len(p._events) <= 10
    assert p._events[0].device_id is None and p._events[0].cause is Cause.events_lost
    assert p._events[-1].device_id == "d-24"
