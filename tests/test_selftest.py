"""The pre-class self-test with real hubs on real sources, and fake hardware where needed.

Fake devices are small `VideoSource` subclasses standing in for cameras that fail the
ways real ones do (a covered lens, a stuck driver buffer); the hubs and checks are the
real ones. Watch times are shortened through `SelftestThresholds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.capture import AudioHub, FrameHub, VideoMode, VideoSource
from agent.capture.audio import SyntheticAudioSource, WavFileSource
from agent.capture.video import SyntheticVideoSource, open_video_source
from agent.config import load_config
from agent.config.models import CaptureConfig, HealthConfig, VideoConfig
from agent.health.selftest import (
    CheckStatus,
    SelftestThresholds,
    check_disk,
    run_selftest,
    run_selftest_cli,
    selftest_handler,
)
from agent.stream import open_playback
from agent.sync.commands import CommandService
from tests.brokers import ADMIN, DEVICE_1, BrokerUnderTest, make_link, observing, running

CAPTURE = CaptureConfig(stall_timeout_s=1.0, frozen_after_s=1.0, retry_min_s=0.1, retry_max_s=0.5)
QUICK = SelftestThresholds(video_s=0.6, audio_s=1.0, first_item_timeout_s=5.0, min_free_mb=1)


def always_synced() -> bool:
    return True


class FlatCamera(VideoSource):
    """Fake hardware: 20 fps of small frames around one brightness.

    ``noise`` > 0 makes every frame differ (a real sensor); 0 repeats the same frame
    exactly (a stuck driver buffer).
    """

    def __init__(self, level: int, noise: int) -> None:
        self.level = level
        self.noise = noise
        self._rng = np.random.default_rng(1)
        self._wake = threading.Event()

    @property
    def description(self) -> str:
        return f"fake camera (level {self.level})"

    def open(self) -> VideoMode:
        self._wake.clear()
        return VideoMode(160, 120, 20, "FAKE")

    def read(self) -> np.ndarray:
        self._wake.wait(0.05)
        if self.noise:
            noise = self._rng.integers(0, self.noise + 1, (120, 160, 3))
            return np.clip(self.level + noise, 0, 255).astype(np.uint8)
        return np.full((120, 160, 3), self.level, dtype=np.uint8)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        self._wake.set()


def silent_wav(path: Path, seconds: float = 1.0, rate: int = 48000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return path


def loud_wav(path: Path, seconds: float = 1.0, rate: int = 48000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave_ = np.clip(3.0 * 32767 * np.sin(2 * np.pi * 440 * t), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(wave_.tobytes())
    return path


@contextlib.asynccontextmanager
async def hubs(video: VideoSource, audio: Any) -> AsyncIterator[tuple[FrameHub, AudioHub]]:
    video_hub = FrameHub(video, CAPTURE)
    audio_hub = AudioHub(audio, CAPTURE)
    tasks = [
        asyncio.create_task(video_hub.run(), name="test video hub"),
        asyncio.create_task(audio_hub.run(), name="test audio hub"),
    ]
    try:
        yield video_hub, audio_hub
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def synthetic_audio() -> SyntheticAudioSource:
    return SyntheticAudioSource(48000, 1, 20)


async def test_synthetic_room_passes_every_check(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    link = make_link(mosquitto, user=DEVICE_1)  # held to the fleet ACL
    async with (
        hubs(SyntheticVideoSource(320, 240, 15), synthetic_audio()) as (video, audio),
        running(link),
    ):
        report = await run_selftest(
            video,
            audio,
            link=link,
            state_dir=tmp_path / "state",  # does not exist yet: measured at its parent
            thresholds=QUICK,
            clock_synced=always_synced,
        )
    statuses = {check.name: check.status for check in report.checks}
    # No loudspeakers given: the echo-path check says so instead of passing.
    assert statuses == {
        **dict.fromkeys(("camera", "microphone", "disk", "clock", "broker"), CheckStatus.PASS),
        "echo_path": CheckStatus.SKIP,
    }, report.format_table()
    assert report.ok
    camera = report.check("camera")
    assert camera.details["frames"] >= 5
    assert camera.details["mean_luma"] > 16
    assert camera.details["max_frame_change"] > 0
    assert "moving picture" in camera.message
    assert report.check("microphone").details["level_dbfs"] > -30
    broker = report.check("broker")
    assert broker.details["round_trip_ms"] >= broker.details["publish_rtt_ms"] >= 0
    data = report.to_dict()
    assert data["device"] == DEVICE_1
    assert data["ok"] is True
    assert [c["name"] for c in data["checks"]] == [
        "camera",
        "microphone",
        "echo_path",
        "disk",
        "clock",
        "broker",
    ]
    json.dumps(data)  # the report goes over MQTT as the command's result
    table = report.format_table()
    assert table.startswith(f"Self-test of {DEVICE_1}: READY")
    assert "PASS  camera" in table


async def test_black_camera_fails_with_what_to_do(tmp_path: Path) -> None:
    async with hubs(FlatCamera(level=2, noise=4), synthetic_audio()) as (video, audio):
        report = await run_selftest(
            video, audio, state_dir=tmp_path, thresholds=QUICK, clock_synced=always_synced
        )
    camera = report.check("camera")
    assert camera.status is CheckStatus.FAIL
    assert "camera (fake camera (level 2)): the picture is black" in camera.message
    assert "lens cap" in camera.message
    assert camera.details["mean_luma"] < 16
    assert report.check("microphone").status is CheckStatus.PASS
    assert report.check("broker").status is CheckStatus.SKIP
    assert not report.ok
    assert "FAIL  camera" in report.format_table()
    assert "NOT READY" in report.format_table()


async def test_frozen_camera_fails(tmp_path: Path) -> None:
    async with hubs(FlatCamera(level=120, noise=0), synthetic_audio()) as (video, audio):
        report = await run_selftest(
            video, audio, state_dir=tmp_path, thresholds=QUICK, clock_synced=always_synced
        )
    camera = report.check("camera")
    assert camera.status is CheckStatus.FAIL
    assert "the picture is frozen" in camera.message
    assert camera.details["max_frame_change"] == 0


async def test_silent_microphone_fails(tmp_path: Path) -> None:
    wav = WavFileSource(silent_wav(tmp_path / "silence.wav"), 48000, 1, 20)
    async with hubs(SyntheticVideoSource(160, 120, 15), wav) as (video, audio):
        report = await run_selftest(
            video, audio, state_dir=tmp_path, thresholds=QUICK, clock_synced=always_synced
        )
    mic = report.check("microphone")
    assert mic.status is CheckStatus.FAIL, mic.message
    assert mic.message.startswith(f"microphone (file {tmp_path / 'silence.wav'}): silent")
    assert "unmute the microphone" in mic.message
    assert mic.details["level_dbfs"] == -120
    assert report.check("camera").status is CheckStatus.PASS


async def test_clipping_microphone_fails(tmp_path: Path) -> None:
    wav = WavFileSource(loud_wav(tmp_path / "loud.wav"), 48000, 1, 20)
    async with hubs(SyntheticVideoSource(160, 120, 15), wav) as (video, audio):
        report = await run_selftest(
            video, audio, state_dir=tmp_path, thresholds=QUICK, clock_synced=always_synced
        )
    mic = report.check("microphone")
    assert mic.status is CheckStatus.FAIL
    assert "clipping" in mic.message
    assert "lower the microphone gain" in mic.message


async def test_missing_camera_fails_with_a_clear_message(tmp_path: Path) -> None:
    source = open_video_source(VideoConfig(source="camera", device="/dev/video9"))
    limits = SelftestThresholds(video_s=0.5, audio_s=1.0, first_item_timeout_s=1.5, min_free_mb=1)
    async with hubs(source, synthetic_audio()) as (video, audio):
        report = await run_selftest(
            video, audio, state_dir=tmp_path, thresholds=limits, clock_synced=always_synced
        )
    camera = report.check("camera")
    assert camera.status is CheckStatus.FAIL
    assert camera.message.startswith("camera /dev/video9: no picture within 1.5 s (lost:")
    assert "/dev/video9 does not exist" in camera.message
    assert "plugged in" in camera.message
    assert camera.details["frames"] == 0


def test_disk_and_clock_checks(tmp_path: Path) -> None:
    ok = check_disk(tmp_path, SelftestThresholds(min_free_mb=1))
    assert ok.status is CheckStatus.PASS
    assert ok.details["free_mb"] > 1
    full = check_disk(tmp_path, SelftestThresholds(min_free_mb=1e12))
    assert full.status is CheckStatus.FAIL
    assert full.message.startswith("disk: only ")
    assert str(tmp_path) in full.message
    assert "free some space" in full.message


async def test_unsynchronised_clock_and_unreachable_broker_fail(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    link = make_link(mosquitto, user=DEVICE_1)  # never started: not connected
    limits = SelftestThresholds(broker_timeout_s=0.3, min_free_mb=1)
    report = await run_selftest(
        None, None, link=link, state_dir=tmp_path, thresholds=limits, clock_synced=lambda: False
    )
    assert report.check("camera").status is CheckStatus.SKIP
    assert report.check("microphone").status is CheckStatus.SKIP
    clock = report.check("clock")
    assert clock.status is CheckStatus.FAIL
    assert "not synchronised" in clock.message
    broker = report.check("broker")
    assert broker.status is CheckStatus.FAIL
    assert broker.message.startswith(f"broker {mosquitto.url}: not connected")
    unknown = await run_selftest(None, None, state_dir=tmp_path, clock_synced=lambda: None)
    assert unknown.check("clock").status is CheckStatus.SKIP


def test_thresholds_follow_the_alert_config() -> None:
    health = HealthConfig(black_luma_max=20, mic_silent_dbfs=-50, disk_alert_percent=80)
    limits = SelftestThresholds.from_health(health, video_s=1.0)
    assert (limits.black_luma, limits.silence_dbfs, limits.max_disk_percent) == (20, -50, 80)
    assert limits.video_s == 1.0


async def test_selftest_over_mqtt(mosquitto: BrokerUnderTest, tmp_path: Path) -> None:
    link = make_link(mosquitto, user=DEVICE_1)
    service = CommandService(link)
    result_topic = link.topics.cmd_result("selftest")
    async with (
        hubs(SyntheticVideoSource(160, 120, 15), synthetic_audio()) as (video, audio),
        observing(mosquitto, result_topic, user=ADMIN) as it,
        running(link),
    ):
        service.register(
            "selftest",
            selftest_handler(video, audio, state_dir=tmp_path, link=link, thresholds=QUICK),
            args={},
        )
        task = asyncio.create_task(service.run(), name="test-commands")
        try:
            deadline = time.monotonic() + 20
            while not it.received(result_topic):  # until the service's subscription is in
                assert time.monotonic() < deadline, "no selftest result"
                await it.publish(link.topics.cmd("selftest"), json.dumps({"id": "pre-class"}))
                with contextlib.suppress(pytest.fail.Exception):
                    await it.wait_for(result_topic, within=4)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    result = it.received(result_topic)[0].json()
    assert result["id"] == "pre-class"
    assert result["ok"] is True  # the command ran; the report says whether the room is ready
    report = result["result"]
    assert report["device"] == DEVICE_1
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["camera"] == statuses["microphone"] == statuses["broker"] == "pass"


def test_cli_prints_a_table_or_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.health.selftest.read_clock_synced", always_synced)
    site = tmp_path / "agent.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "identity": {"site": "s1", "room": "r1"},
                "capture": {"video": {"width": 320, "height": 240, "fps": 15}},
                "supervisor": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    loaded = load_config([site], profile="virtual")
    limits = SelftestThresholds.from_health(
        loaded.config.health, video_s=0.5, audio_s=1.0, min_free_mb=1
    )
    out = io.StringIO()
    code = run_selftest_cli(loaded, json_output=True, out=out, thresholds=limits)
    report = json.loads(out.getvalue())
    assert code == 0, out.getvalue()
    assert report["device"] == "s1.r1"
    broker = next(c for c in report["checks"] if c["name"] == "broker")
    assert broker["status"] == "skip"
    assert "embedded broker" in broker["message"]

    table = io.StringIO()
    assert run_selftest_cli(loaded, json_output=False, out=table, thresholds=limits) == 0
    assert table.getvalue().startswith("Self-test of s1.r1: READY")

    # a missing camera: exit 1 and the table says which peripheral and what to do
    site.write_text(
        yaml.safe_dump(
            {
                "identity": {"site": "s1", "room": "r1"},
                "capture": {"video": {"source": "camera", "device": "/dev/video9"}},
                "supervisor": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    broken = load_config([site], profile="virtual")
    quick_fail = SelftestThresholds(
        video_s=0.5, audio_s=1.0, first_item_timeout_s=1.0, min_free_mb=1
    )
    table = io.StringIO()
    assert run_selftest_cli(broken, json_output=False, out=table, thresholds=quick_fail) == 1
    assert "FAIL  camera" in table.getvalue()
    assert "/dev/video9 does not exist" in table.getvalue()


def test_cli_plays_the_echo_test_sound_on_the_configured_loudspeakers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.health.selftest.read_clock_synced", always_synced)
    speaker = tmp_path / "speaker.wav"
    site = tmp_path / "agent.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "identity": {"site": "s1", "room": "r1"},
                "capture": {"video": {"width": 320, "height": 240, "fps": 15}},
                "stream": {"playback": {"output": "file", "path": str(speaker)}},
                "supervisor": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    loaded = load_config([site], profile="virtual")
    limits = SelftestThresholds.from_health(
        loaded.config.health, video_s=0.5, audio_s=1.0, min_free_mb=1
    )
    out = io.StringIO()
    playback = loaded.config.stream.playback
    code = run_selftest_cli(
        loaded,
        json_output=True,
        out=out,
        thresholds=limits,
        open_speaker=lambda: open_playback(playback),
    )
    report = json.loads(out.getvalue())
    echo = next(c for c in report["checks"] if c["name"] == "echo_path")
    # The synthetic microphone does not hear the file: nothing comes back, and the
    # stage ran with the loudspeakers as its reference.
    assert code == 0, out.getvalue()
    assert echo["status"] == "pass", echo
    assert echo["details"]["processing"]["reference"] == "playing"
    with wave.open(str(speaker)) as wav:  # the test sound went to the loudspeakers
        assert wav.getnframes() >= 3 * 48_000


async def test_cli_checks_the_broker_without_knocking_the_daemon_off(
    mosquitto: BrokerUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI connects as ``site.room-selftest`` with the device's own credentials."""
    monkeypatch.setattr("agent.health.selftest.read_clock_synced", always_synced)
    site, room = DEVICE_1.split(".")
    config = {
        "identity": {"site": site, "room": room},
        "broker": {
            "url": mosquitto.url,
            "topic_prefix": mosquitto.prefix,
            "password_file": str(mosquitto.password_file(DEVICE_1)),
            "keepalive_s": 5,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
        },
        "capture": {"video": {"width": 160, "height": 120, "fps": 15}},
        "supervisor": {"state_dir": str(tmp_path / "state")},
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config([tmp_path / "agent.yaml"], profile="virtual")
    limits = SelftestThresholds(video_s=0.5, audio_s=1.0, min_free_mb=1)
    daemon = make_link(mosquitto, user=DEVICE_1)
    async with running(daemon):
        out = io.StringIO()
        code = await asyncio.to_thread(
            run_selftest_cli, loaded, json_output=True, out=out, thresholds=limits
        )
        stats = daemon.stats()
    report = json.loads(out.getvalue())
    broker = next(c for c in report["checks"] if c["name"] == "broker")
    assert broker["status"] == "pass", broker
    assert code == 0, out.getvalue()
    assert (stats.connects, stats.disconnects) == (1, 0)  # the daemon kept its session
