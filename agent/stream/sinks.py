"""Where received media goes: sinks that read remote tracks, observers that share them.

A sink's ``consume(source, track)`` runs for as long as one remote track lives and must
keep calling ``recv()``: aiortc decodes into an unbounded queue, so a track nobody reads
grows without limit. A room has several consumers of the same decoded frames (the
probe, the panel's latest picture, the loudspeakers, the recorder), so one
:class:`FanOutSink` reads each track once and hands every frame to its
:class:`FrameObserver` s, on the event loop, without copying it. Observers only look:
a frame is shared, so none may change it (its pixels, ``pts`` or ``time_base``); one
that needs to encode or reformat it does so on its own thread with its own
reformatter/resampler (PyAV caches a reformatter on the frame itself, see aiortc
#767/#1206).

The probe (:class:`ProbeSink`) is what the tests and the benchmark use to prove that
pictures arrive, in order and how late; it works as a sink and as an observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from numpy.typing import NDArray

from agent.capture import read_stamp

log = logging.getLogger(__name__)

OBSERVER_LOG_INTERVAL_S = 60.0  # a failing observer is logged at most this often per source


class MediaSink(Protocol):
    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        """Read ``track`` (from device ``source``) until it ends or this is cancelled."""


class FrameObserver(Protocol):
    """Something that looks at every decoded frame a :class:`FanOutSink` reads.

    Both methods are called on the event loop and must return quickly (hand heavy work
    to a thread); ``frame`` is shared with the other observers and must not be changed.
    """

    def observe(self, source: str, kind: str, frame: Any) -> None:
        """One decoded frame (``av.VideoFrame`` or ``av.AudioFrame``) of ``kind`` from
        device ``source``."""

    def track_ended(self, source: str, kind: str) -> None:
        """``source``'s ``kind`` track ended (the peer left, reconnects, or the lesson
        ended); a new track from the same source may follow."""


class NullSink:
    """Reads and discards everything (a room without a display, the lesson host's default)."""

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            return


@dataclass
class _Failures:
    count: int = 0
    logged_at: float | None = None
    logged_count: int = 0


class FanOutSink:
    """Reads each remote track once and shows every frame to every observer.

    An observer that raises is skipped for that frame only: the others, and the track,
    go on. Its failures are logged once per source and observer, then at most every
    :data:`OBSERVER_LOG_INTERVAL_S` with how many there were meanwhile, so a broken
    recorder cannot flood the journal at 30 frames a second. Observers can be added
    and removed while tracks run (a recorder for one lesson).
    """

    def __init__(self, observers: Iterable[FrameObserver] = ()) -> None:
        # A tuple replaced on change: consume() iterates without copying or locking.
        self._observers: tuple[FrameObserver, ...] = tuple(observers)
        self._failures: dict[tuple[str, int], _Failures] = {}
        self.tracks = 0  # tracks being read now

    @property
    def observers(self) -> tuple[FrameObserver, ...]:
        return self._observers

    def add(self, observer: FrameObserver) -> None:
        if observer not in self._observers:
            self._observers = (*self._observers, observer)

    def remove(self, observer: FrameObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def failures(self) -> dict[str, int]:
        """Observer failures per ``source``, for health and tests."""
        out: dict[str, int] = {}
        for (source, _), failures in self._failures.items():
            out[source] = out.get(source, 0) + failures.count
        return out

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        kind = str(track.kind)
        self.tracks += 1
        try:
            while True:
                frame: Any = await track.recv()
                for observer in self._observers:
                    try:
                        observer.observe(source, kind, frame)
                    except Exception as exc:
                        self._failed(source, observer, "observe", exc)
        except MediaStreamError:
            return
        finally:
            self.tracks -= 1
            for observer in self._observers:
                try:
                    observer.track_ended(source, kind)
                except Exception as exc:
                    self._failed(source, observer, "track_ended", exc)

    def _failed(self, source: str, observer: FrameObserver, what: str, exc: Exception) -> None:
        failures = self._failures.setdefault((source, id(observer)), _Failures())
        failures.count += 1
        now = time.monotonic()
        if failures.logged_at is not None and now - failures.logged_at < OBSERVER_LOG_INTERVAL_S:
            return
        since = failures.count - failures.logged_count
        failures.logged_at, failures.logged_count = now, failures.count
        log.error(
            "media observer %s failed in %s for %s (%d failure(s) since last logged): %s",
            type(observer).__name__,
            what,
            source,
            since,
            exc,
            exc_info=failures.count == 1,
        )


def luma(frame: Any) -> NDArray[np.uint8]:
    """The picture's luma plane as an array view (no copy, no conversion) where the
    frame is planar YUV, as aiortc's decoders give; otherwise a grey conversion."""
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p"):
        plane = frame.planes[0]
        rows: NDArray[np.uint8] = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        return rows[: frame.height, : frame.width]
    grey: NDArray[np.uint8] = frame.to_ndarray(format="gray")
    return grey


@dataclass(frozen=True, slots=True)
class LatestFrame:
    seq: int  # increases with every frame, across sources: a reconnect never repeats one
    frame: av.VideoFrame  # shared: read it, never change it
    arrived: float  # time.monotonic() when it was decoded


class LatestFrames:
    """The newest decoded picture of each source, for the panel and the kiosk.

    A viewer (a browser tile re-encoding at low resolution, a screenshot) asks for
    :meth:`next_frame` newer than the one it has and gets the newest at that moment: a
    slow viewer skips pictures instead of queueing them. Frames are kept by reference,
    never copied; only the newest one per source is held.
    """

    def __init__(self) -> None:
        self._latest: dict[str, LatestFrame] = {}
        self._live: dict[str, bool] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._seq = itertools.count(1)

    # -- the observer ----------------------------------------------------------------------

    def observe(self, source: str, kind: str, frame: Any) -> None:
        if kind != "video":
            return
        self._latest[source] = LatestFrame(next(self._seq), frame, time.monotonic())
        self._live[source] = True
        self._wake(source)

    def track_ended(self, source: str, kind: str) -> None:
        if kind == "video" and source in self._live:
            self._live[source] = False

    def _wake(self, source: str) -> None:
        for waiter in self._waiters.pop(source, ()):
            if not waiter.done():
                waiter.set_result(None)

    # -- readers ---------------------------------------------------------------------------

    def sources(self) -> list[str]:
        """Sources that have shown a picture (in order of their first one)."""
        return list(self._latest)

    def latest(self, source: str) -> tuple[int, av.VideoFrame, float] | None:
        """(seq, frame, arrival ``time.monotonic()``) of ``source``'s newest picture."""
        entry = self._latest.get(source)
        return None if entry is None else (entry.seq, entry.frame, entry.arrived)

    def age_s(self, source: str) -> float | None:
        """Seconds since ``source``'s newest picture arrived (None: never): what decides
        between the picture and a "reconnecting..." slate."""
        entry = self._latest.get(source)
        return None if entry is None else time.monotonic() - entry.arrived

    def is_live(self, source: str) -> bool:
        """Whether ``source`` has a video track being read now."""
        return self._live.get(source, False)

    async def next_frame(
        self,
        source: str,
        after_seq: int,
        timeout: float,  # noqa: ASYNC109  (the viewer's frame deadline, not a cancel scope)
    ) -> tuple[int, av.VideoFrame] | None:
        """The newest picture of ``source`` with a seq above ``after_seq`` (0: any),
        waiting up to ``timeout`` s for one; None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._latest.get(source)
            if entry is not None and entry.seq > after_seq:
                return entry.seq, entry.frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(source, []).append(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter
            finally:
                waiters = self._waiters.get(source)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[source]

    def forget(self, source: str) -> None:
        """Drop ``source``'s picture (the room left the lesson for good)."""
        self._latest.pop(source, None)
        self._live.pop(source, None)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per source: the newest picture's size, seq and age, for health and the panel."""
        now = time.monotonic()
        return {
            source: {
                "seq": entry.seq,
                "size": f"{entry.frame.width}x{entry.frame.height}",
                "age_s": round(now - entry.arrived, 2),
                "live": self._live.get(source, False),
            }
            for source, entry in self._latest.items()
        }


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
    """Decodes the stamp (frame number, capture wall time) of every received frame; a
    sink of its own, or an observer of a :class:`FanOutSink`.

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

    # -- as an observer (FanOutSink) ---------------------------------------------------------

    def observe(self, source: str, kind: str, frame: Any) -> None:
        """Count and read one frame (``first_frame_s`` counts from the source's first
        media of any kind, since an observer does not see the track start)."""
        self._take(self.stats(source), kind, frame)

    def track_ended(self, source: str, kind: str) -> None:
        """Nothing to do: a source's figures run on across reconnects."""

    # -- as a sink ---------------------------------------------------------------------------

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        stats = self.stats(source)
        started = time.monotonic_ns()
        kind = str(track.kind)
        try:
            while True:
                frame: Any = await track.recv()
                self._take(stats, kind, frame, started)
        except MediaStreamError:
            return

    @staticmethod
    def _take(stats: ProbeStats, kind: str, frame: Any, started_ns: int | None = None) -> None:
        if kind == "audio":
            stats.audio_frames += 1
            return
        now_ns = time.time_ns()
        stats.frames += 1
        if stats.first_frame_s is None:
            origin = stats.started_ns if started_ns is None else started_ns
            stats.first_frame_s = (time.monotonic_ns() - origin) / 1e9
        stamp = read_stamp(luma(frame))
        if stamp is None:
            return
        stats.stamped += 1
        if stats.first_stamp is None:
            stats.first_stamp = stamp.frame
        if stats.last_stamp is not None and stamp.frame < stats.last_stamp:
            stats.backwards += 1
        stats.last_stamp = stamp.frame
        stats.latencies_ms.append((now_ns - stamp.time_ns) / 1e6)
