"""AlertEngine: every rule, hysteresis (raise after the hold, clear after the clear time),
incident ids, restore after a restart, all on a fake clock; events against the schema."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.config.models import HealthConfig
from agent.health import AlertEngine, AlertEvent, Observation, Rule, Severity
from agent.health.alerts import RULE_NAMES

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
ALERT_SCHEMA = json.loads((SCHEMAS / "alert.v1.json").read_text())
HEALTH_SCHEMA = json.loads((SCHEMAS / "health.v1.json").read_text())
DEVICE = "school1.room1"


class FakeClock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def healthy() -> dict[str, Any]:
    """A snapshot in which no rule fires (the shape of the health message)."""
    return {
        "system": {
            "cpu_percent": 5.0,
            "disk_percent": 40.0,
            "disk_free_mb": 5000.0,
            "temperature_c": 50.0,
            "clock_synced": True,
        },
        "mqtt": {"connected": True, "last_error": None},
        "capture": {
            "video": {
                "state": "ok",
                "reason": "frames arriving",
                "since": 1_799_999_000.0,
                "state_for_s": 1000.0,
                "mean_luma": 110.0,
            },
            "audio": {"state": "ok", "level_dbfs": -30.0},
        },
    }


def engine_for(clock: FakeClock, lesson: list[bool] | None = None, **config: Any) -> AlertEngine:
    flags = lesson if lesson is not None else [False]
    return AlertEngine(
        HealthConfig(**config),
        in_lesson=lambda: flags[0],
        clock=lambda: clock.mono,
        wall_clock=lambda: clock.wall,
    )


def run(
    engine: AlertEngine,
    clock: FakeClock,
    snapshot: dict[str, Any],
    seconds: float,
    step: float = 1.0,
) -> list[AlertEvent]:
    """Tick every ``step`` for ``seconds`` (first tick now); all events produced."""
    events: list[AlertEvent] = []
    elapsed = 0.0
    while True:
        events += engine.evaluate(snapshot)
        if elapsed + step > seconds + 1e-9:
            return events
        clock.advance(step)
        elapsed += step


def check_event(event: AlertEvent, *, delayed: bool = False) -> dict[str, Any]:
    message = event.to_message(DEVICE, delayed=delayed)
    jsonschema.validate(message, ALERT_SCHEMA)
    json.dumps(message, allow_nan=False)
    return message


# -- hysteresis ----------------------------------------------------------------------------


def test_raise_after_hold_clear_after_quiet_time_and_no_flapping() -> None:
    clock = FakeClock()
    engine = engine_for(clock, black_alert_s=30, alert_clear_s=10)
    dark = healthy()
    dark["capture"]["video"]["mean_luma"] = 3.0
    began = clock.wall

    assert run(engine, clock, dark, 29) == []  # held 29 s: not yet
    clock.advance(1)
    (raised,) = engine.evaluate(dark)
    assert (raised.rule, raised.state, raised.severity) == ("camera_black", "raised", "warning")
    assert raised.since == pytest.approx(began)  # when the condition began, not the hold's end
    assert raised.at == pytest.approx(began + 30)
    assert raised.details["mean_luma"] == 3.0
    check_event(raised)
    assert [a.id for a in engine.active()] == [raised.id]

    # Still dark: no second event. Bright for 9 s, dark again: the alert holds (no flap).
    assert run(engine, clock, dark, 20) == []
    clock.advance(1)
    assert run(engine, clock, healthy(), 9) == []
    clock.advance(1)
    assert run(engine, clock, dark, 5) == []
    # Bright for the whole clear time: cleared, with the incident's id and since.
    clock.advance(1)
    events = run(engine, clock, healthy(), 10)
    assert [(e.state, e.id) for e in events] == [("cleared", raised.id)]
    assert events[0].since == raised.since
    assert events[0].details["duration_s"] > 60
    check_event(events[0], delayed=True)
    assert engine.active() == []

    # A new condition is a new incident.
    clock.advance(1)
    again = run(engine, clock, dark, 30)
    assert [(e.state) for e in again] == ["raised"]
    assert again[0].id != raised.id


def test_a_condition_that_ends_before_the_hold_restarts_the_count() -> None:
    clock = FakeClock()
    engine = engine_for(clock, black_alert_s=10)
    dark = healthy()
    dark["capture"]["video"]["mean_luma"] = 0.0
    for _ in range(5):  # 8 s dark, 1 s bright: never 10 s in a row
        assert run(engine, clock, dark, 8) == []
        clock.advance(1)
        assert engine.evaluate(healthy()) == []
        clock.advance(1)
    assert engine.active() == []


def test_zero_hold_and_zero_clear_follow_the_condition_tick_by_tick() -> None:
    clock = FakeClock()
    engine = engine_for(clock, broker_unreachable_alert_s=0, alert_clear_s=0)
    down = healthy()
    down["mqtt"] = {"connected": False, "last_error": "unreachable: Connection refused"}
    (raised,) = engine.evaluate(down)
    assert raised.rule == "broker_unreachable"
    assert "Connection refused" in raised.message
    clock.advance(1)
    (cleared,) = engine.evaluate(healthy())
    assert (cleared.state, cleared.id) == ("cleared", raised.id)


# -- each rule -------------------------------------------------------------------------------


def test_camera_lost_trusts_the_hubs_own_duration() -> None:
    clock = FakeClock()
    engine = engine_for(clock, camera_lost_alert_s=10)
    lost = healthy()
    lost["capture"]["video"].update(
        state="lost", reason="read failed: No such device", state_for_s=4.0, since=clock.wall - 4
    )
    assert engine.evaluate(lost) == []
    clock.advance(6)
    lost["capture"]["video"]["state_for_s"] = 10.0
    (raised,) = engine.evaluate(lost)
    assert raised.severity is Severity.CRITICAL
    assert raised.since == pytest.approx(clock.wall - 10)
    assert "No such device" in raised.message

    # Seen for the first time when already lost for a minute (agent restarted): at once.
    clock2 = FakeClock()
    engine2 = engine_for(clock2, camera_lost_alert_s=10)
    lost["capture"]["video"].update(state_for_s=60.0, since=clock2.wall - 60)
    (late,) = engine2.evaluate(lost)
    assert late.since == pytest.approx(clock2.wall - 60)


def test_camera_frozen_is_degraded_with_a_frozen_reason() -> None:
    clock = FakeClock()
    engine = engine_for(clock, frozen_alert_s=10)
    frozen = healthy()
    frozen["capture"]["video"].update(
        state="degraded", reason="frozen: identical frames for 2.0 s", state_for_s=0.0
    )
    other = copy.deepcopy(frozen)
    other["capture"]["video"]["reason"] = "something else"
    assert run(engine, clock, other, 30) == []
    events = run(engine, clock, frozen, 10)
    assert [e.rule for e in events] == ["camera_frozen"]


def test_black_needs_a_picture_and_a_low_luma() -> None:
    clock = FakeClock()
    engine = engine_for(clock, black_alert_s=0, black_luma_max=12)
    snap = healthy()
    snap["capture"]["video"].update(state="lost", mean_luma=None)
    assert [e.rule for e in engine.evaluate(snap)] == ["camera_lost"]  # not black as well
    snap = healthy()
    snap["capture"]["video"]["mean_luma"] = 12.0  # at the threshold: not black
    assert engine.evaluate(snap) == []
    snap["capture"]["video"]["mean_luma"] = 11.9
    assert [e.rule for e in engine.evaluate(snap)] == ["camera_black"]


def test_mic_silent_only_during_a_live_lesson() -> None:
    clock = FakeClock()
    lesson = [False]
    engine = engine_for(clock, lesson, mic_silent_alert_s=60, mic_silent_dbfs=-60)
    quiet = healthy()
    quiet["capture"]["audio"]["level_dbfs"] = -90.0
    assert run(engine, clock, quiet, 600) == []  # an empty room between lessons
    lesson[0] = True
    clock.advance(1)
    events = run(engine, clock, quiet, 60)
    assert [(e.rule, e.state) for e in events] == [("mic_silent", "raised")]
    assert events[0].details["level_dbfs"] == -90.0
    lesson[0] = False  # the lesson ends: the silence no longer matters
    clock.advance(1)
    events = run(engine, clock, quiet, 10)
    assert [(e.rule, e.state) for e in events] == [("mic_silent", "cleared")]


def test_mic_silent_judges_the_raw_microphone_when_processing_is_active() -> None:
    # Echo cancellation and noise suppression make a quiet room's *sent* sound silent;
    # only the raw input tells a working microphone from a dead one.
    clock = FakeClock()
    engine = engine_for(clock, [True], mic_silent_alert_s=0, mic_silent_dbfs=-60)
    snap = healthy()
    snap["capture"]["audio"]["level_dbfs"] = -75.0
    snap["capture"]["audio"]["processing"] = {"active": True, "input_level_dbfs": -52.0}
    assert run(engine, clock, snap, 5) == []
    snap["capture"]["audio"]["processing"]["input_level_dbfs"] = -95.0  # unplugged
    events = run(engine, clock, snap, 5)
    assert [(e.rule, e.state) for e in events] == [("mic_silent", "raised")]
    assert events[0].details["level_dbfs"] == -95.0
    # An inactive stage (mode auto, no loudspeakers): the sent level is the raw one.
    snap["capture"]["audio"]["processing"] = {"active": False, "input_level_dbfs": None}
    snap["capture"]["audio"]["level_dbfs"] = -40.0
    events = run(engine, clock, snap, 120)  # clearing has its own hysteresis
    assert [(e.rule, e.state) for e in events] == [("mic_silent", "cleared")]


def test_disk_temperature_and_clock_rules() -> None:
    clock = FakeClock()
    engine = engine_for(
        clock,
        disk_alert_percent=90,
        temperature_alert_c=85,
        temperature_alert_s=30,
        clock_unsynced_alert_s=600,
    )
    snap = healthy()
    snap["system"].update(disk_percent=95.5, temperature_c=91.0, clock_synced=False)
    first = engine.evaluate(snap)
    assert [e.rule for e in first] == ["disk_full"]  # disk: at once
    assert first[0].severity is Severity.CRITICAL
    assert "96%" in first[0].message
    clock.advance(30)
    assert [e.rule for e in engine.evaluate(snap)] == ["temperature_high"]
    clock.advance(570)
    assert [e.rule for e in engine.evaluate(snap)] == ["clock_unsynced"]
    assert sorted(a.rule for a in engine.active()) == [
        "clock_unsynced",
        "disk_full",
        "temperature_high",
    ]


def test_unknown_readings_raise_nothing() -> None:
    clock = FakeClock()
    engine = engine_for(clock, temperature_alert_s=0, clock_unsynced_alert_s=0)
    snap = healthy()
    snap["system"].update(temperature_c=None, clock_synced=None)
    del snap["capture"]
    assert run(engine, clock, snap, 100) == []
    assert run(engine, clock, {}, 100) == []


def test_a_failing_rule_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    def broken(snapshot: Any) -> Observation:
        raise KeyError("boom")

    clock = FakeClock()
    config = HealthConfig()
    rules = [
        Rule("camera_black", Severity.WARNING, 0, broken),
        Rule("disk_full", Severity.CRITICAL, 0, lambda s: Observation(True, "full")),
    ]
    engine = AlertEngine(
        config, rules=rules, clock=lambda: clock.mono, wall_clock=lambda: clock.wall
    )
    with caplog.at_level(logging.ERROR):
        events = engine.evaluate({})
    assert [e.rule for e in events] == ["disk_full"]
    assert "alert rule camera_black failed" in caplog.text


# -- incidents across restarts ------------------------------------------------------------


def test_restored_alerts_keep_their_incident_id() -> None:
    clock = FakeClock()
    engine = engine_for(clock, disk_alert_percent=90, alert_clear_s=10)
    full = healthy()
    full["system"]["disk_percent"] = 97.0
    (raised,) = engine.evaluate(full)
    saved = json.loads(json.dumps([a.to_dict() for a in engine.active()]))

    # The agent restarts (or reloads its config): a new engine adopts the open incident.
    clock.advance(5)
    after = engine_for(clock, disk_alert_percent=90, alert_clear_s=10)
    assert after.restore([*saved, {"rule": "nonsense"}, {**saved[0], "rule": "gone_rule"}]) == 1
    assert run(after, clock, full, 30) == []  # still full: the same incident, no new id
    assert [a.id for a in after.active()] == [raised.id]
    clock.advance(1)
    events = run(after, clock, healthy(), 10)
    assert [(e.state, e.id, e.since) for e in events] == [("cleared", raised.id, raised.since)]


def test_active_section_validates_and_lists_oldest_first() -> None:
    clock = FakeClock()
    engine = engine_for(clock, disk_alert_percent=90, broker_unreachable_alert_s=0)
    snap = healthy()
    snap["system"]["disk_percent"] = 99.0
    engine.evaluate(snap)
    clock.advance(3)
    snap["mqtt"]["connected"] = False
    engine.evaluate(snap)
    section = engine.section()
    assert [a["rule"] for a in section["active"]] == ["disk_full", "broker_unreachable"]
    alerts_schema = HEALTH_SCHEMA["properties"]["alerts"]
    jsonschema.validate(section, alerts_schema)
    assert [rule.name for rule in engine_for(clock).rules] == list(RULE_NAMES)
