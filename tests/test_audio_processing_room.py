"""The processing stage on the real path: a room's loudspeaker looped into its own mic.

The loudspeaker is the playback's WAV-file output; the microphone is
`agent.testkit.acoustics.LoudspeakerEcho`, which plays that file back in real time
through a synthetic room response (20 ms, RT60 0.3 s), with noise and, when asked, a
pupil talking (espeak-ng). Everything else is the daemon's own: the playback thread
stamping what it plays into the canceller's reference, the microphone hub with its
processing stage, the self-test's echo-path check, and (slow tier) a live lesson
between two agents over a real Mosquitto and real aiortc peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config import AudioProcessingConfig
from agent.config.models import AudioConfig, CaptureConfig
from agent.health.selftest import CheckStatus, SelftestThresholds, check_echo_path
from agent.stream.playback import AudioPlayback, WavFileOutput
from agent.testkit.acoustics import FAR_TEXT, NEAR_TEXT, LoudspeakerEcho, speech, to_int16
from tests import rooms
from tests.brokers import BrokerUnderTest, eventually, observing
from tests.test_daemon import daemon_factory, site_config  # noqa: F401  (a fixture)

QUICK = SelftestThresholds(first_item_timeout_s=5.0)


def capture(mode: str, **stages: bool) -> CaptureConfig:
    processing = AudioProcessingConfig(mode=mode, **stages)  # type: ignore[arg-type]
    return CaptureConfig(audio=AudioConfig(processing=processing))


@contextlib.asynccontextmanager
async def looped_room(
    tmp_path: Path, config: CaptureConfig
) -> AsyncIterator[tuple[AudioHub, AudioPlayback]]:
    """A room whose microphone hears its own loudspeaker, both running."""
    speaker = tmp_path / "speaker.wav"
    output = WavFileOutput(speaker)
    playback = AudioPlayback(output)
    hub = AudioHub(LoudspeakerEcho(speaker, output.frame_heard_at), config)
    playback.reference = hub.echo_reference()  # what the stream service wires
    playback.start()
    task = asyncio.create_task(hub.run(), name="test-room-mic")
    try:
        yield hub, playback
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await playback.stop()


async def test_selftest_echo_path_passes_with_the_canceller(tmp_path: Path) -> None:
    async with looped_room(tmp_path, capture("auto")) as (hub, playback):
        result = await check_echo_path(hub, playback, QUICK)
    assert result.status is CheckStatus.PASS, (result.message, result.details)
    assert result.details["rise_db"] <= 10
    # The microphone did hear the loudspeaker: the raw input was far above the room.
    assert result.details["microphone_input_dbfs"] > result.details["room_level_dbfs"] + 20
    processing = result.details["processing"]
    assert processing["reference"] == "playing"
    assert processing["echo_path_ms"] is not None
    assert 0 <= processing["echo_path_ms"] <= 120


async def test_selftest_echo_path_fails_without_the_canceller(tmp_path: Path) -> None:
    config = capture("on", echo_cancellation=False)
    async with looped_room(tmp_path, config) as (hub, playback):
        result = await check_echo_path(hub, playback, QUICK)
    assert result.status is CheckStatus.FAIL
    assert result.details["rise_db"] > 20
    assert "echo_cancellation on" in result.message


async def test_selftest_echo_path_is_skipped_without_loudspeakers(tmp_path: Path) -> None:
    async with looped_room(tmp_path, capture("auto")) as (hub, _):
        result = await check_echo_path(hub, None, QUICK)
    assert result.status is CheckStatus.SKIP
    assert "no loudspeakers" in result.message


class ReceivedAudio:
    """An observer in the main room: the audio it receives from each room, mono float,
    with the time each frame arrived."""

    def __init__(self) -> None:
        self.frames: dict[str, list[tuple[float, NDArray[np.float32]]]] = {}

    def observe(self, source: str, kind: str, frame: Any) -> None:
        if kind != "audio":
            return
        channels = len(frame.layout.channels)
        pcm = frame.to_ndarray().reshape(-1, channels).astype(np.float32) / 32768.0
        self.frames.setdefault(source, []).append((time.monotonic(), pcm.mean(axis=1)))

    def track_ended(self, source: str, kind: str) -> None:
        pass

    def seconds_since(self, source: str, since: float) -> float:
        return sum(len(f) for t, f in self.frames.get(source, []) if t >= since) / 48_000

    def level(self, source: str, since: float, until: float) -> float:
        parts = [f for t, f in self.frames.get(source, []) if since <= t < until]
        samples = np.concatenate(parts) if parts else np.zeros(1, np.float32)
        return 10 * float(np.log10(max(float(np.mean(np.square(samples))), 1e-12)))

    def median_level(self, source: str, since: float, until: float) -> float:
        """The median level (dBFS) of the 1 s windows from ``since`` to ``until``."""
        steps = np.arange(since, until - 0.999, 1.0)
        return float(np.median([self.level(source, t, t + 1) for t in steps]))

    async def level_with_talker(self, source: str, mic: LoudspeakerEcho, who: str) -> float:
        """``mic``'s talker starts: the median level of ``source`` from 1 to 5 s after."""
        mic.talking.set()
        talk = time.monotonic()
        await eventually(
            lambda: self.seconds_since(source, talk) >= 5,
            within=30,
            what=f"5 s of {who} talking",
        )
        return self.median_level(source, talk + 1, talk + 5)


def _write_wav(path: Path, signal: NDArray[np.float32]) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(48_000)
        wav.writeframes(to_int16(signal).tobytes())
    return path


@pytest.mark.slow
async def test_live_lesson_the_main_room_does_not_hear_its_teacher_back(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    """Two receiving rooms play the main room's teacher on their loudspeakers and hear
    it in their microphones; room2 runs the processing stage (the default), room3 has it
    off (the control, so the test can tell). The main room's received audio of room2
    carries no audible teacher, of room3 the full echo; room2's pupil still comes
    through once she speaks."""
    teacher = _write_wav(tmp_path / "teacher.wav", speech(FAR_TEXT))
    pupil = speech(NEAR_TEXT, voice="en-gb+f3", wpm=165)
    small = rooms.SMALL
    main_audio = AudioConfig(
        source="file", path=teacher, processing=AudioProcessingConfig(mode="off")
    )
    main_capture = small.model_copy(update={"audio": main_audio})
    main_hubs = (
        FrameHub(open_video_source(small.video), small),
        AudioHub(open_audio_source(main_audio), main_capture),
    )
    received = ReceivedAudio()

    def receiving(
        name: str, mode: str
    ) -> tuple[FrameHub, AudioHub, AudioPlayback, LoudspeakerEcho]:
        speaker = tmp_path / f"{name}-speaker.wav"
        output = WavFileOutput(speaker)
        mic = LoudspeakerEcho(speaker, output.frame_heard_at, talker=pupil)
        config = capture(mode).model_copy(update={"video": small.video})
        hub = AudioHub(mic, config)
        return (
            FrameHub(open_video_source(small.video), small),
            hub,
            AudioPlayback(output),
            mic,
        )

    v2, a2, play2, mic2 = receiving("room2", "auto")
    v3, a3, play3, mic3 = receiving("room3", "off")
    hubs = [*main_hubs, v2, a2, v3, a3]
    tasks = [asyncio.create_task(h.run(), name=f"test-hub-{i}") for i, h in enumerate(hubs)]
    try:
        async with (
            rooms.room(
                mosquitto, rooms.MAIN, main=True, hubs=main_hubs, observers=[received]
            ) as main,
            rooms.room(mosquitto, rooms.ROOM2, hubs=(v2, a2), playback=play2) as room2,
            rooms.room(mosquitto, rooms.ROOM3, hubs=(v3, a3), playback=play3) as room3,
        ):
            assert play2.reference is not None  # the stream service wired it
            assert play3.reference is None  # processing off: nothing to feed
            await main.host.start_lesson("English, grade 4")
            await rooms.until_live(room2, room3)
            # Both rooms' loudspeakers play the teacher and their microphones hear it.
            await eventually(
                lambda: min(mic2.heard_frames, mic3.heard_frames) > 3 * 48_000,
                within=30,
                what="3 s of the teacher on both rooms' loudspeakers",
            )
            start = time.monotonic()
            await eventually(
                lambda: (
                    min(received.seconds_since(d, start) for d in (rooms.ROOM2, rooms.ROOM3)) >= 10
                ),
                within=40,
                what="10 s of both rooms' sound at the main room",
            )
            # Median of 1 s windows: one window of a re-converging canceller on a busy
            # machine (other tests run beside this one) is not what a lesson sounds like.
            echo2 = received.median_level(rooms.ROOM2, start + 2, start + 10)
            echo3 = received.median_level(rooms.ROOM3, start + 2, start + 10)
            stats = a2.stats().to_dict()["processing"]
            # The pupil speaks (double talk with the teacher on the loudspeaker).
            voice2 = await received.level_with_talker(rooms.ROOM2, mic2, "room2 with its pupil")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(  # the figures, for `pytest -s` (the issue note quotes them)
        f"received at the main room: room3 (no processing) {echo3:.1f} dBFS, room2 "
        f"{echo2:.1f} dBFS, room2 with its pupil talking {voice2:.1f} dBFS; room2's stage: "
        f"{stats}"
    )
    # Without the stage the main room hears its teacher back loudly...
    assert echo3 >= -40, f"control room's echo {echo3:.1f} dBFS: the loop did not work"
    # ...with it, down to the room's noise (about -57 dBFS once gain control has lifted
    # the -60 dBFS noise floor): 20 dB and more below the control.
    assert echo3 - echo2 >= 20, (echo2, echo3, stats)
    assert echo2 <= -48, (echo2, stats)
    assert voice2 >= echo2 + 15, (voice2, echo2)
    assert stats["cancelling"] is True
    assert stats["reference"] == "playing"
    assert stats["echo_path_ms"] is not None


@pytest.mark.slow
async def test_live_lesson_a_main_room_with_loudspeakers_sends_the_pupil_no_echo(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    """The main room plays its receiving room on loudspeakers (a WAV file) and its
    microphone hears them back through a simulated room; the receiving room's pupil
    must not hear herself come back with the teacher. ERLE on the received track: the
    echo's level at the main room's microphone over what room2 receives from the main
    room (the default chain, gain control included), then the teacher speaks."""
    pupil = _write_wav(tmp_path / "pupil.wav", speech(NEAR_TEXT, voice="en-gb+f3", wpm=165))
    small = rooms.SMALL
    room2_audio = AudioConfig(
        source="file", path=pupil, processing=AudioProcessingConfig(mode="off")
    )
    room2_capture = small.model_copy(update={"audio": room2_audio})
    room2_hubs = (
        FrameHub(open_video_source(small.video), small),
        AudioHub(open_audio_source(room2_audio), room2_capture),
    )
    speaker = tmp_path / "main-speaker.wav"
    output = WavFileOutput(speaker)
    # A quiet room (-80 dBFS noise): at -60 the residual is the noise floor that gain
    # control lifts, and the figure would measure the floor, not the echo.
    mic = LoudspeakerEcho(speaker, output.frame_heard_at, talker=speech(FAR_TEXT), noise_dbfs=-80.0)
    main_capture = capture("auto").model_copy(update={"video": small.video})
    main_hubs = (FrameHub(open_video_source(small.video), small), AudioHub(mic, main_capture))
    playback = AudioPlayback(output)
    received = ReceivedAudio()  # at room2: what the main room sends it
    hubs = [*main_hubs, *room2_hubs]
    tasks = [asyncio.create_task(h.run(), name=f"test-hub-{i}") for i, h in enumerate(hubs)]
    try:
        async with (
            rooms.room(
                mosquitto,
                rooms.MAIN,
                main=True,
                hubs=main_hubs,
                playback=playback,
                receivers=(rooms.ROOM2,),
            ) as main,
            rooms.room(mosquitto, rooms.ROOM2, hubs=room2_hubs, observers=[received]) as room2,
        ):
            assert playback.reference is not None  # the stream service wired it
            await main.host.start_lesson("English, grade 4")
            await rooms.until_live(room2)
            await eventually(
                lambda: mic.heard_frames > 3 * 48_000,
                within=30,
                what="3 s of the pupil on the main room's loudspeakers",
            )
            start = time.monotonic()
            await eventually(
                lambda: received.seconds_since(rooms.MAIN, start) >= 10,
                within=40,
                what="10 s of the main room's sound at room2",
            )
            windows = np.arange(start + 2, start + 10, 1.0)
            echo_levels = [mic.echo_dbfs(t, t + 1) for t in windows]
            sent = [received.level(rooms.MAIN, t, t + 1) for t in windows]
            stats = main.audio.stats().to_dict()["processing"]
            # The teacher answers while the pupil still talks.
            voice = await received.level_with_talker(
                rooms.MAIN, mic, "the main room with its teacher"
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert all(level is not None for level in echo_levels)
    echo = float(np.median([level for level in echo_levels if level is not None]))
    residual = float(np.median(sent))
    erle_db = echo - residual
    print(  # the figures, for `pytest -s` (the README quotes them)
        f"main room: the pupil's echo at its microphone {echo:.1f} dBFS, in what room2 "
        f"receives {residual:.1f} dBFS (ERLE {erle_db:.1f} dB with gain {stats['gain_db']} "
        f"dB), the teacher talking {voice:.1f} dBFS; the main room's stage: {stats}"
    )
    # The loop worked: the main room's loudspeakers played the pupil into its microphone.
    assert echo >= -35, f"echo at the main room's microphone {echo:.1f} dBFS: no loop"
    # What room2 receives carries the pupil's echo 25 dB (the target) and more
    # below what the microphone heard, gain control included (about 45 dB here); with
    # the canceller off it came back 14 dB louder than at the microphone.
    assert erle_db >= 25, (echo, residual, stats)
    assert voice >= residual + 15, (voice, residual)
    assert stats["cancelling"] is True
    assert stats["reference"] == "playing"
    assert stats["echo_path_ms"] is not None


@pytest.mark.slow
async def test_the_daemon_processes_the_microphone_of_a_room_with_loudspeakers(
    mosquitto: BrokerUnderTest,
    tmp_path: Path,
    daemon_factory: Any,  # noqa: F811  (the fixture imported above)
) -> None:
    """The daemon's own wiring: a room whose stream.playback plays (a WAV file here)
    gets the processing stage on by default, and health says so."""
    config = site_config(
        mosquitto,
        tmp_path,
        stream={"panel_port": 0, "playback": {"output": "file", "path": str(tmp_path / "s.wav")}},
    )
    daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    async with observing(mosquitto, f"{base}/health") as observer:
        await daemon.start()
        health = await observer.wait_for(
            f"{base}/health",
            lambda m: (m.json()["capture"]["audio"].get("processing") or {}).get("frames", 0) > 0,
        )
    processing = health.json()["capture"]["audio"]["processing"]
    assert processing["mode"] == "auto"
    assert processing["active"] is True
    assert processing["stages"] == dict.fromkeys(
        (
            "echo_cancellation",
            "noise_suppression",
            "high_pass_filter",
            "auto_gain_control",
            "linear_canceller",
        ),
        True,
    )
    assert processing["reference"] == "idle"  # no lesson: the loudspeakers are quiet
    assert processing["errors"] == 0
