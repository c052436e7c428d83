"""The camera and microphone hubs as one supervisor service, restartable on command."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agent.capture.hub import AudioHub, DeviceState, FrameHub

log = logging.getLogger(__name__)


class CaptureService:
    """Runs the video and audio hubs together, and restarts them on command.

    The supervisor restarts what fails; this restarts what an operator asks for
    (``cmd/restart-capture``), e.g. after re-seating a USB camera.
    """

    name = "capture"
    health_section_name = "capture"

    def __init__(self, video: FrameHub, audio: AudioHub) -> None:
        self.video = video
        self.audio = audio
        self._restart = asyncio.Event()

    async def run(self) -> None:
        while True:
            async with asyncio.TaskGroup() as group:
                hubs = [
                    group.create_task(self.video.run(), name=self.video.name),
                    group.create_task(self.audio.run(), name=self.audio.name),
                ]
                await self._restart.wait()
                self._restart.clear()
                log.info("restarting capture on request")
                for hub in hubs:
                    hub.cancel()

    async def wait_ready(self) -> None:
        """Until both devices have been tried once (open, or reported lost/degraded)."""
        tried = [state for state in DeviceState if state is not DeviceState.STARTING]
        for hub in (self.video, self.audio):
            await hub.wait_for_state(*tried)

    def health_section(self) -> dict[str, Any]:
        return {"video": self.video.stats().to_dict(), "audio": self.audio.stats().to_dict()}

    async def restart(self) -> dict[str, str]:
        """Reopen both devices; return their states once they have settled (<= 20 s)."""
        requested = time.time()
        self._restart.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            video, audio = self.video.stats(), self.audio.stats()
            settled = [(video.since_wall, video.state), (audio.since_wall, audio.state)]
            if all(
                since >= requested and state != DeviceState.STARTING for since, state in settled
            ):
                break
            await asyncio.sleep(0.1)
        return {"video": self.video.stats().state.value, "audio": self.audio.stats().state.value}
