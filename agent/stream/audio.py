"""The room's microphone as an aiortc audio track (Opus encoded per peer).

Opus at 48 kHz is cheap (well under 1 % of a core per peer), so each peer has its own
encoder. With speech settings (:class:`~agent.stream.voice.VoiceSettings`, the default
in a lesson) the track encodes speech Opus itself, on a worker thread, and hands aiortc
packets (``agent/stream/voice.py``: mono, 32 kbit/s, in-band FEC; RED is added by the
sender's codec); without them it hands aiortc frames, which aiortc encodes at 96 kbit/s
stereo. Each track is its own AudioHub consumer: audio is never sampled or shared
with the video path, and nothing the video fan-out drops touches it.

Microphone mute (:class:`~agent.stream.controls.MediaControls`) replaces the samples with
silence rather than stopping the track: the peer's Opus stream, its timing and the
receiving room's "media is arriving" watch all carry on, and no sound leaves the room.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import deque
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import AudioChunk, AudioHub, AudioSubscription
from agent.stream.controls import MediaControls
from agent.stream.voice import VoiceEncoder, VoiceSettings

log = logging.getLogger(__name__)

MAX_BACKLOG_CHUNKS = 3  # 60 ms at 20 ms chunks: more than this is latency, not jitter
QUEUE_CHUNKS = 25  # what the hub keeps for this consumer while the sender is busy


class HubAudioTrack(MediaStreamTrack):
    """``recv()`` returns ``s16`` ``AudioFrame`` s with sample-accurate ``pts``.

    Subscribes on the first ``recv()`` (the sender starts pulling only once the peer is
    connected), so the first frame is fresh. If the sender falls more than
    ``MAX_BACKLOG_CHUNKS`` behind (a stalled loop), the oldest chunks are skipped: late
    audio is worse than a click. ``pts`` advances by the chunks' sample counts and jumps
    over chunks the hub or this track dropped, so the receiver sees the gap. While
    ``controls.microphone_muted`` every frame is silence (zeros), with the same ``pts``.
    """

    kind = "audio"

    def __init__(
        self,
        hub: AudioHub,
        name: str,
        controls: MediaControls | None = None,
        voice: VoiceSettings | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.controls = controls
        self.voice = voice if voice is not None and voice.voice else None
        self._encoder: VoiceEncoder | None = None
        self._packets: deque[av.Packet[Any]] = deque()
        self._hub = hub
        self._sub: AudioSubscription | None = None
        self._first_index: int | None = None
        self._samples_per_chunk = 0
        self.delivered = 0
        self.skipped = 0
        self.silenced = 0  # frames replaced by silence while the microphone was muted

    async def recv(self) -> av.AudioFrame | av.Packet[Any]:
        """A frame, or with speech settings an Opus packet (aiortc then only packs it)."""
        if self.voice is None:
            return await self._next_frame()
        while not self._packets:
            frame = await self._next_frame()
            if self._encoder is None:
                self._encoder = VoiceEncoder(self.voice)
            loop = asyncio.get_running_loop()
            self._packets.extend(await loop.run_in_executor(None, self._encoder.encode, frame))
        return self._packets.popleft()

    async def _next_frame(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._sub is None:
            self._sub = self._hub.subscribe(f"stream.audio:{self.name}", max_chunks=QUEUE_CHUNKS)
        try:
            chunk = await self._sub.get()
            while self._sub.stats().queued > MAX_BACKLOG_CHUNKS:
                newer = self._sub.get_nowait()
                if newer is None:
                    break
                chunk = newer
                self.skipped += 1
        except RuntimeError:  # the subscription was closed by stop()
            raise MediaStreamError from None
        self.delivered += 1
        return self._frame(chunk)

    def _frame(self, chunk: AudioChunk) -> av.AudioFrame:
        samples = chunk.samples
        count = int(samples.shape[0])
        if self._first_index is None:
            self._first_index = chunk.index
            self._samples_per_chunk = count
        layout = "mono" if chunk.channels == 1 else "stereo"
        if self.controls is not None and self.controls.microphone_muted:
            samples = np.zeros_like(samples)
            self.silenced += 1
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = chunk.sample_rate
        frame.time_base = fractions.Fraction(1, chunk.sample_rate)
        frame.pts = (chunk.index - self._first_index) * self._samples_per_chunk
        return frame

    def stop(self) -> None:
        super().stop()
        if self._sub is not None:
            self._sub.close()
