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
from collections.abc import AsyncIterator
from pathlib import Path

from agent.capture import AudioHub
from agent.config import AudioProcessingConfig
from agent.config.models import AudioConfig, CaptureConfig
from agent.health.selftest import CheckStatus, SelftestThresholds, check_echo_path
from agent.stream.playback import AudioPlayback, WavFileOutput
from agent.testkit.acoustics import LoudspeakerEcho

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
    playback = AudioPlayback(WavFileOutput(speaker))
    hub = AudioHub(LoudspeakerEcho(speaker), config)
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
