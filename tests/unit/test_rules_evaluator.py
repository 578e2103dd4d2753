"""The pure evaluator: thresholds, for, hysteresis, rates, windows, absence, presence, composites, cooldown."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rules_engine.evaluator import Evaluator, Firing, SavedState
from rules_engine.models import StoredRule

T0 = 1_764_240_000_000


def rule(when: dict[str, Any], **extra: Any) -> StoredRule:
    body: dict[str, Any] = {
        "id": extra.pop("id", "r1"),
        "name": extra.pop("name", "r1"),
        "scope": extra.pop("scope", {"device_type": "thermostat"}),
        "when": when,
        "then": extra.pop("then", [{"alert": {"severity": "major", "message": "m"}}]),
    }
    body.update(extra)
    return StoredRule.model_validate(body)


def feed(ev: Evaluator, temps: list[tuple[int, float]], device: str = "t1") -> list[Firing]:
    out: list[Firing] = []
    for offset_ms, temp in temps:
        out += ev.on_reading("thermostat", device, T0 + offset_ms, {"temperature_c": temp})
    return out


def kinds(firings: list[Firing]) -> list[tuple[str, int]]:
    return [(f.kind, f.at_ms - T0) for f in firings]


def test_threshold_fires_once_then_clears_when_false() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 30})])
    out = feed(ev, [(0, 25), (1000, 31), (2000, 32), (3000, 33), (4000, 29), (5000, 31)])
    assert kinds(out) == [("fire", 1000), ("clear", 4000), ("fire", 5000)]


def test_for_requires_continuous_hold() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 30, "for": "10s"})])
    # Breaks at 6 s, so the 10 s count restarts at 7 s and completes at 17 s.
    out = feed(ev, [(0, 31), (5000, 31), (6000, 29), (7000, 31), (16_000, 31), (17_000, 31)])
    assert kinds(out) == [("fire", 17_000)]


def test_hysteresis_clears_only_below_clear_threshold() -> None:
    ev = Evaluator(
        [
            rule(
                {"field": "temperature_c", "op": ">", "value": 30},
                clear_when={"field": "temperature_c", "op": "<", "value": 26},
            )
        ]
    )
    out = feed(ev, [(0, 31), (1000, 29), (2000, 27), (3000, 31), (4000, 25.9), (5000, 31)])
    assert kinds(out) == [("fire", 0), ("clear", 4000), ("fire", 5000)]


def test_cooldown_suppresses_refire() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 30}, cooldown="60s")])
    out = feed(ev, [(0, 31), (1000, 20), (2000, 31), (59_000, 31), (60_000, 31)])
    assert kinds(out) == [("fire", 0), ("clear", 1000), ("fire", 60_000)]


def test_burst_of_readings_fires_once() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 30}, cooldown="60s")])
    out = feed(ev, [(i // 10, 31 + i % 3) for i in range(1, 101)])
    assert kinds(out) == [("fire", 0)]


def test_late_readings_are_ignored_same_millisecond_is_not() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 30})])
    out = feed(ev, [(1000, 31), (1000, 32), (500, 20), (1000, 20)])
    assert kinds(out) == [("fire", 1000), ("clear", 1000)]
    assert ev.ignored_readings == 1


def test_between_outside_and_equality() -> None:
    ev = Evaluator(
        [
            rule({"field": "temperature_c", "op": "outside", "value": [18, 24]}, id="o", name="o"),
            rule({"field": "temperature_c", "op": "between", "value": [18, 24]}, id="b", name="b"),
            rule({"field": "mode", "op": "==", "value": "cool"}, id="m", name="m"),
        ]
    )
    out = ev.on_reading("thermostat", "t1", T0, {"temperature_c": 17, "mode": "cool"})
    assert sorted(f.rule_id for f in out) == ["m", "o"]
    out = ev.on_reading("thermostat", "t1", T0 + 1, {"temperature_c": 18, "mode": "heat"})
    assert sorted((f.rule_id, f.kind) for f in out) == [("b", "fire"), ("m", "clear"), ("o", "clear")]


def test_rate_of_change_per_minute() -> None:
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": 5, "rate_per": "1m"})])
    # +1 °C in 10 s = 6 °C/min > 5; +0.5 °C in 10 s = 3 °C/min.
    out = feed(ev, [(0, 20), (10_000, 20.5), (20_000, 21.5), (30_000, 22)])
    assert kinds(out) == [("fire", 20_000), ("clear", 30_000)]


def test_windowed_mean_slides() -> None:
    r = rule(
        {"field": "co2_ppm", "agg": "mean", "window": "5m", "op": ">", "value": 1000},
        scope={"device_type": "air_quality"},
    )
    ev = Evaluator([r])
    out: list[Firing] = []
    # 900, 1200 → mean 1050 fires; later, 900 at +6 min drops the 1200 out: mean 900 clears.
    for offset, co2 in [(0, 900), (60_000, 1200), (360_001, 900)]:
        out += ev.on_reading("air_quality", "a1", T0 + offset, {"co2_ppm": co2})
    assert kinds(out) == [("fire", 60_000), ("clear", 360_001)]


def test_window_count_max_min() -> None:
    for agg, value, expected in [("count", 2, 2000), ("max", 30, 1000), ("min", 22, 12_000)]:
        ev = Evaluator(
            [rule({"field": "temperature_c", "agg": agg, "window": "10s", "op": ">", "value": value})]
        )
        out = feed(ev, [(0, 21), (1000, 31), (2000, 23), (12_000, 23)])
        assert kinds(out)[0] == ("fire", expected), agg


def test_absence_fires_once_at_logical_deadline_and_clears_on_reading() -> None:
    ev = Evaluator([rule({"absent_for": "30s"})])
    feed(ev, [(0, 21)])
    assert ev.on_tick(T0 + 29_999) == []
    out = ev.on_tick(T0 + 31_500)
    assert kinds(out) == [("fire", 30_000)]
    assert ev.on_tick(T0 + 60_000) == [] and ev.on_tick(T0 + 3_600_000) == []
    assert kinds(feed(ev, [(4_000_000, 21)])) == [("clear", 4_000_000)]


def test_absence_due_before_a_late_reading() -> None:
    """A reading after the deadline but before the tick: the absence fires first, then clears."""
    ev = Evaluator([rule({"absent_for": "30s"})])
    out = feed(ev, [(0, 21), (45_000, 21)])
    assert kinds(out) == [("fire", 30_000), ("clear", 45_000)]


def test_presence_with_for() -> None:
    ev = Evaluator([rule({"presence": "offline", "for": "1m"})])
    assert ev.on_presence("thermostat", "t1", False, T0) == []
    assert ev.on_tick(T0 + 59_000) == []
    assert kinds(ev.on_tick(T0 + 61_000)) == [("fire", 60_000)]
    assert kinds(ev.on_presence("thermostat", "t1", True, T0 + 70_000)) == [("clear", 70_000)]


def test_presence_immediate() -> None:
    ev = Evaluator([rule({"presence": "offline"})])
    assert kinds(ev.on_presence("thermostat", "t1", False, T0)) == [("fire", 0)]
    assert ev.on_presence("thermostat", "t1", False, T0 + 5) == []


def test_composite_all_and_any() -> None:
    both = rule(
        {
            "all": [
                {"field": "temperature_c", "op": ">", "value": 30},
                {"field": "humidity_pct", "op": ">", "value": 70},
            ]
        },
        id="all",
        name="all",
    )
    either = rule(
        {
            "any": [
                {"field": "temperature_c", "op": ">", "value": 30},
                {"field": "humidity_pct", "op": ">", "value": 70},
            ]
        },
        id="any",
        name="any",
    )
    ev = Evaluator([both, either])
    out = ev.on_reading("thermostat", "t1", T0, {"temperature_c": 31, "humidity_pct": 50})
    assert [f.rule_id for f in out] == ["any"]
    out = ev.on_reading("thermostat", "t1", T0 + 1, {"temperature_c": 31, "humidity_pct": 75})
    assert [f.rule_id for f in out] == ["all"]


def test_scope_device_ids_and_tags() -> None:
    r = rule(
        {"field": "temperature_c", "op": ">", "value": 30},
        scope={"device_type": "thermostat", "device_ids": ["t1", "t2"], "tags": {"room": "101"}},
    )
    ev = Evaluator([r])
    assert ev.on_reading("thermostat", "t1", T0, {"temperature_c": 31}, tags={"room": "101"})
    assert not ev.on_reading("thermostat", "t2", T0, {"temperature_c": 31}, tags={"room": "102"})
    assert not ev.on_reading("thermostat", "t3", T0, {"temperature_c": 31}, tags={"room": "101"})
    assert not ev.on_reading("air_quality", "t1", T0 + 1, {"temperature_c": 31}, tags={"room": "101"})


def test_reload_keeps_state_of_unchanged_and_edited_rules_and_clears_removed() -> None:
    r = rule({"field": "temperature_c", "op": ">", "value": 30})
    ev = Evaluator([r])
    assert kinds(feed(ev, [(0, 31)])) == [("fire", 0)]
    edited = rule({"field": "temperature_c", "op": ">", "value": 29}, version=2)
    assert ev.set_rules([edited], now=T0 + 1) == []
    assert feed(ev, [(1000, 31)]) == []  # still active: an edit does not re-fire
    cleared = ev.set_rules([], now=T0 + 2000)
    assert kinds(cleared) == [("clear", 2000)]


def test_restore_from_saved_state_does_not_refire() -> None:
    r = rule({"field": "temperature_c", "op": ">", "value": 30}, cooldown="60s")
    ev = Evaluator([r])
    feed(ev, [(0, 31)])
    saved = ev.take_dirty()
    assert saved == [SavedState("r1", "t1", True, T0)]
    again = Evaluator([r])
    again.restore(saved, {("thermostat", "t1"): T0})
    assert feed(again, [(1000, 35)]) == []
    assert kinds(feed(again, [(2000, 20)])) == [("clear", 2000)]


def test_disabled_and_schedule_rules_are_not_evaluated() -> None:
    disabled = rule({"field": "temperature_c", "op": ">", "value": 30}, enabled=False)
    ev = Evaluator([disabled])
    assert feed(ev, [(0, 31)]) == []


# --- properties ----------------------------------------------------------------------

temps = st.lists(st.floats(min_value=-40, max_value=85, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(values=temps, threshold=st.floats(min_value=-40, max_value=85), cooldown_s=st.integers(0, 20))
def test_fires_and_clears_alternate_and_respect_cooldown(
    values: list[float], threshold: float, cooldown_s: int
) -> None:
    extra = {"cooldown": f"{cooldown_s}s"} if cooldown_s else {}
    ev = Evaluator([rule({"field": "temperature_c", "op": ">", "value": threshold}, **extra)])
    out = feed(ev, [(i * 1000, v) for i, v in enumerate(values)])
    assert [f.kind for f in out] == ["fire", "clear"] * (len(out) // 2) + ["fire"] * (len(out) % 2)
    fires = [f.at_ms for f in out if f.kind == "fire"]
    assert all(b - a >= cooldown_s * 1000 for a, b in itertools.pairwise(fires))


@settings(max_examples=200, deadline=None)
@given(values=temps, high=st.floats(min_value=0, max_value=60), gap=st.floats(min_value=0, max_value=20))
def test_hysteresis_matches_reference(values: list[float], high: float, gap: float) -> None:
    low = high - gap
    ev = Evaluator(
        [
            rule(
                {"field": "temperature_c", "op": ">", "value": high},
                clear_when={"field": "temperature_c", "op": "<", "value": low},
            )
        ]
    )
    out = feed(ev, [(i * 1000, v) for i, v in enumerate(values)])
    expected, active = [], False
    for i, v in enumerate(values):
        if not active and v > high:
            active = True
            expected.append(("fire", i * 1000))
        elif active and v < low:
            active = False
            expected.append(("clear", i * 1000))
    assert kinds(out) == expected
