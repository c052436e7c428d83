"""A real lesson through each rural link preset (agent/testkit/impair.py PRESETS): the
main room's encode-once video and speech audio to a receiving room, with stream.link's
defaults (RED, the video buffer that gives up in time, keyframes that fit the line,
starting low).

Only generous bounds: the figures belong to ``bench/lesson.py --sections rural
--compare``. Both peers are in this process, so every datagram crosses the shim twice
(out of one peer, into the other): twice the preset's loss and delay each way, and both
directions share the one bottleneck per way. That is harsher than the bench's link,
which is why the bounds are loose; what they catch is a lesson that stops being one
(no sound, a picture frozen for seconds, or a pause nobody is told about).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import EncoderSettings, IceSettings, PeerSession, SharedH264Encoder
from agent.testkit.impair import PRESETS, impaired
from tests.brokers import eventually

CAMERA = CaptureConfig(
    video=VideoConfig(width=640, height=360, fps=15), audio=AudioConfig(frame_ms=20)
)
WINDOW_S = 8.0


@dataclass
class Screen:
    """The receiving room's screen and loudspeaker over the measured window."""

    measuring: bool = False
    video: int = 0
    last_video: float | None = None
    longest_gap_s: float = 0.0
    audio: int = 0
    missing_ms: float = 0.0
    last_pts: int | None = None

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame: Any = await track.recv()
                now = time.monotonic()
                if track.kind == "audio":
                    if self.measuring and self.last_pts is not None:
                        self.audio += 1
                        jump = frame.pts - self.last_pts
                        if jump > 1.5 * frame.samples:
                            self.missing_ms += 1000 * (jump - frame.samples) / frame.sample_rate
                    self.last_pts = frame.pts
                    continue
                if self.measuring:
                    self.video += 1
                    if self.last_video is not None:
                        self.longest_gap_s = max(self.longest_gap_s, now - self.last_video)
                self.last_video = now


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
async def test_a_lesson_holds_on_the_rural_link(preset: str) -> None:
    video = FrameHub(open_video_source(CAMERA.video), CAMERA)
    audio = AudioHub(open_audio_source(CAMERA.audio), CAMERA)
    encoder = SharedH264Encoder(
        video, EncoderSettings(bitrate_kbps=1200, low_bitrate_kbps=400, low_height=240)
    )
    ice = IceSettings(host_addresses=("127.0.0.1",))
    screen = Screen()
    room = PeerSession("village.room1", "L1", ice, screen)
    main = PeerSession("central.room1", "L1", ice, None)
    try:
        async with running(video.run(), audio.run(), encoder.run()):
            with impaired(PRESETS[preset]):
                offer = await room.make_offer(None, None)
                await room.accept_answer(await main.make_answer(offer, encoder, audio))
                assert await room.wait_connected(timeout=30)
                await eventually(lambda: screen.last_pts is not None, within=30, what="sound")
                screen.measuring = True
                started = time.monotonic()
                await eventually(
                    lambda: time.monotonic() - started >= WINDOW_S,
                    within=WINDOW_S + 5,
                    what="the window",
                )
                screen.measuring = False
                described = main.describe()
                if described["layer"] == "paused":
                    # The receiving room tells a pause from the picture stopping while
                    # the sound goes on, a few seconds after it began (here it may have
                    # begun at the window's end): it must know soon, unless the main
                    # room has sent video again by then.
                    await eventually(
                        lambda: (
                            room.describe()["audio_only"] or main.describe()["layer"] != "paused"
                        ),
                        within=30,
                        what="the receiving room told of the pause",
                    )
                heard = room.describe()
                resumed = main.describe()["layer"] != "paused"
    finally:
        await room.close()
        await main.close()
    assert main.audio_codec == "red"
    # The sound carried the lesson: ~50 frames a second, little of it missing.
    assert screen.audio > 20 * WINDOW_S, screen
    assert screen.missing_ms < 0.08 * 1000 * WINDOW_S, screen
    if described["layer"] == "paused":
        # Audio only is allowed on a line too poor for video, but both ends must know.
        assert heard["audio_only"] or resumed or screen.last_video is None, (described, heard)
    else:
        assert screen.video > 2 * WINDOW_S, (screen, described)
        assert screen.longest_gap_s < 4.0, (screen, described)
