"""What the hubs hand to consumers, and the modes sources report after opening."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.uint8]
"""A BGR (height, width, 3) uint8 image, the layout OpenCV and aiortc's ``bgr24`` use."""

Samples = NDArray[np.int16]
"""Interleaved PCM as (frames, channels) int16, the layout PyAudio and WAV files use."""


@dataclass(frozen=True, slots=True)
class VideoMode:
    """What a video source actually delivers (a camera may not give what was asked)."""

    width: int
    height: int
    fps: float
    fourcc: str

    def __str__(self) -> str:
        return f"{self.width}x{self.height}@{self.fps:g} {self.fourcc}"


@dataclass(frozen=True, slots=True)
class AudioFormat:
    sample_rate: int
    channels: int
    frame_samples: int  # samples per channel in one chunk

    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.frame_samples / self.sample_rate

    def __str__(self) -> str:
        return f"{self.sample_rate} Hz {self.channels} ch {self.frame_ms:g} ms"


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One captured image, shared read-only by every consumer: copy it before drawing."""

    image: Image
    index: int  # hub sequence number; gaps seen by a consumer are frames it skipped
    captured_ns: int  # time.monotonic_ns() right after the source returned the image
    wall_ns: int  # time.time_ns() at the same moment, for comparing across machines

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class AudioChunk:
    """One ``frame_ms`` chunk of audio, shared read-only by every consumer."""

    samples: Samples  # (frames, channels) int16
    index: int  # hub sequence number; consumers see every index unless their queue overflowed
    captured_ns: int  # time.monotonic_ns() when the chunk was complete
    wall_ns: int
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return int(self.samples.shape[0]) / self.sample_rate
