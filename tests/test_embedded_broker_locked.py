"""The embedded broker (the demo's, and a room's with no ``broker.url``) is locked down as
a school's is: no anonymous client, a password per room, the fleet's ACL. A process
without credentials cannot connect; one with another room's cannot publish as this
room (its state, its signalling) nor read this room's commands."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.broker import locked_broker
from agent.config import IdentityConfig
from tests.brokers import MqttObserver
from tests.test_daemon import daemon_factory

__all__ = ["daemon_factory"]  # a fixture, used below

PREFIX = "edu"
MAIN, ROOM2 = "central.room-101", "village.room-1"


def identities() -> list[IdentityConfig]:
    main = {"group": "g5", "role": "main", "receivers": [ROOM2]}
    return [
        IdentityConfig.model_validate({"site": "central", "room": "room-101", "groups": [main]}),
        IdentityConfig.model_validate(
            {"site": "village", "room": "room-1", "groups": [{"group": "g5", "role": "receiving"}]}
        ),
    ]


def client(url: str, credentials: Any, user: str) -> MqttObserver:
    password = credentials.password_file(user).read_text().strip()
    return MqttObserver(url, username=user, password=password)


async def test_the_locked_broker_refuses_strangers_and_other_rooms(tmp_path: Path) -> None:
    broker, credentials = locked_broker(
        identities(), tmp_path / "broker", prefix=PREFIX, readers=["dashboard"], admins=["it"]
    )
    main_state = f"{PREFIX}/central/room-101/state"
    main_cmd = f"{PREFIX}/central/room-101/cmd/lesson-end"
    own_state = f"{PREFIX}/village/room-1/state"
    bye_as_main = f"{PREFIX}/rtc/{MAIN}/{ROOM2}"
    # The passwords are the agent's alone.
    assert stat.S_IMODE(os.stat(tmp_path / "broker").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(credentials.password_file(MAIN)).st_mode) == 0o600
    async with broker:
        stranger = MqttObserver(broker.url)
        with pytest.raises(ConnectionError, match="refused"):
            await stranger.start()
        wrong = MqttObserver(broker.url, username=MAIN, password="guessed")
        with pytest.raises(ConnectionError, match="refused"):
            await wrong.start()

        watcher = client(broker.url, credentials, "dashboard")
        await watcher.start(f"{PREFIX}/#")
        main = client(broker.url, credentials, MAIN)
        await main.start(main_cmd)
        other = client(broker.url, credentials, ROOM2)
        await other.start(main_cmd)
        it = client(broker.url, credentials, "it")
        await it.start()
        try:
            # Another room's credentials cannot speak as the main room...
            await other.publish(main_state, json.dumps({"status": "offline"}), retain=True)
            await other.publish(bye_as_main, json.dumps({"v": 1, "type": "bye"}))
            # ...while its own topics work (a marker that arrives after the forgeries).
            await other.publish(own_state, "marker")
            await watcher.wait_for(own_state, lambda m: m.payload == b"marker")
            assert watcher.received(main_state) == []
            assert watcher.received(bye_as_main) == []

            # ...nor read the main room's commands, which the main room itself gets.
            await it.publish(main_cmd, json.dumps({"id": "c1", "args": {}}))
            await main.wait_for(main_cmd)
            await it.publish(own_state.replace("state", "cmd/ping"), "{}")  # ordering marker
            await watcher.wait_for(main_cmd)
            assert other.received(main_cmd) == []
        finally:
            for observer in (watcher, main, other, it):
                await observer.stop()


@pytest.mark.slow
async def test_a_room_with_no_broker_configured_runs_on_a_locked_embedded_broker(
    tmp_path: Path, daemon_factory: Any
) -> None:
    state_dir = tmp_path / "state"
    config = {
        "identity": {"site": "school1", "room": "room1"},
        "hardware": {"profile": "virtual"},
        "capture": {"video": {"width": 320, "height": 240, "fps": 15}},
        "health": {"interval_s": 1},
        "stream": {"panel_port": 0},
        "supervisor": {"state_dir": str(state_dir)},
    }
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_notified("READY=1")
    await daemon.wait_log("connected to mqtt://127.0.0.1:")
    log = daemon.log()
    url = log.split("started the embedded Mosquitto at ", 1)[1].split()[0]
    stranger = MqttObserver(url)
    with pytest.raises(ConnectionError, match="refused"):
        await stranger.start()
    # A maintenance dashboard on the PC reads with its own generated password.
    password = (state_dir / "embedded-broker" / "dashboard.password").read_text().strip()
    dashboard = MqttObserver(url, username="dashboard", password=password)
    await dashboard.start("edu/school1/room1/state")
    try:
        birth = await dashboard.wait_for(
            "edu/school1/room1/state", lambda m: m.json()["status"] == "online"
        )
        assert birth.json()["device"] == "school1.room1"
    finally:
        await dashboard.stop()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()
