"""A receiving room's agent killed with ``kill -9`` mid-lesson rejoins when restarted.

Real ``classroom-agent run`` processes (main room and receiving room) on a real
Mosquitto, synthetic camera and microphone, the lesson started by the ``lesson-start``
command as IT or the panel would send it. Joins are read where the fleet reads them:
the retained announcement's ``joined`` list and the receiving room's health ``stream``.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BrokerUnderTest, MqttObserver, observing
from tests.test_daemon import Daemon

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

GROUP = "music"
MAIN = "school1.room1"
ROOM2 = "school1.room2"


def room_config(
    broker_url: str, prefix: str, device: str, state_dir: Path, ice: str = "127.0.0.1"
) -> dict[str, Any]:
    """A site file for one room of the group (anonymous on the test broker, so each
    room may read the others' state topics)."""
    site, room = device.split(".")
    membership: dict[str, Any] = {"group": GROUP, "role": "receiving"}
    if device == MAIN:
        membership = {"group": GROUP, "role": "main", "receivers": [ROOM2]}
    return {
        "identity": {"site": site, "room": room, "groups": [membership]},
        "hardware": {"profile": "virtual"},
        "broker": {
            "url": broker_url,
            "topic_prefix": prefix,
            "keepalive_s": 5,  # reconnect settings: the defaults
        },
        "capture": {"video": {"width": 320, "height": 240, "fps": 15}},
        "health": {"interval_s": 1},
        "stream": {
            "ice_host_addresses": [ice],
            "video_bitrate_kbps": 300,
            "media_timeout_s": 3,
            "panel_enabled": False,
        },
        "supervisor": {"state_dir": str(state_dir)},
    }


def joined(message: Any) -> list[str]:
    if not message.payload:
        return []
    return list(json.loads(message.payload)["joined"])


def stream_state(message: Any) -> str | None:
    stream = message.json().get("stream")
    return None if stream is None else stream.get("state")


async def start_lesson(observer: MqttObserver, prefix: str) -> None:
    base = f"{prefix}/school1/room1/cmd/lesson-start"
    await observer.publish(base, json.dumps({"id": "start-1", "args": {"subject": "Rejoin"}}))
    result = (await observer.wait_for(f"{base}/result", within=20)).json()
    assert result["ok"], result


def newer(observer: MqttObserver, topic: str, message: Any, seen: int) -> bool:
    """``message`` arrived after the first ``seen`` on ``topic`` (messages compare by
    value, so this goes by identity)."""
    return any(m is message for m in observer.received(topic)[seen:])


async def both_online(it: MqttObserver, prefix: str, seen: dict[str, int] | None = None) -> None:
    """Until both rooms' daemons have said they are online (with ``seen``: in a birth
    newer than the first ``seen[topic]`` messages, for daemons started again)."""
    for device in ("room1", "room2"):
        topic = f"{prefix}/school1/{device}/state"

        def online(m: Any, topic: str = topic) -> bool:
            fresh = seen is None or newer(it, topic, m, seen[topic])
            return bool(m.json()["status"] == "online") and fresh

        await it.wait_for(topic, online, within=30)


async def go_live(it: MqttObserver, prefix: str) -> None:
    """Both rooms online, the button pressed, and the receiving room joined and live."""
    await both_online(it, prefix)
    await start_lesson(it, prefix)
    await it.wait_for(f"{prefix}/lesson/{GROUP}", lambda m: ROOM2 in joined(m), within=30)
    health = f"{prefix}/school1/room2/health"
    await it.wait_for(health, lambda m: stream_state(m) == "live", within=30)


def new_daemon(tmp_path: Path, name: str, config: dict[str, Any]) -> Daemon:
    folder = tmp_path / name
    folder.mkdir()
    return Daemon(folder, config)


@pytest.mark.timeout(150)
async def test_receiving_room_killed_with_sigkill_rejoins_after_restart(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    prefix = mosquitto.prefix
    lesson_topic = f"{prefix}/lesson/{GROUP}"
    health = f"{prefix}/school1/room2/health"
    room2_state = f"{prefix}/school1/room2/state"
    main = new_daemon(
        tmp_path, "main", room_config(mosquitto.url, prefix, MAIN, tmp_path / "s-main")
    )
    room2_config = room_config(mosquitto.url, prefix, ROOM2, tmp_path / "s-room2")
    room2 = new_daemon(tmp_path, "room2", room2_config)
    again = new_daemon(tmp_path, "room2-again", room2_config)
    try:
        async with observing(mosquitto, f"{prefix}/#") as it:
            await main.start()
            await room2.start()
            await both_online(it, prefix)
            pressed = time.monotonic()
            await start_lesson(it, prefix)
            await it.wait_for(lesson_topic, lambda m: ROOM2 in joined(m), within=30)
            first_join_s = time.monotonic() - pressed
            await it.wait_for(health, lambda m: stream_state(m) == "live", within=30)

            # kill -9: no bye, no goodbye; the broker publishes the room's Last Will and
            # the main room drops it from the lesson.
            assert room2.process is not None
            before_kill = len(it.received(lesson_topic))
            room2.process.send_signal(signal.SIGKILL)
            await room2.wait_exit()
            killed = time.monotonic()
            await it.wait_for(room2_state, lambda m: m.json()["status"] == "offline", within=10)
            await it.wait_for(
                lesson_topic,
                lambda m: (
                    bool(m.payload)
                    and ROOM2 not in joined(m)
                    and newer(it, lesson_topic, m, before_kill)
                ),
                within=30,
            )
            dropped_s = time.monotonic() - killed

            seen = len(it.received(lesson_topic))
            restarted = time.monotonic()
            await again.start()
            await it.wait_for(
                lesson_topic,
                lambda m: ROOM2 in joined(m) and newer(it, lesson_topic, m, seen),
                within=60,
            )
            rejoin_s = time.monotonic() - restarted
            seen_health = len(it.received(health))
            await it.wait_for(
                health,
                lambda m: stream_state(m) == "live" and newer(it, health, m, seen_health),
                within=30,
            )
            log.info(
                "first join %.2f s after the button; kill -9 noticed by the main room after "
                "%.2f s; restarted agent live again %.2f s after its process started",
                first_join_s,
                dropped_s,
                rejoin_s,
            )
            assert rejoin_s < 30
            assert "lesson: live" in again.log()

            end = f"{prefix}/school1/room1/cmd/lesson-end"
            await it.publish(end, json.dumps({"id": "end-1", "args": {}}))
            assert (await it.wait_for(f"{end}/result", within=20)).json()["ok"]
            await it.wait_for(lesson_topic, lambda m: m.payload == b"", within=20)
            for daemon in (main, again):
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.wait_exit() == 0
    finally:
        for daemon in (main, room2, again):
            await daemon.close()
    for daemon in (main, again):
        assert "Traceback" not in daemon.log(), daemon.log()
