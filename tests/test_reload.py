"""A reload touches only what changed: real daemons, a real Mosquitto, a live lesson.

The plan itself (which part is reconfigured, which restarted, which waits for the
lesson) is checked on real `Agent` objects built from real configs; the daemons show
that a health-only change during a live lesson applies at once with no room leaving,
that a service which cannot start with the new config is rolled back with the old one
still running, and what moving between the embedded broker and a configured one does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import build_config
from agent.config.loader import DEFAULTS_LAYER, Layer
from agent.panel import PanelClient
from agent.runtime import Agent
from tests.brokers import BrokerUnderTest, observing
from tests.test_daemon import daemon_factory, site_config
from tests.test_stream_rejoin import (
    GROUP,
    MAIN,
    ROOM2,
    go_live,
    joined,
    new_daemon,
    room_config,
    stream_state,
)

log = logging.getLogger(__name__)
__all__ = ["daemon_factory"]  # a fixture, used by the tests below


def agent_for(tmp_path: Path, **sections: Any) -> Agent:
    base: dict[str, Any] = {
        "identity": {
            "site": "school1",
            "room": "room1",
            "groups": [{"group": GROUP, "role": "main", "receivers": [ROOM2]}],
        },
        "hardware": {"profile": "virtual"},
        "broker": {"url": "mqtt://127.0.0.1:1"},
        "supervisor": {"state_dir": str(tmp_path / "state")},
    }
    for name, value in sections.items():
        base[name] = {**base.get(name, {}), **value}
    loaded = build_config([Layer(DEFAULTS_LAYER, {}), Layer("site", base)])
    return Agent(loaded, None)


def planned(tmp_path: Path, **sections: Any) -> Any:
    running = agent_for(tmp_path)
    candidate = agent_for(tmp_path, **sections)
    return running.plan(candidate.loaded, None)


def test_a_health_interval_change_is_taken_in_place_and_touches_nothing_live(
    tmp_path: Path,
) -> None:
    change = planned(tmp_path, health={"interval_s": 2})
    assert change.actions["health"] == "reconfigure"
    assert change.actions["alerts"] == "reconfigure"
    assert "mqtt" not in change.actions
    assert "capture" not in change.actions
    assert "stream" not in change.actions
    assert change.live == ()
    assert "health.interval_s" in change.changed


def test_a_camera_change_restarts_capture_and_what_runs_on_it_and_waits_for_the_lesson(
    tmp_path: Path,
) -> None:
    change = planned(tmp_path, capture={"video": {"width": 640, "height": 360}})
    assert change.actions["capture"] == "restart"
    assert change.actions["stream"] == "restart"  # it holds the hubs
    assert change.actions["panel"] == "restart"
    assert "mqtt" not in change.actions  # the link survives unless broker/identity change
    assert "health" not in change.actions
    assert set(change.live) >= {"capture", "stream"}


def test_a_broker_change_restarts_the_link_and_its_dependants_only(tmp_path: Path) -> None:
    change = planned(tmp_path, broker={"url": "mqtt://127.0.0.1:2"})
    assert change.actions["mqtt"] == "restart"
    for dependant in ("publisher", "health", "stream", "commands"):
        assert change.actions[dependant] == "restart"
    assert "capture" not in change.actions  # the hubs survive unless capture changes
    assert "mqtt" in change.live


def test_an_unchanged_config_touches_nothing(tmp_path: Path) -> None:
    change = planned(tmp_path)
    assert change.empty
    assert change.describe() == "nothing changes"


def test_a_threshold_change_keeps_raised_alerts_and_uses_the_new_threshold(
    tmp_path: Path,
) -> None:
    agent = agent_for(tmp_path)
    alerts = agent.part("alerts")
    before = {rule.name: rule for rule in alerts.rules}
    candidate = agent_for(tmp_path, health={"black_alert_s": 99})
    alerts.reconfigure(candidate.config)
    after = {rule.name: rule for rule in alerts.rules}
    assert after["camera_black"].hold_s == 99
    assert before["camera_black"].hold_s != 99
    assert set(after) == set(before)


async def wait_count(daemon: Any, text: str, count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while daemon.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"log never said {text!r} {count} times:\n{daemon.log()}")
        await asyncio.sleep(0.05)


def reload_seconds(text: str) -> list[float]:
    return [float(s) for s in re.findall(r"reloaded configuration in ([0-9.]+) s", text)]


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_health_change_during_a_live_lesson_applies_at_once_and_nobody_leaves(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    prefix = mosquitto.prefix
    lesson_topic = f"{prefix}/lesson/{GROUP}"
    offers = f"{prefix}/rtc/{ROOM2}/{MAIN}"
    main_health = f"{prefix}/school1/room1/health"
    room2_health = f"{prefix}/school1/room2/health"
    main_config = room_config(mosquitto.url, prefix, MAIN, tmp_path / "s-main")
    main = new_daemon(tmp_path, "main", main_config)
    room2 = new_daemon(
        tmp_path, "room2", room_config(mosquitto.url, prefix, ROOM2, tmp_path / "s-room2")
    )
    try:
        async with observing(mosquitto, f"{prefix}/#") as it:
            await main.start()
            await room2.start()
            await go_live(it, prefix)
            offers_before = len(it.received(offers))
            assert offers_before >= 1

            main.write_config({**main_config, "health": {"interval_s": 3}})
            assert main.process is not None
            sent = time.monotonic()
            main.process.send_signal(signal.SIGHUP)
            await main.wait_log("reloaded configuration in")
            applied_s = time.monotonic() - sent
            took = reload_seconds(main.log())
            log.info(
                "SIGHUP to applied (health.interval_s 1 -> 3, lesson live): %.3f s inside "
                "the daemon, %.2f s seen from the test",
                took[0],
                applied_s,
            )
            assert took[0] < 1.0
            assert "reconfigure" in main.log()

            # The new period is in force: health messages now come ~3 s apart.
            seen = len(it.received(main_health))
            await it.wait_for(main_health, lambda m: len(it.received(main_health)) >= seen + 3)
            stamps = [m.json()["ts"] for m in it.received(main_health)[seen:]]
            gaps = [b - a for a, b in itertools.pairwise(stamps[1:])]
            assert gaps
            assert min(gaps) > 2.0, gaps

            # Nobody left: no new offer, still live and joined.
            assert len(it.received(offers)) == offers_before
            latest_lesson = it.received(lesson_topic)[-1]
            assert ROOM2 in joined(latest_lesson)
            assert stream_state(it.received(room2_health)[-1]) == "live"
            assert "applying it when the live lesson ends" not in main.log()

            end = f"{prefix}/school1/room1/cmd/lesson-end"
            await it.publish(end, json.dumps({"id": "end-1", "args": {}}))
            assert (await it.wait_for(f"{end}/result", within=20)).json()["ok"]
            for daemon in (main, room2):
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.wait_exit() == 0
    finally:
        for daemon in (main, room2):
            await daemon.close()
    for daemon in (main, room2):
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.mark.slow
async def test_a_service_that_cannot_start_with_the_new_config_is_rolled_back(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    config = site_config(mosquitto, tmp_path)
    daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        async with observing(mosquitto, f"{base}/#") as observer:
            await daemon.start()
            await daemon.wait_notified("READY=1")
            await observer.wait_for(f"{base}/state", lambda m: m.json()["status"] == "online")
            metrics_on = {"metrics_enabled": True, "metrics_bind": "127.0.0.1"}
            daemon.write_config(
                {**config, "health": {**config["health"], **metrics_on, "metrics_port": busy_port}}
            )
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGHUP)
            await daemon.wait_log("new configuration not applied; keeping the running one")
            assert "metrics did not start" in daemon.log()
            # The old services kept running: health still flows, still online.
            seen = len(observer.received(f"{base}/health"))
            await observer.wait_for(
                f"{base}/health", lambda m: len(observer.received(f"{base}/health")) > seen + 1
            )
            assert daemon.process.returncode is None

            # The same change with a free port applies.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                free_port = probe.getsockname()[1]
            daemon.write_config(
                {**config, "health": {**config["health"], **metrics_on, "metrics_port": free_port}}
            )
            daemon.process.send_signal(signal.SIGHUP)
            await daemon.wait_log("serving Prometheus metrics on")
            await wait_count(daemon, "reloaded configuration in", 1)
            daemon.process.send_signal(signal.SIGTERM)
            assert await daemon.wait_exit() == 0
    # The failed start is in the journal with its traceback, as any service failure is.
    assert "cannot listen on 127.0.0.1" in daemon.log()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_moving_between_the_embedded_broker_and_a_configured_one(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    """Embedded -> configured: the link moves to the configured broker and the embedded
    Mosquitto stops. Configured -> embedded: an embedded one starts and the link moves
    there (the configured broker sees the room leave with a clean 'shutdown')."""
    configured = site_config(mosquitto, tmp_path)
    embedded = {**configured, "broker": {"topic_prefix": mosquitto.prefix}}
    daemon = daemon_factory(embedded)
    state = f"{mosquitto.prefix}/school1/room1/state"
    async with observing(mosquitto, state) as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")
        await daemon.wait_log("started the embedded Mosquitto at")
        assert observer.received(state) == []

        daemon.write_config(configured)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        await observer.wait_for(state, lambda m: m.json()["status"] == "online", within=20)
        await daemon.wait_log("stopped the embedded Mosquitto: broker.url is configured now")

        seen = len(observer.received(state))
        daemon.write_config(embedded)
        daemon.process.send_signal(signal.SIGHUP)
        offline = await observer.wait_for(
            state,
            lambda m: m.json()["status"] == "offline" and len(observer.received(state)) > seen,
            within=20,
        )
        assert offline.json()["reason"] == "shutdown"
        await wait_count(daemon, "reloaded configuration in", 2)
        assert daemon.log().count("started the embedded Mosquitto at") == 2
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
async def test_a_reload_whose_credentials_the_broker_refuses_keeps_the_old_link(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    """At start, refused credentials exit 2 (test_daemon.py); on reload the new link is on
    trial: its refusal fails only it, and the running link is put back."""
    config = site_config(mosquitto, tmp_path)
    daemon = daemon_factory(config)
    state = f"{mosquitto.prefix}/school1/room1/state"
    health = f"{mosquitto.prefix}/school1/room1/health"
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    async with observing(mosquitto, state, health) as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")
        await observer.wait_for(state, lambda m: m.json()["status"] == "online")
        daemon.write_config({**config, "broker": {**config["broker"], "password_file": str(wrong)}})
        assert daemon.process is not None
        births = len(observer.received(state))
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_log("new configuration not applied; keeping the running one")
        assert "refused the credentials" in daemon.log()
        # The old link is back: a fresh birth, and health flows again.
        await observer.wait_for(
            state,
            lambda m: m.json()["status"] == "online" and len(observer.received(state)) > births,
            within=20,
        )
        seen = len(observer.received(health))
        await observer.wait_for(health, lambda m: len(observer.received(health)) > seen + 1)
        assert daemon.process.returncode is None
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_mixed_change_applies_its_harmless_part_now_and_the_rest_after_the_lesson(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    main_room = {"groups": [{"group": "music", "role": "main", "receivers": ["school1.room2"]}]}
    daemon = daemon_factory(site_config(mosquitto, tmp_path, identity=main_room))
    health = f"{mosquitto.prefix}/school1/room1/health"
    async with observing(mosquitto, health) as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")
        await daemon.wait_log("teacher panel at ")
        found = re.search(r"teacher panel at (http://[0-9.:]+/)", daemon.log())
        assert found is not None, daemon.log()
        panel = PanelClient(found.group(1))
        started = await asyncio.to_thread(panel.start, None, "Mixed reload")
        assert started["ok"], started

        daemon.write_config(
            site_config(
                mosquitto,
                tmp_path,
                identity=main_room,
                health={"interval_s": 3},
                capture={"video": {"width": 640, "height": 360, "fps": 15}},
            )
        )
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_log("applying it when the live lesson ends")
        await daemon.wait_log("applied the part of the new configuration the lesson does not")
        assert "(health)" in daemon.log()
        # The health part is in force during the lesson; the camera is not changed yet.
        seen = len(observer.received(health))
        await observer.wait_for(health, lambda m: len(observer.received(health)) >= seen + 3)
        recent = observer.received(health)[seen:]
        gaps = [b.json()["ts"] - a.json()["ts"] for a, b in itertools.pairwise(recent[1:])]
        assert gaps
        assert min(gaps) > 2.0, gaps
        assert all(str(m.json()["capture"]["video"]["mode"]).startswith("320x240") for m in recent)
        status = await asyncio.to_thread(panel.status)
        assert status["hosting"][0]["lesson"]["lesson_id"] == started["lesson_id"]

        ended = await asyncio.to_thread(panel.end)
        assert ended["ok"], ended
        await observer.wait_for(
            health,
            lambda m: str(m.json()["capture"]["video"]["mode"]).startswith("640x360"),
            within=30,
        )
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()
