"""The maintenance dashboard: the fleet model (unit), and the server against a real Mosquitto.

The browser test (real Chromium) is in tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from agent.capture import FrameHub, open_video_source
from agent.config import SensingConfig
from agent.config.errors import ConfigError
from agent.config.models import CaptureConfig, VideoConfig
from agent.dashboard import (
    DashboardConfig,
    DashboardServer,
    FleetModel,
    add_dashboard_parser,
    config_from_args,
    dashboard_config,
    lesson_quality,
)
from agent.dashboard.model import MAX_SENSED_LESSONS, SHOWN_SENSED_LESSONS, Peer
from agent.sensing import SensingService
from agent.sensing.roster import open_store
from agent.sync import Outbox, ReliablePublisher
from agent.testkit import SimFleet, SimRoom, fleet_layout, make_demo_class, photos_dir
from agent.testkit.simulate import RoomSpec, announcement
from tests.brokers import (
    DASHBOARD,
    DEVICE_1,
    DEVICE_2,
    BrokerUnderTest,
    eventually,
    make_link,
    observing,
    running,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
ROOM = "edu/school1/room1"
BOOT = "2026-11-24T07:00:00Z"


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


class Clock:
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self) -> None:
        self.wall = 1_795_000_000.0
        self.mono = 1_000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_model(clock: Clock, **kwargs: Any) -> FleetModel:
    return FleetModel("edu", wall=lambda: clock.wall, monotonic=lambda: clock.mono, **kwargs)


def state(
    status: str, seq: int, *, boot: str = BOOT, device: str = "school1.room1", **extra: Any
) -> bytes:
    site, room = device.split(".")
    payload = {
        "status": status,
        "device": device,
        "site": site,
        "room": room,
        "version": "0.1.0",
        "profile": "virtual",
        "boot_time": boot,
        "seq": seq,
        **extra,
    }
    if status == "offline":
        payload.setdefault("reason", "connection lost")
    return json.dumps(payload).encode()


def health(
    ts: float,
    n: int,
    *,
    device: str = "school1.room1",
    alerts: list[dict[str, Any]] | None = None,
    stream: dict[str, Any] | None = None,
) -> bytes:
    message = {
        "v": 1,
        "ts": ts,
        "n": n,
        "device": device,
        "system": {
            "cpu_percent": 23.5,
            "load1": 0.7,
            "memory_percent": 41.0,
            "disk_percent": 37.2,
            "disk_free_mb": 80123.0,
            "temperature_c": 51.0,
            "uptime_s": 3600.0,
            "clock_synced": True,
        },
        "mqtt": {"connected": True, "seq": 3, "publish_rtt_ms": 4.2, "ping_rtt_ms": 3.1},
        "capture": {
            "video": {"state": "ok", "reason": "", "fps": 29.9},
            "audio": {"state": "ok", "level_dbfs": -23.5, "clipping": False},
        },
        "agent": {"version": "0.1.0"},
        "alerts": {"active": alerts or []},
        "stream": stream,
        "sensing": None,
    }
    return json.dumps(message).encode()


def alert(
    alert_id: str,
    state_: str,
    at: float,
    *,
    rule: str = "camera_lost",
    device: str = "school1.room1",
) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": alert_id,
            "device": device,
            "rule": rule,
            "severity": "critical",
            "state": state_,
            "since": at - 10,
            "at": at,
            "message": "camera lost",
            "delayed": False,
            "details": {},
        }
    ).encode()


def active(alert_id: str, rule: str = "camera_lost") -> dict[str, Any]:
    return {"id": alert_id, "rule": rule, "severity": "critical", "since": 1.0, "message": "m"}


def view(model: FleetModel, device: str = "school1.room1") -> dict[str, Any]:
    room = model.room_view(device)
    assert room is not None, f"{device} is not in the model"
    return room


# -- state: birth, Last Will, seq ---------------------------------------------------------


def test_a_late_will_does_not_flip_a_room_that_is_back_online() -> None:
    model = make_model(Clock())
    assert model.apply(f"{ROOM}/state", state("online", 3))
    assert view(model)["status"] == "online"
    # The will of connection 2 reaches us after the birth of connection 3.
    assert not model.apply(f"{ROOM}/state", state("offline", 2), retained=True)
    assert view(model)["status"] == "online"
    assert model.stats.stale_states == 1
    # Connection 3 ends: its own will counts.
    assert model.apply(f"{ROOM}/state", state("offline", 3))
    room = view(model)
    assert (room["status"], room["reason"], room["seq"]) == ("offline", "connection lost", 3)
    # A copy of the birth of the connection that has ended is stale too.
    assert not model.apply(f"{ROOM}/state", state("online", 3), retained=True)
    assert view(model)["status"] == "offline"
    assert model.apply(f"{ROOM}/state", state("online", 4))
    assert view(model)["status"] == "online"


def test_a_restarted_agent_counts_seq_from_one_again() -> None:
    model = make_model(Clock())
    model.apply(f"{ROOM}/state", state("online", 5))
    model.apply(f"{ROOM}/state", state("offline", 5, reason="shutdown"))
    later = "2026-11-24T08:00:00Z"
    assert model.apply(f"{ROOM}/state", state("online", 1, boot=later))
    assert view(model)["status"] == "online"
    # A will of the old process, late: older boot, whatever its seq.
    assert not model.apply(f"{ROOM}/state", state("offline", 9, boot=BOOT))
    assert view(model)["status"] == "online"


def test_status_since_when() -> None:
    clock = Clock()
    model = make_model(clock)
    clock.advance(100)
    model.apply(f"{ROOM}/state", state("online", 1, connected_at="2026-11-24T07:00:05.500Z"))
    room = view(model)
    assert room["since"] == pytest.approx(epoch("2026-11-24T07:00:05.500+00:00"))
    assert room["since_exact"] is True
    # A retained will seen at start-up: it happened before the dashboard could see it.
    other = "edu/school1/room2/state"
    model.apply(other, state("offline", 2, device="school1.room2"), retained=True)
    room2 = view(model, "school1.room2")
    assert (room2["since"], room2["since_exact"]) == (model.started, False)
    # A will arriving live is timed by its arrival; a shutdown carries its own time.
    clock.advance(50)
    model.apply(f"{ROOM}/state", state("offline", 1))
    assert (view(model)["since"], view(model)["since_exact"]) == (clock.wall, True)
    model.apply(f"{ROOM}/state", state("online", 2))
    model.apply(
        f"{ROOM}/state",
        state("offline", 2, reason="shutdown", disconnected_at="2026-11-24T09:00:00Z"),
    )
    assert view(model)["reason"] == "shutdown"
    assert view(model)["since"] == pytest.approx(epoch("2026-11-24T09:00:00+00:00"))


# -- health and staleness -----------------------------------------------------------------


def test_health_figures_are_kept_per_room() -> None:
    clock = Clock()
    model = make_model(clock)
    model.apply(f"{ROOM}/state", state("online", 1, display_name="Room 101 (Grade 5)"))
    clock.advance(0.05)
    assert model.apply(f"{ROOM}/health", health(clock.wall - 0.05, 1))
    room = view(model)
    assert room["name"] == "Room 101 (Grade 5)"
    figures = room["health"]
    assert figures["camera"] == "ok"
    assert figures["fps"] == 29.9
    assert figures["mic_dbfs"] == -23.5
    assert figures["cpu_percent"] == 23.5
    assert figures["temperature_c"] == 51.0
    assert figures["disk_percent"] == 37.2
    assert figures["broker_rtt_ms"] == 4.2
    assert figures["clock_synced"] is True
    assert figures["clock_offset_s"] == pytest.approx(0.0, abs=0.1)
    assert model.stats.to_dict()["health_delay_ms"]["median"] == pytest.approx(50, abs=1)
    # The same message again (or an older one) changes nothing.
    assert not model.apply(f"{ROOM}/health", health(clock.wall - 0.05, 1))


def test_an_online_room_whose_health_stops_turns_stale_after_three_intervals() -> None:
    clock = Clock()
    model = make_model(clock, default_interval_s=10.0)
    model.apply(f"{ROOM}/state", state("online", 1))
    model.apply(f"{ROOM}/health", health(clock.wall, 1))
    clock.advance(2.0)
    model.apply(f"{ROOM}/health", health(clock.wall, 2))  # the room's interval: 2 s
    assert view(model)["interval_s"] == 2.0
    clock.advance(5.9)
    assert model.check_stale() == []
    clock.advance(0.2)
    assert model.check_stale() == ["school1.room1"]
    assert view(model)["stale"] is True
    counts = model.counts()
    assert (counts["online"], counts["stale"]) == (0, 1)
    assert model.apply(f"{ROOM}/health", health(clock.wall, 3))
    assert view(model)["stale"] is False
    # Offline rooms are offline, never stale.
    model.apply(f"{ROOM}/state", state("offline", 1))
    clock.advance(100)
    assert model.check_stale() == []
    # Back online: its old health does not make it stale at once...
    model.apply(f"{ROOM}/state", state("online", 2))
    assert model.check_stale() == []
    # ...but no health for three intervals does.
    clock.advance(6.1)
    assert model.check_stale() == ["school1.room1"]


def test_an_online_room_that_never_sends_health_turns_stale() -> None:
    clock = Clock()
    model = make_model(clock, default_interval_s=10.0)
    model.apply(f"{ROOM}/state", state("online", 1))
    clock.advance(29)
    assert model.check_stale() == []
    clock.advance(2)
    assert model.check_stale() == ["school1.room1"]


# -- alerts -------------------------------------------------------------------------------


def test_alerts_from_raised_and_cleared_events() -> None:
    model = make_model(Clock())
    assert model.apply(f"{ROOM}/alert", alert("a1", "raised", 100.0))
    assert [a["id"] for a in view(model)["alerts"]] == ["a1"]
    assert view(model)["alerts"][0]["severity"] == "critical"
    assert model.counts()["critical"] == 1
    assert model.apply(f"{ROOM}/alert", alert("a1", "cleared", 130.0))
    assert view(model)["alerts"] == []
    # A re-delivered 'raised' after its 'cleared' does not reopen it.
    assert not model.apply(f"{ROOM}/alert", alert("a1", "raised", 100.0))
    assert view(model)["alerts"] == []


def test_alerts_from_the_health_message_when_the_dashboard_starts_late() -> None:
    model = make_model(Clock())
    model.apply(
        f"{ROOM}/health", health(100.0, 7, alerts=[active("a1"), active("a2", "disk_full")])
    )
    assert sorted(a["id"] for a in view(model)["alerts"]) == ["a1", "a2"]
    model.apply(f"{ROOM}/health", health(110.0, 8, alerts=[active("a2", "disk_full")]))
    assert [a["id"] for a in view(model)["alerts"]] == ["a2"]


def test_events_and_snapshots_are_ordered_by_the_devices_time() -> None:
    model = make_model(Clock())
    model.apply(f"{ROOM}/health", health(100.0, 1, alerts=[active("a1")]))
    model.apply(f"{ROOM}/alert", alert("a1", "cleared", 105.0))
    assert view(model)["alerts"] == []
    # A snapshot taken before that clear, delivered after it: a1 stays cleared.
    model.apply(f"{ROOM}/health", health(103.0, 2, alerts=[active("a1")]))
    assert view(model)["alerts"] == []
    # Raised after the next snapshot was taken: kept although the snapshot lacks it.
    model.apply(f"{ROOM}/alert", alert("b1", "raised", 110.0))
    model.apply(f"{ROOM}/health", health(108.0, 3))
    assert [a["id"] for a in view(model)["alerts"]] == ["b1"]
    # A newer snapshot without it: over.
    model.apply(f"{ROOM}/health", health(115.0, 4))
    assert view(model)["alerts"] == []
    # A delayed 'raised' older than a snapshot that does not list it: already over.
    assert not model.apply(f"{ROOM}/alert", alert("c1", "raised", 90.0))
    assert view(model)["alerts"] == []


# -- bad input ----------------------------------------------------------------------------


def test_bad_payloads_are_counted_and_change_nothing() -> None:
    model = make_model(Clock())
    model.apply(f"{ROOM}/state", state("online", 1))
    before = view(model)
    bad: list[tuple[str, bytes, str]] = [
        (f"{ROOM}/state", b"not json", "state"),
        (f"{ROOM}/state", b"\xff\xfe", "state"),
        (f"{ROOM}/state", b"[1, 2]", "state"),
        (f"{ROOM}/state", state("maybe", 1), "state"),
        (f"{ROOM}/state", state("offline", "7"), "state"),  # type: ignore[arg-type]
        (f"{ROOM}/state", state("offline", True), "state"),  # type: ignore[arg-type]
        (f"{ROOM}/state", state("offline", 9, device="school9.room9"), "state"),
        (f"{ROOM}/health", b'{"ts": "yesterday"}', "health"),
        (f"{ROOM}/health", b'{"ts": 5, "system": "hot"}', "health"),
        (f"{ROOM}/health", b'{"ts": 5, "alerts": {"active": {}}}', "health"),
        (f"{ROOM}/health", b'{"ts": 5, "stream": 3}', "health"),
        (f"{ROOM}/health", b"[" * 100_000, "health"),
        (f"{ROOM}/health", b"{" + b" " * (300 * 1024) + b"}", "health"),
        (
            f"{ROOM}/alert",
            b'{"id": "x", "rule": "camera_lost", "state": "exploded", "at": 1}',
            "alert",
        ),
        (
            f"{ROOM}/alert",
            b'{"id": "", "rule": "camera_lost", "state": "raised", "at": 1}',
            "alert",
        ),
        (
            f"{ROOM}/alert",
            b'{"id": "x", "rule": "r", "state": "raised", "at": 1, "severity": "meh"}',
            "alert",
        ),
        ("edu/lesson/music", b'{"v": 2}', "lesson"),
        ("edu/lesson/music", b'{"v": 1, "lesson_id": "l1", "main": "nobody"}', "lesson"),
        (
            "edu/lesson/music",
            b'{"v": 1, "lesson_id": "l1", "main": "a.b", "expected": "everyone"}',
            "lesson",
        ),
        ("edu/School1/room1/state", state("online", 1), "topic"),
        ("edu/lesson/x/state", state("online", 1), "topic"),
        ("other/school1/room1/state", state("online", 1), "topic"),
        ("edu/school1/room1/sensing", b"{}", "sensing"),
        ("edu/school1/room1/sensing", b'{"v": 1, "kind": "minute", "ts": 5}', "sensing"),
        ("edu/school9/room9/sensing", sensing("minute", device="school9.room9"), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", device="school9.room9"), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", head_count=-1), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", head_count=2.5), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", head_up_rate=1.5), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", hand_raises="many"), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", minute_start=None), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", lesson=7), "sensing"),
        ("edu/school1/room1/sensing", sensing("minute", lesson="x" * 65), "sensing"),
        ("edu/school1/room1/sensing", sensing("st", mode="lecturing"), "sensing"),
        ("edu/school1/room1/sensing", sensing("st", rt=float("nan")), "sensing"),
        ("edu/school1/room1/sensing", sensing("attendance", absent=None), "sensing"),
        ("edu/school1/room1/sensing", sensing("attendance", kind="names"), "sensing"),
        ("edu/school1/room1/sensing", sensing("attendance", v=2), "sensing"),
        ("edu/school1/room1/sensing", b"[" * 100_000, "sensing"),
        ("edu/school1/room1/sensing/x", sensing("minute"), "topic"),
    ]
    for topic, payload, _ in bad:
        assert model.apply(topic, payload) is False, (topic, payload[:60])
    expected = {kind: sum(1 for *_, k in bad if k == kind) for kind in model.stats.bad}
    assert model.stats.bad == expected
    assert model.stats.last_bad is not None
    assert view(model) == before
    assert list(model.rooms) == ["school1.room1"]  # a bad message creates no room
    assert model.lessons == {}
    assert model.sensed == {}
    assert model.sensing_view() == []


def test_random_garbage_never_breaks_the_model() -> None:
    rng = random.Random(7)
    model = make_model(Clock())
    values: list[Any] = [
        None,
        True,
        0,
        -1,
        1.5,
        float("inf"),
        "",
        "x" * 500,
        [],
        {},
        [{}],
        {"a": []},
    ]
    keys = [
        "status",
        "seq",
        "ts",
        "n",
        "system",
        "capture",
        "alerts",
        "stream",
        "id",
        "state",
        "at",
        "rule",
        "severity",
        "v",
        "lesson_id",
        "main",
        "expected",
        "joined",
        "device",
        "kind",
        "lesson",
        "minute_start",
        "head_count",
        "head_up_rate",
        "hand_raises",
        "rt",
        "ch",
        "mode",
        "present",
        "absent",
    ]
    topics = [
        f"{ROOM}/state",
        f"{ROOM}/health",
        f"{ROOM}/alert",
        f"{ROOM}/sensing",
        "edu/lesson/g1",
    ]
    for _ in range(2000):
        if rng.random() < 0.2:
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        else:
            doc = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 6))}
            payload = json.dumps(doc, allow_nan=True).encode()
        model.apply(rng.choice(topics), payload)
    model.check_stale()
    json.dumps(model.snapshot(), allow_nan=False)  # whatever came in, the page gets valid JSON
    assert model.stats.bad["sensing"] > 0


def test_rooms_beyond_the_limit_are_refused() -> None:
    model = make_model(Clock(), max_rooms=2)
    for i in range(3):
        model.apply(f"edu/s/r{i}/state", state("online", 1, device=f"s.r{i}"))
    assert sorted(model.rooms) == ["s.r0", "s.r1"]
    assert model.stats.rooms_refused == 1


# -- lessons ------------------------------------------------------------------------------


def lesson(joined: list[str], **extra: Any) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "lesson_id": "les-1",
            "group": "g5-english",
            "subject": "English",
            "main": "central.r1",
            "expected": ["village-a.r1", "village-b.r1"],
            "joined": joined,
            "started_at": 1000.0,
            "state": "live",
            **extra,
        }
    ).encode()


def peer(rtt: float, loss: float, fps: float) -> dict[str, Any]:
    return {
        "state": "connected",
        "rtt_ms": rtt,
        "loss_percent": loss,
        "jitter_ms": 3.0,
        "bitrate_kbps": 2000.0,
        "fps": fps,
        "layer": "high",
    }


def test_lesson_overview_from_announcements_and_stream_sections() -> None:
    clock = Clock()
    model = make_model(clock)
    for device in ("central.r1", "village-a.r1", "village-b.r1"):
        site, name = device.split(".")
        model.apply(f"edu/{site}/{name}/state", state("online", 1, device=device))
    model.take_changes()
    assert model.apply("edu/lesson/g5-english", lesson(["village-a.r1"]))
    changes = model.take_changes()
    assert changes.lessons
    assert set(changes.rooms) == {"central.r1", "village-a.r1", "village-b.r1"}
    main_stream = {
        "lesson": "les-1",
        "role": "main",
        "peers": {"village-a.r1": peer(40, 0.3, 29.5)},
    }
    model.apply(
        "edu/central/r1/health", health(clock.wall, 1, device="central.r1", stream=main_stream)
    )
    [overview] = model.lessons_view()
    assert overview["subject"] == "English"
    assert overview["main"] == "central.r1"
    assert overview["main_online"] is True
    assert overview["expected"] == ["village-a.r1", "village-b.r1"]
    assert overview["joined"] == ["village-a.r1"]
    assert overview["quality"] == "good"
    assert "rtt 40 ms" in overview["quality_detail"]
    assert view(model, "central.r1")["lesson"]["role"] == "main"
    assert view(model, "village-a.r1")["lesson"]["joined"] is True
    assert view(model, "village-b.r1")["lesson"]["joined"] is False
    counts = model.counts()
    assert (counts["lessons_live"], counts["rooms_in_lesson"]) == (1, 3)
    # village-b joins (its own stream section says so) on a weak link.
    rx_stream = {
        "lesson": "les-1",
        "role": "receiving",
        "state": "live",
        "peers": {"central.r1": peer(250, 3.0, 20)},
    }
    model.apply(
        "edu/village-b/r1/health", health(clock.wall, 1, device="village-b.r1", stream=rx_stream)
    )
    [overview] = model.lessons_view()
    assert overview["joined"] == ["village-a.r1", "village-b.r1"]
    assert overview["quality"] == "fair"
    # The lesson ends: an empty retained payload.
    model.take_changes()
    assert model.apply("edu/lesson/g5-english", b"")
    assert model.lessons_view() == []
    assert view(model, "village-a.r1")["lesson"] is None
    assert "village-a.r1" in model.take_changes().rooms


def test_the_lesson_view_says_which_rooms_are_on_a_lower_layer_or_audio_only() -> None:
    clock = Clock()
    model = make_model(clock)
    for device in ("central.r1", "village-a.r1", "village-b.r1"):
        site, name = device.split(".")
        model.apply(f"edu/{site}/{name}/state", state("online", 1, device=device))
    model.apply("edu/lesson/g5-english", lesson(["village-a.r1", "village-b.r1"]))
    floor = {
        **peer(150, 5.0, 25),
        "layer": "floor",
        "layer_reason": "5 % loss on the low layer",
        "layer_cause": "loss",
    }
    paused = {**peer(150, 9.0, 0), "layer": "paused", "audio_only": True}
    main_stream = {
        "lesson": "les-1",
        "role": "main",
        "peers": {"village-a.r1": floor, "village-b.r1": paused},
    }
    model.apply(
        "edu/central/r1/health", health(clock.wall, 1, device="central.r1", stream=main_stream)
    )
    [overview] = model.lessons_view()
    assert overview["layers"] == [
        {
            "device": "village-a.r1",
            "layer": "floor",
            "reason": "5 % loss on the low layer",
            "audio_only": False,
        },
        {"device": "village-b.r1", "layer": "paused", "reason": None, "audio_only": True},
    ]


def test_a_rooms_echo_canceller_is_in_its_health_view() -> None:
    clock = Clock()
    model = make_model(clock)
    message = json.loads(health(clock.wall, 1))
    message["capture"]["audio"]["processing"] = {
        "active": True,
        "cancelling": True,
        "stages": {"echo_cancellation": True},
        "echo_path_ms": 21.4,
        "erle_db": 34.6,
    }
    model.apply("edu/school1/room1/health", json.dumps(message).encode())
    assert view(model)["health"]["echo"] == {
        "active": True,
        "aec": True,
        "cancelling": True,
        "echo_path_ms": 21.0,
        "erle_db": 35.0,
    }
    model.apply("edu/school1/room1/health", health(clock.wall + 1, 2))
    assert view(model)["health"]["echo"] is None


def test_pushed_profiles_show_per_room_and_count_the_broken() -> None:
    clock = Clock()
    model = make_model(clock)
    entry = {
        "state": "rolled-back",
        "version": 4,
        "scope": "room:school1.room1",
        "reason": "after 4 s: the broker is not connected",
        "code": "check-failed",
        "since": "2026-12-04T10:00:00Z",
        "applied_version": None,
    }
    report = {
        "v": 1,
        "device": "school1.room1",
        "groups": [],
        "time": "2026-12-04T10:00:00Z",
        "keys": {"version": 0, "pinned": [], "last": None},
        "effective": {},
        "layers": {"room:school1.room1": entry},
    }
    assert model.apply("edu/school1/room1/config/reported", json.dumps(report).encode())
    config = view(model)["config"]
    assert config["problem"] is True
    assert config["layers"][0]["state"] == "rolled-back"
    assert model.counts()["profile_problems"] == 1
    wrong = {**report, "device": "school1.room2"}
    assert not model.apply("edu/school1/room1/config/reported", json.dumps(wrong).encode())
    assert not model.apply("edu/school1/room1/config/reported", b"\xff junk")
    assert model.stats.bad["config"] == 2
    fixed = {
        **report,
        "layers": {
            "room:school1.room1": {**entry, "state": "applied", "applied_version": 5, "version": 5}
        },
        "effective": {"room:school1.room1": 5},
    }
    assert model.apply("edu/school1/room1/config/reported", json.dumps(fixed).encode())
    assert model.counts()["profile_problems"] == 0


def test_lessons_not_announced_again_after_a_reconnect_are_forgotten() -> None:
    clock = Clock()
    model = make_model(clock)
    model.apply("edu/lesson/g5-english", lesson(["village-a.r1"]))
    model.apply("edu/lesson/g6-music", lesson([], group="g6-music", lesson_id="les-2"))
    clock.advance(30)
    reconnected = clock.mono
    clock.advance(1)
    model.apply("edu/lesson/g5-english", lesson(["village-a.r1"]), retained=True)  # re-sent
    assert model.forget_lessons_before(reconnected) == ["g6-music"]
    assert [view["group"] for view in model.lessons_view()] == ["g5-english"]


def test_lesson_quality_takes_the_worst_peer() -> None:
    def p(rtt: float | None, loss: float | None, fps: float | None) -> Peer:
        return Peer("a.b", "connected", rtt, loss, None, None, fps)

    assert lesson_quality([]) == ("unknown", "no peers")
    assert lesson_quality([p(None, None, None)])[0] == "unknown"
    assert lesson_quality([p(30, 0.1, 30)])[0] == "good"
    assert lesson_quality([p(30, 0.1, 30), p(200, 1.0, 25)])[0] == "fair"
    assert lesson_quality([p(30, 6.0, 30)])[0] == "poor"
    assert lesson_quality([p(30, 0.1, 8)]) == ("poor", "loss 0.1 %, rtt 30 ms, 8 fps")


def test_changes_name_only_the_rooms_that_changed() -> None:
    clock = Clock()
    model = make_model(clock)
    for i in range(5):
        model.apply(f"edu/s/r{i}/state", state("online", 1, device=f"s.r{i}"))
    assert len(model.take_changes().rooms) == 5
    model.apply("edu/s/r3/health", health(clock.wall, 1, device="s.r3"))
    assert model.take_changes().rooms == ("s.r3",)
    assert model.take_changes().rooms == ()


# -- simulated rooms match the contracts --------------------------------------------------


def test_simulated_messages_match_the_json_schemas() -> None:
    schemas = {
        name: json.loads((SCHEMAS / f"{name}.v1.json").read_text())
        for name in ("state", "health", "alert")
    }
    rooms, groups = fleet_layout(40)
    assert len({r.site for r in rooms}) == 4
    assert groups
    assert all(len(g.receiving) == 3 for g in groups)
    sim = SimRoom(RoomSpec("school1", "room1", "Room 1"), random.Random(1))
    sim.lesson = {
        "id": "l1",
        "role": "main",
        "group": "g",
        "peers": ["school1.room2"],
        "weak": set(),
    }
    jsonschema.validate(sim.state("online"), schemas["state"])
    jsonschema.validate(sim.state("offline", "shutdown"), schemas["state"])
    event = sim.raise_alert("camera_lost", "critical", "camera lost")
    jsonschema.validate(event, schemas["alert"])
    message = sim.health(10.0)
    jsonschema.validate(message, schemas["health"])
    assert message["alerts"]["active"][0]["id"] == event["id"]
    assert message["stream"]["peers"]["school1.room2"]["state"] == "connected"
    cleared = sim.clear_alert(event["id"])
    assert cleared is not None
    jsonschema.validate(cleared, schemas["alert"])
    # And the model reads what the simulator writes.
    model = FleetModel("edu")
    assert model.apply("edu/school1/room1/state", json.dumps(sim.state("online")).encode())
    assert model.apply("edu/school1/room1/health", json.dumps(sim.health(10.0)).encode())
    topic = f"edu/lesson/{groups[0].group}"
    assert model.apply(topic, json.dumps(announcement(groups[0], "l1", [])).encode())
    assert model.stats.bad == dict.fromkeys(model.stats.bad, 0)


# -- configuration and the command line ---------------------------------------------------


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    config = DashboardConfig()
    assert (config.bind, config.port, config.broker.url) == (
        "127.0.0.1",
        8480,
        "mqtt://127.0.0.1:1883",
    )
    with pytest.raises(ConfigError, match="porrt: unknown key; did you mean 'port'"):
        dashboard_config(porrt=1)
    with pytest.raises(ConfigError, match=r"broker\.username is required with a password"):
        dashboard_config(broker={"url": "mqtt://h:1883", "password_file": tmp_path / "pw"})
    with pytest.raises(ConfigError, match="port: must be <= 65535"):
        dashboard_config(port=70000)

    parser = argparse.ArgumentParser()
    add_dashboard_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "dashboard",
            "--broker",
            "mqtts://broker.example:8883",
            "--username",
            "dashboard",
            "--password-file",
            str(tmp_path / "pw"),
            "--tls-ca",
            str(tmp_path / "ca.pem"),
            "--port",
            "9000",
            "--prefix",
            "edu2",
        ]
    )
    config = config_from_args(args)
    assert config.broker.url == "mqtts://broker.example:8883"
    assert config.broker.username == "dashboard"
    assert config.broker.tls is not None
    assert config.broker.tls.ca_file == tmp_path / "ca.pem"
    assert (config.port, config.broker.topic_prefix) == (9000, "edu2")
    with pytest.raises(ConfigError, match=r"broker\.url"):
        config_from_args(parser.parse_args(["dashboard", "--broker", "http://nope"]))


# -- sensing aggregates ------------------------------------------------------------------


def sensing(kind: str, /, *, device: str = "school1.room1", **fields: Any) -> bytes:
    """A ``{prefix}/{site}/{room}/sensing`` message as the sensing service sends it
    (``fields`` override its own, ``kind`` included)."""
    bodies: dict[str, dict[str, Any]] = {
        "minute": {
            "minute_start": 1000.0,
            "samples": 240,
            "head_count": 24,
            "head_count_max": 25,
            "head_up_rate": 0.8,
            "present": 22,
            "unknown": 0,
        },
        "st": {
            "role": "receiving",
            "samples": "TTTS",
            "interval_s": 30.0,
            "n": 4,
            "n_t": 3,
            "runs": 2,
            "rt": 0.75,
            "ch": 0.25,
            "mode": "lecture",
        },
        "attendance": {
            "present": 21,
            "late": 2,
            "left_early": 1,
            "absent": 3,
            "unknown": 1,
            "enrolled": 27,
            "head_count": 24,
            "head_count_max": 26,
            "head_up_rate": 0.74,
            "corrections": 0,
        },
    }
    message = {
        "v": 1,
        "ts": 2000.0,
        "device": device,
        "lesson": "les-1",
        "kind": kind,
        **bodies[kind],
        **fields,
    }
    return json.dumps(message, allow_nan=True).encode()


def test_sensing_figures_per_room_and_per_lesson() -> None:
    """Live: the latest minute (hand raises add up); at the end: the lesson's S-T and
    attendance, under the group and subject its announcement had."""
    model = make_model(Clock())
    for device in ("central.r1", "village-a.r1", "village-b.r1"):
        site, name = device.split(".")
        model.apply(f"edu/{site}/{name}/state", state("online", 1, device=device))
    model.apply("edu/lesson/g5-english", lesson([]))
    model.take_changes()
    topic = "edu/village-a/r1/sensing"
    va = {"device": "village-a.r1"}
    assert model.apply(topic, sensing("minute", hand_raises=2, **va))
    assert model.take_changes().sensing
    assert model.apply(
        topic,
        sensing(
            "minute", minute_start=1060.0, head_count=25, head_up_rate=0.9, hand_raises=3, **va
        ),
    )
    # A re-delivered minute (QoS 1) and a minute without the hand-raise field.
    assert not model.apply(topic, sensing("minute", hand_raises=2, **va))
    assert model.apply(
        topic, sensing("minute", minute_start=1120.0, head_count=26, head_up_rate=0.5, **va)
    )
    assert model.apply(
        "edu/village-b/r1/sensing",
        sensing("minute", device="village-b.r1", head_count=10, head_up_rate=0.2),
    )
    [live] = model.sensing_view()
    assert (live["lesson_id"], live["group"], live["subject"], live["live"]) == (
        "les-1",
        "g5-english",
        "English",
        True,
    )
    a, b = live["rooms"]
    assert (a["device"], a["final"], a["head_count"], a["head_up_rate"]) == (
        "village-a.r1",
        False,
        26,
        0.5,
    )
    assert a["hand_raises"] == 5
    assert (a["rt"], a["mode"], a["present"]) == (None, None, None)
    assert b["hand_raises"] is None  # not measured there
    totals = live["totals"]
    assert (totals["head_count"], totals["hand_raises"], totals["final"]) == (36, 5, False)
    assert totals["head_up_rate"] == round((26 * 0.5 + 10 * 0.2) / 36, 3)
    # The lesson ends: the announcement goes, then the room's end-of-lesson messages.
    assert model.apply("edu/lesson/g5-english", b"")
    assert model.take_changes().sensing  # the figures are now an ended lesson's
    assert model.apply(topic, sensing("st", **va))
    assert model.apply(topic, sensing("attendance", hand_raises=7, **va))
    assert not model.apply(topic, sensing("minute", minute_start=1180.0, **va))  # late
    [ended] = model.sensing_view()
    assert (ended["live"], ended["group"]) == (False, "g5-english")
    a = ended["rooms"][0]
    assert a == {
        "device": "village-a.r1",
        "final": True,
        "head_count": 24,
        "head_up_rate": 0.74,
        "hand_raises": 7,
        "rt": 0.75,
        "ch": 0.25,
        "mode": "lecture",
        "present": 21,
        "late": 2,
        "left_early": 1,
        "absent": 3,
        "unknown": 1,
        "enrolled": 27,
        "corrections": 0,
    }
    assert ended["totals"]["present"] == 21
    # The teacher corrects two absences on the panel: the room sends its counts again.
    corrected = {"present": 23, "absent": 1, "corrections": 2, **va}
    assert model.apply(topic, sensing("attendance", ts=2100.0, hand_raises=7, **corrected))
    # A re-delivery of the lesson's first attendance must not undo the correction.
    assert not model.apply(topic, sensing("attendance", hand_raises=7, **va))
    a = model.sensing_view()[0]["rooms"][0]
    assert (a["present"], a["absent"], a["corrections"]) == (23, 1, 2)
    assert ended["totals"]["final"] is False  # village-b has not reported its end yet
    # An attendance without the hand-raise field keeps what the minutes added up.
    model.apply("edu/village-b/r1/sensing", sensing("attendance", device="village-b.r1", absent=0))
    totals = model.sensing_view()[0]["totals"]
    assert (totals["final"], totals["present"], totals["absent"], totals["late"]) == (
        True,
        44,
        1,
        4,
    )
    assert totals["corrections"] == 2
    assert totals["hand_raises"] == 7
    # Outside a lesson a room's minute carries no lesson: nothing to file it under.
    assert not model.apply(topic, sensing("minute", lesson=None, minute_start=5000.0, **va))
    assert model.snapshot()["sensing"] == model.sensing_view()
    json.dumps(model.snapshot(), allow_nan=False)


def test_only_the_newest_lessons_figures_are_kept() -> None:
    model = make_model(Clock())
    model.apply(f"{ROOM}/state", state("online", 1))
    for i in range(MAX_SENSED_LESSONS + 30):
        assert model.apply(f"{ROOM}/sensing", sensing("st", lesson=f"l-{i}", ts=1000.0 + i))
    assert len(model.sensed) == MAX_SENSED_LESSONS
    assert "l-0" not in model.sensed
    assert not model.apply(f"{ROOM}/sensing", sensing("st", lesson="older", ts=5.0))
    shown = model.sensing_view()
    assert len(shown) == SHOWN_SENSED_LESSONS
    assert shown[0]["lesson_id"] == f"l-{MAX_SENSED_LESSONS + 29}"  # the newest first


# -- the server against a real broker -----------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    broker: BrokerUnderTest, rooms: int = 6, *, interval_s: float = 1.0
) -> AsyncIterator[tuple[DashboardServer, SimFleet]]:
    """A dashboard (as the read-only ``dashboard`` user) and a simulated fleet, running."""
    config = DashboardConfig(
        broker=broker.broker_config(DASHBOARD), port=0, health_interval_s=interval_s
    )
    server = DashboardServer(config)
    specs, groups = fleet_layout(rooms, per_school=3)
    fleet = SimFleet(broker.broker_config(None), specs, groups, interval_s=interval_s)
    tasks = [
        asyncio.create_task(server.run(), name="test-dashboard"),
        asyncio.create_task(fleet.run(), name="test-fleet"),
    ]
    try:
        async with asyncio.timeout(20):
            await server.wait_ready()
            await fleet.wait_ready()
        yield server, fleet
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def next_update(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=10.0)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    data: dict[str, Any] = json.loads(message.data)
    return data


async def test_the_server_serves_the_fleet_over_http_and_websocket(
    mosquitto: BrokerUnderTest,
) -> None:
    async with serving(mosquitto) as (server, fleet), aiohttp.ClientSession() as http:
        base = server.url.rstrip("/")
        snapshot: dict[str, Any] = {}

        async def fleet_online() -> bool:
            nonlocal snapshot
            async with http.get(f"{base}/api/fleet") as response:
                assert response.status == 200
                snapshot = await response.json()
            return snapshot["counts"]["online"] == 6 and all(r["health"] for r in snapshot["rooms"])

        deadline = time.monotonic() + 15
        while not await fleet_online():
            assert time.monotonic() < deadline, snapshot.get("counts")
            await asyncio.sleep(0.1)
        assert [r["site"] for r in snapshot["rooms"]] == ["central-school"] * 3 + [
            "east-town-primary"
        ] * 3
        assert snapshot["lessons"][0]["state"] == "live"
        assert snapshot["broker"]["connected"] is True

        for path in ("/", "/static/app.js", "/static/app.css"):
            async with http.get(f"{base}{path}") as response:
                text = await response.text()
                assert response.status == 200, path
                assert "default-src 'self'" in response.headers["Content-Security-Policy"]
                assert not re.search(r"https?://", text), f"{path} refers to another site"

        async with http.ws_connect(f"{base}/api/ws") as ws:
            first = await next_update(ws)
            assert first["type"] == "snapshot"
            assert len(first["rooms"]) == 6
            device = "east-town-primary.room-102"
            published = time.monotonic()
            event = await fleet.raise_alert(device, "camera_lost", "critical", "camera lost")
            sizes = []
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "the alert never reached the page"
                update = await next_update(ws)
                assert update["type"] == "update"
                sizes.append(len(update["rooms"]))
                mine = [r for r in update["rooms"] if r["id"] == device]
                if mine and any(a["id"] == event["id"] for a in mine[0]["alerts"]):
                    break
            print(f"alert pushed to the WebSocket after {time.monotonic() - published:.3f} s")
            assert update["counts"]["critical"] >= 1
            assert min(sizes) < 6  # only the rooms that changed travel

            # A burst of 40 health messages for one room: coalesced into a few pushes.
            burst_device = "central-school.room-101"
            started = time.monotonic()
            for _ in range(40):
                last = await fleet.publish_health(burst_device)
            pushes, arrived = 0, False
            deadline = time.monotonic() + 20
            while not arrived:
                update = await next_update(ws)
                for room in update["rooms"]:
                    if room["id"] == burst_device:
                        pushes += 1
                        # The fleet's own 1 s health may overtake the burst's last one.
                        arrived = room["health"]["ts"] >= last["ts"]
                assert time.monotonic() < deadline, "the burst never reached the page"
            elapsed = time.monotonic() - started
            print(f"40 health messages reached the page in {pushes} pushes ({elapsed:.2f} s)")
            assert pushes <= 4 * elapsed + 2

            # The lesson ends (empty retained announcement): the page is told to drop it.
            group = snapshot["lessons"][0]["group"]
            async with observing(mosquitto) as publisher:
                await publisher.publish(f"{mosquitto.prefix}/lesson/{group}", b"", retain=True)
            deadline = time.monotonic() + 15
            while group not in (update := await next_update(ws)).get("lessons_removed", []):
                assert all(lesson["group"] != group for lesson in update.get("lessons", []))
                assert time.monotonic() < deadline, "the ended lesson never left the page"
            assert update["counts"]["lessons_live"] == 0

        async with http.get(f"{base}/api/stats") as response:
            stats = await response.json()
        assert stats["server"]["pushes"] > 0
        assert stats["link"]["published"] == 0  # read-only: the dashboard never publishes

        # Another site's page must not read the fleet, nor a rebinding host name.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/api/ws", headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        async with http.get(f"{base}/api/fleet", headers={"Host": "evil.example"}) as response:
            assert response.status == 421


@pytest.mark.slow
async def test_a_sensing_lessons_counts_reach_the_lesson_view_and_nothing_about_anyone(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    """A real sensing service (the demo's class: real faces, an enrolled roster with names)
    publishes through a room's link; the dashboard shows the lesson's counts and holds no
    student's name or id in its state or its page."""
    photos = photos_dir()
    if photos is None:
        pytest.skip("no face photos (a source checkout has them)")
    truth = make_demo_class(photos, tmp_path, tmp_path / "store")
    roster = open_store(tmp_path / "store")
    people = [s.id for s in roster.students.values()] + [s.name for s in roster.students.values()]
    assert len(people) == 2 * truth.enrolled
    width, height = truth.size
    capture = CaptureConfig(
        video=VideoConfig(
            source="file", path=truth.video, width=width, height=height, fps=truth.fps
        )
    )
    video = FrameHub(open_video_source(capture.video), capture)
    link = make_link(mosquitto, DEVICE_1)
    publisher = ReliablePublisher(link, Outbox(tmp_path / "outbox.db"))
    now: dict[str, str | None] = {"lesson": "lesson-dash"}
    service = SensingService(
        SensingConfig(enabled=True, sample_fps=4, embed_every_s=0.5, talk_analysis=False),
        video,
        publisher,
        link.topics.sensing,
        device=DEVICE_1,
        lesson=lambda: now["lesson"],
        store_dir=tmp_path / "store",
        minute_s=2.0,
    )
    config = DashboardConfig(broker=mosquitto.broker_config(DASHBOARD), port=0)
    server = DashboardServer(config)
    group = f"{mosquitto.prefix}/lesson/music"
    announcement = {"v": 1, "lesson_id": "lesson-dash", "group": "music", "subject": "Music"}
    announcement |= {"main": DEVICE_1, "expected": [DEVICE_2], "joined": [], "state": "live"}

    def figures() -> dict[str, Any]:
        lessons = server.model.sensing_view()
        return lessons[0] if lessons else {}

    tasks = [
        asyncio.create_task(server.run(), name="test-dashboard"),
        asyncio.create_task(video.run(), name="test-camera"),
    ]
    try:
        await asyncio.wait_for(server.wait_ready(), 20)
        async with running(link), observing(mosquitto) as it:
            await it.publish(group, json.dumps(announcement), retain=True)
            tasks.append(asyncio.create_task(publisher.run(), name="test-publisher"))
            tasks.append(asyncio.create_task(service.run(), name="test-sensing"))
            await eventually(
                lambda: (
                    figures().get("live") is True
                    and figures()["rooms"][0]["head_count"] == truth.in_room + truth.strangers
                ),
                within=60,
                what="the live lesson's head count on the dashboard",
            )
            assert figures()["group"] == "music"
            now["lesson"] = None
            await it.publish(group, b"", retain=True)  # the lesson ends
            await eventually(
                lambda: figures().get("totals", {}).get("final") is True,
                within=30,
                what="the lesson's attendance on the dashboard",
            )
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.url}api/fleet") as response:
                    state_text = await response.text()
                async with http.get(server.url) as response:
                    page_text = await response.text()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lesson_view = figures()
    assert (lesson_view["live"], lesson_view["subject"]) == (False, "Music")
    room_figures = lesson_view["rooms"][0]
    absent = truth.enrolled - truth.in_room
    assert (room_figures["present"], room_figures["absent"]) == (truth.in_room, absent)
    assert room_figures["enrolled"] == truth.enrolled
    assert json.loads(state_text)["sensing"][0]["rooms"][0]["present"] == truth.in_room
    # Counts only: no student's id or name anywhere the dashboard keeps or serves.
    kept = json.dumps(server.model.snapshot(), ensure_ascii=False)
    for text in (kept, state_text, page_text):
        for who in people:
            assert who not in text


async def test_bad_payloads_on_the_broker_are_counted(mosquitto: BrokerUnderTest) -> None:
    async with serving(mosquitto, rooms=3) as (server, _fleet):
        p = mosquitto.prefix
        async with observing(mosquitto) as publisher:
            await publisher.publish(f"{p}/central-school/room-101/health", b"\x00garbage")
            await publisher.publish(f"{p}/central-school/room-101/alert", b'{"id": 5}')
            await publisher.publish(f"{p}/lesson/g9", b"[]", retain=True)
        await eventually(
            lambda: (
                server.model.stats.bad["health"] == 1
                and server.model.stats.bad["alert"] == 1
                and server.model.stats.bad["lesson"] == 1
            ),
            what="the bad payloads to be counted",
        )
        assert server.model.room_view("central-school.room-101") is not None


async def test_a_reconnecting_room_is_not_flipped_by_its_late_will(
    mosquitto: BrokerUnderTest,
) -> None:
    async with serving(mosquitto, rooms=3) as (server, fleet):
        device = "central-school.room-102"
        await eventually(lambda: (server.model.room_view(device) or {}).get("status") == "online")
        will = await fleet.set_offline(device)
        await eventually(lambda: view(server.model, device)["status"] == "offline")
        born = await fleet.set_online(device)
        await eventually(lambda: view(server.model, device)["status"] == "online")
        # The old connection's will arrives once more, late (e.g. a bridged broker).
        site, room = device.split(".")
        async with observing(mosquitto) as publisher:
            await publisher.publish(
                f"{mosquitto.prefix}/{site}/{room}/state", json.dumps(will), retain=True
            )
            await publisher.publish(f"{mosquitto.prefix}/{site}/{room}/alert", b"probe")
        await eventually(lambda: server.model.stats.bad["alert"] == 1)  # it was processed
        assert view(server.model, device)["status"] == "online"
        assert view(server.model, device)["seq"] == born["seq"]
        assert server.model.stats.stale_states >= 1


# -- the command's runner -----------------------------------------------------------------

RUN = "import sys; from agent.dashboard import dashboard_config as c, run_dashboard as r; "
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_dashboard_refuses_a_taken_port_with_exit_code_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", RUN + f"sys.exit(r(c(port={port})))"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_run_dashboard_stops_cleanly_on_sigterm(mosquitto: BrokerUnderTest) -> None:
    password = mosquitto.password_file(DASHBOARD)
    broker = {"url": mosquitto.url, "topic_prefix": mosquitto.prefix, "username": DASHBOARD}
    broker["password_file"] = str(password)
    code = RUN + f"sys.exit(r(c(broker={broker!r}, port=0)))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE, cwd=REPO
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line.startswith(b"maintenance dashboard: http://127.0.0.1:"), line
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
