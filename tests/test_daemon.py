"""The daemon as systemd runs it: a real process, a real broker, signals and sd_notify."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
import wave
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml

from agent.panel import PanelClient
from agent.sensing.roster import open_store
from tests.brokers import ADMIN, DEVICE_1, BrokerUnderTest, observing
from tests.sensing_data import lesson_report

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {
    name: json.loads((REPO / "schemas" / f"{name}.v1.json").read_text())
    for name in ("state", "health", "alert")
}
pytestmark = pytest.mark.slow


class Daemon:
    """``classroom-agent run`` in a child process, with its log and sd_notify messages."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        launcher: Sequence[str] = (),
        python: str = sys.executable,
        cwd: Path = REPO,
    ) -> None:
        self.tmp_path = tmp_path
        self.launcher = tuple(launcher)  # e.g. ("ip", "netns", "exec", NAME)
        self.python, self.cwd = python, cwd  # another install (the packaging test)
        self.site_file = tmp_path / "agent.yaml"
        self.write_config(config)
        self.log_path = tmp_path / "agent.log"
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.notifications: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        self.site_file.write_text(yaml.safe_dump(config))

    async def start(self) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC="2000000")
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.launcher,
                self.python,
                "-m",
                "agent.cli",
                "run",
                "-c",
                str(self.site_file),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _drain(self) -> None:
        while True:
            try:
                self.notifications.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return

    async def wait_notified(self, text: str, after: int = 0, within: float = 20.0) -> int:
        """Index of the first notification after ``after`` that contains ``text``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self._drain()
            for index in range(after, len(self.notifications)):
                if text in self.notifications[index]:
                    return index
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {text!r} from sd_notify; got {self.notifications}\n{self.log()}")

    async def wait_log(self, text: str, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"log never said {text!r}:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, within: float = 20.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), within)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.notify.close()


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    daemons: list[Daemon] = []

    def make(config: dict[str, Any]) -> Daemon:
        daemon = Daemon(tmp_path, config)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        await daemon.close()


def site_config(mqtt: BrokerUnderTest, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "identity": {"site": "school1", "room": "room1", "display_name": "Room 1"},
        "hardware": {"profile": "virtual"},
        "broker": {
            "url": mqtt.url,
            "topic_prefix": mqtt.prefix,
            "username": DEVICE_1,
            "password_file": str(mqtt.password_file(DEVICE_1)),
            "keepalive_s": 5,
        },
        "capture": {"video": {"width": 320, "height": 240, "fps": 15}},
        "health": {"interval_s": 1},
        "stream": {"panel_port": 0},  # any free port: tests run side by side
        "supervisor": {"state_dir": str(tmp_path / "state")},
    }
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value}
    return config


async def test_daemon_lifecycle_ready_health_reload_and_clean_stop(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    config = site_config(mosquitto, tmp_path)
    daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    async with observing(mosquitto, f"{base}/#") as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")
        birth = await observer.wait_for(f"{base}/state", lambda m: m.json()["status"] == "online")
        assert birth.json()["profile"] == "virtual"
        health = await observer.wait_for(
            f"{base}/health",
            lambda m: (
                m.json()["capture"]["video"]["state"] == "ok"
                and m.json()["capture"]["video"]["fps"] > 5
            ),
            within=20,
        )
        body = health.json()
        # The real daemon's messages follow the published contracts.
        jsonschema.validate(birth.json(), SCHEMAS["state"])
        for message in observer.received(f"{base}/health"):
            jsonschema.validate(message.json(), SCHEMAS["health"])
        assert body["v"] == 1
        assert body["agent"]["services"]["mqtt"] == "running"
        assert body["mqtt"]["queued"] == 0
        assert body["capture"]["video"]["mode"].startswith("320x240")
        assert body["capture"]["audio"]["state"] == "ok"
        assert body["capture"]["audio"]["level_dbfs"] is not None
        await daemon.wait_notified("WATCHDOG=1")

        # An invalid file on reload is rejected; the running agent keeps going.
        daemon.write_config({**config, "capture": {"video": {"fps": 120}}})
        marker = len(daemon.notifications)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_log("rejected new configuration; keeping the running one")
        assert "capture.video.fps: must be <= 60, got 120 (agent.yaml line" in daemon.log()
        seen = len(observer.received(f"{base}/health"))
        await observer.wait_for(
            f"{base}/health", lambda m: len(observer.received(f"{base}/health")) > seen + 1
        )
        assert daemon.process.returncode is None

        # A valid change is applied.
        daemon.write_config(
            site_config(
                mosquitto, tmp_path, capture={"video": {"width": 640, "height": 360, "fps": 15}}
            )
        )
        daemon.process.send_signal(signal.SIGHUP)
        reloading = await daemon.wait_notified("RELOADING=1", after=marker)
        ready_again = await daemon.wait_notified("READY=1", after=reloading)
        await observer.wait_for(
            f"{base}/health",
            lambda m: str(m.json()["capture"]["video"]["mode"]).startswith("640x360"),
        )

        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        assert time.monotonic() - started < 5.0
        stopping = await daemon.wait_notified("STOPPING=1")
        # A reload is not a stop: systemd would never count the unit as active again.
        assert stopping > ready_again
        offline = await observer.wait_for(
            f"{base}/state", lambda m: m.json()["status"] == "offline"
        )
        assert offline.json()["reason"] == "shutdown"
    assert "Traceback" not in daemon.log()


async def test_a_reload_waits_for_the_live_lesson_to_end(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    """Restarting the capture would cut every room out of the lesson: a valid new file
    that changes the camera mode is applied when the lesson ends, not in the middle of it
    (a change the lesson does not run on applies at once: test_reload.py)."""
    main_room = {"groups": [{"group": "music", "role": "main", "receivers": ["school1.room2"]}]}
    daemon = daemon_factory(site_config(mosquitto, tmp_path, identity=main_room))
    await daemon.start()
    await daemon.wait_notified("READY=1")
    await daemon.wait_log("teacher panel at ")
    found = re.search(r"teacher panel at (http://[0-9.:]+/)", daemon.log())
    assert found is not None, daemon.log()
    panel = PanelClient(found.group(1))
    started = await asyncio.to_thread(panel.start, None, "Reload test")
    assert started["ok"], started

    daemon.write_config(
        site_config(
            mosquitto,
            tmp_path,
            identity=main_room,
            capture={"video": {"width": 640, "height": 360, "fps": 15}},
        )
    )
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    await daemon.wait_log("applying it when the live lesson ends")
    status = await asyncio.to_thread(panel.status)
    assert status["hosting"][0]["lesson"]["lesson_id"] == started["lesson_id"]
    assert "reloaded configuration" not in daemon.log()

    ended = await asyncio.to_thread(panel.end)
    assert ended["ok"], ended
    await daemon.wait_log("reloaded configuration")
    daemon.process.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()


async def test_refused_credentials_exit_2_with_a_clear_message(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    daemon = daemon_factory(site_config(mosquitto, tmp_path, broker={"password_file": str(wrong)}))
    await daemon.start()
    assert await daemon.wait_exit() == 2
    log = daemon.log()
    assert "refused the credentials" in log
    assert "broker.password_file" in log
    assert "Traceback" not in log


async def test_missing_camera_is_reported_and_the_daemon_keeps_running(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    config = site_config(
        mosquitto, tmp_path, capture={"video": {"source": "camera", "device": "/dev/video9"}}
    )
    daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    async with observing(mosquitto, f"{base}/health") as observer:
        await daemon.start()
        lost = await observer.wait_for(
            f"{base}/health", lambda m: m.json()["capture"]["video"]["state"] == "lost"
        )
    video = lost.json()["capture"]["video"]
    assert "/dev/video9" in video["reason"]
    assert lost.json()["capture"]["audio"]["state"] == "ok"
    assert daemon.process.returncode is None
    daemon.process.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_unreadable_wav_is_a_config_error(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    bad = tmp_path / "lesson.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00not a wav at all")
    config = site_config(
        mosquitto, tmp_path, capture={"audio": {"source": "file", "path": str(bad)}}
    )
    daemon = daemon_factory(config)
    await daemon.start()
    assert await daemon.wait_exit() == 2
    assert f"capture.audio.path: {bad} is not a readable WAV file" in daemon.log()
    assert "Traceback" not in daemon.log()


async def test_wav_file_source_feeds_the_audio_hub(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(48000)
        wav.writeframes((b"\x00\x10\x00\xf0") * 24000)  # 1 s square-ish wave
    config = site_config(
        mosquitto, tmp_path, capture={"audio": {"source": "file", "path": str(path)}}
    )
    daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    async with observing(mosquitto, f"{base}/health") as observer:
        await daemon.start()
        health = await observer.wait_for(
            f"{base}/health",
            lambda m: (
                m.json()["capture"]["audio"]["state"] == "ok"
                and m.json()["capture"]["audio"]["level_dbfs"] is not None
            ),
        )
    audio = health.json()["capture"]["audio"]
    assert audio["source"] == f"file {path}"
    assert -20 < audio["level_dbfs"] < -10  # 4096/32768 full scale is about -18 dBFS


def test_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    import subprocess

    site = tmp_path / "agent.yaml"
    site.write_text("identity: {site: s1, room: r1}\nlogging: {level: loud}\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(site)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert (
        "logging.level: must be one of 'debug', 'info', 'warning' or 'error', got 'loud'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


async def test_commands_over_mqtt_ping_restart_capture_and_selftest(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    # Loudspeakers into a WAV file: the self-test's echo-path check plays through them.
    playback = {"playback": {"output": "file", "path": str(tmp_path / "speakers.wav")}}
    daemon = daemon_factory(site_config(mosquitto, tmp_path, stream=playback))
    base = f"{mosquitto.prefix}/school1/room1"
    async with observing(mosquitto, f"{base}/#", user=ADMIN) as it:
        await daemon.start()
        await it.wait_for(f"{base}/state", lambda m: m.json()["status"] == "online")

        await it.publish(f"{base}/cmd/ping", json.dumps({"id": "p1", "args": {}}))
        ping = (await it.wait_for(f"{base}/cmd/ping/result")).json()
        assert (ping["id"], ping["ok"], ping["result"]["device"]) == ("p1", True, DEVICE_1)

        await it.publish(f"{base}/cmd/restart-capture", json.dumps({"id": "r1", "args": {}}))
        restart = (await it.wait_for(f"{base}/cmd/restart-capture/result", within=30)).json()
        assert restart["ok"], restart
        assert restart["result"] == {"video": "ok", "audio": "ok"}

        await it.publish(f"{base}/cmd/selftest", json.dumps({"id": "s1", "args": {}}))
        selftest = (await it.wait_for(f"{base}/cmd/selftest/result", within=60)).json()
        checks = {check["name"]: check["status"] for check in selftest["result"]["checks"]}
        assert checks["camera"] == "pass"
        assert checks["microphone"] == "pass"
        assert checks["broker"] == "pass"
        # The synthetic microphone does not hear the WAV file: nothing comes back.
        assert checks["echo_path"] == "pass", selftest["result"]["checks"]

        await it.publish(f"{base}/cmd/reboot", json.dumps({"id": "x1", "args": {}}))
        unknown = (await it.wait_for(f"{base}/cmd/reboot/result")).json()
        assert not unknown["ok"]
        assert "unknown command" in unknown["error"]
    assert daemon.process.returncode is None
    assert "Traceback" not in daemon.log()


async def test_a_teachers_correction_reaches_the_fleet(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any
) -> None:
    """The daemon's panel corrects a sealed report, and the room's sensing topic carries
    the lesson's attendance again with the corrected counts (sensing itself is off)."""
    lesson = "lesson-20261206-0800"
    store = open_store(tmp_path / "state" / "sensing", create=True)
    store.seal_record(lesson, lesson_report(lesson=lesson, start=time.time() - 3600), "report")
    daemon = daemon_factory(site_config(mosquitto, tmp_path))
    topic = f"{mosquitto.prefix}/school1/room1/sensing"
    async with observing(mosquitto, topic, user=ADMIN) as it:
        await daemon.start()
        await daemon.wait_log("lesson kiosk at ")  # a receiving room's panel
        found = re.search(r"lesson kiosk at (http://[0-9.:]+/)", daemon.log())
        assert found is not None, daemon.log()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{found.group(1)}api/reports/{lesson}/corrections",
                json={"student": "s-c", "status": "present"},
            ) as reply,
        ):
            assert reply.status == 200, await reply.text()
        counts = (await it.wait_for(topic, within=30)).json()
    jsonschema.validate(counts, json.loads((REPO / "schemas" / "sensing.v1.json").read_text()))
    assert (counts["lesson"], counts["kind"], counts["device"]) == (lesson, "attendance", DEVICE_1)
    assert (counts["present"], counts["absent"], counts["corrections"]) == (2, 0, 1)
    assert "Traceback" not in daemon.log()
