"""Where received media goes: a null sink, and a probe that reads the source's stamps.

A sink's ``consume(source, track)`` runs for as long as one remote track lives and must
keep calling ``recv()``: aiortc decodes into an unbounded queue, so a track nobody reads
grows without limit. The display and recording sinks come later; the probe is what the
tests and the benchmark use to prove that pictures arrive, in order and how late.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import read_stamp

log = logging.getLogger(__name__)


class MediaSink(Protocol):
    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        """Read ``track`` (from device ``source``) until it ends or this is cancelled."""


class NullSink:
    """Reads and discards everything (a room without a display, the lesson host's default)."""

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            return


@dataclass
class ProbeStats:
    """What one source's video looked like on arrival."""

    source: str
    started_ns: int = field(default_factory=time.monotonic_ns)
    frames: int = 0  # decoded video frames
    stamped: int = 0  # frames whose stamp could be read
    first_frame_s: float | None = None  # from consume() start to the first decoded frame
    first_stamp: int | None = None
    last_stamp: int | None = None
    backwards: int = 0  # stamps lower than the previous one (must stay 0)
    audio_frames: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def advanced(self) -> int:
        """How far the stamped frame number moved since the first readable stamp."""
        if self.first_stamp is None or self.last_stamp is None:
            return 0
        return self.last_stamp - self.first_stamp

    def latency_ms(self, quantile: float = 0.5) -> float | None:
        data = sorted(self.latencies_ms)
        if not data:
            return None
        if len(data) == 1:
            return data[0]
        return statistics.quantiles(data, n=100, method="inclusive")[
            min(98, max(0, round(quantile * 100) - 1))
        ]


class ProbeSink:
    """Decodes the stamp (frame number, capture wall time) of every received frame.

    Latency is glass-to-glass on one clock: capture ``time.time_ns()`` in the sender's
    stamp against ``time.time_ns()`` after decode here; across machines it also holds
    the clocks' offset (both NTP-synchronised in a school). Only the luma plane is read.
    """

    def __init__(self) -> None:
        self.sources: dict[str, ProbeStats] = {}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per source: frames, stamp progress and glass-to-glass latency, for health."""
        return {
            source: {
                "frames": stats.frames,
                "advanced": stats.advanced,
                "first_frame_s": stats.first_frame_s,
                "latency_p50_ms": stats.latency_ms(0.5),
                "latency_p95_ms": stats.latency_ms(0.95),
            }
            for source, stats in self.sources.items()
        }

    def stats(self, source: str) -> ProbeStats:
        if source not in self.sources:
            self.sources[source] = ProbeStats(source)
        return self.sources[source]

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        stats = self.stats(source)
        started = time.monotonic_ns()
        try:
            while True:
                frame: Any = await track.recv()
                if track.kind == "audio":
                    stats.audio_frames += 1
                    continue
                now_ns = time.time_ns()
                stats.frames += 1
                if stats.first_frame_s is None:
                    stats.first_frame_s = (time.monotonic_ns() - started) / 1e9
                stamp = read_stamp(frame.to_ndarray(format="gray"))
                if stamp is None:
                    continue
                stats.stamped += 1
                if stats.first_stamp is None:
                    stats.first_stamp = stamp.frame
                if stats.last_stamp is not None and stamp.frame < stats.last_stamp:
                    stats.backwards += 1
                stats.last_stamp = stamp.frame
                stats.latencies_ms.append((now_ns - stamp.time_ns) / 1e6)
        except MediaStreamError:
            return
