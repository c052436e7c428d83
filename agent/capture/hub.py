"""Hubs: one reader thread per device, many asyncio consumers, and the device's health.

The reader thread does every blocking call (open, read, close) so the event loop never
waits on hardware; it hands each item over with ``loop.call_soon_threadsafe``, coalesced
so a busy loop gets one wake-up, not a backlog of callbacks. Video consumers take the
*latest* frame and count what they skipped, so a 5 fps analyser never slows a 30 fps
stream; audio consumers get every chunk through a bounded queue (oldest dropped and
counted), because audio cannot be sampled the way video can.

A hub is a supervisor service (``name`` + ``async run()``). It watches its device:
read errors, a stall (no item for ``stall_timeout_s``) or a frozen picture change the
:class:`DeviceState`, and the thread reopens the device with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from agent.backoff import backoff_delay
from agent.capture.audio import AudioSource
from agent.capture.errors import CaptureError
from agent.capture.frames import AudioChunk, AudioFormat, Frame, Image, Samples, VideoMode
from agent.capture.processing import AudioProcessor, FarEndReference, ProcessingStats
from agent.capture.video import VideoSource
from agent.config import CaptureConfig

log = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.1
_JOIN_TIMEOUT_S = 1.0
_RATE_WINDOW_S = 2.0
_LEVEL_WINDOW_S = 1.0
_SILENCE_DBFS = -120.0  # floor for an all-zero signal (JSON has no -inf)
_BT601_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float32)  # luma weights, BGR order


class DeviceState(StrEnum):
    STARTING = "starting"  # opening, no item yet
    OK = "ok"
    DEGRADED = "degraded"  # items arrive but something is wrong (a frozen picture)
    LOST = "lost"  # cannot open, read errors, or nothing for stall_timeout_s; retrying
    STOPPED = "stopped"  # the hub is not running


@dataclass(frozen=True, slots=True)
class StateChange:
    hub: str
    state: DeviceState
    previous: DeviceState
    reason: str
    since_monotonic: float  # time.monotonic() of the change
    since_wall: float  # time.time() of the change

    def to_dict(self) -> dict[str, Any]:
        return {
            "hub": self.hub,
            "state": self.state.value,
            "previous": self.previous.value,
            "reason": self.reason,
            "since": round(self.since_wall, 3),
        }


StateListener = Callable[[StateChange], None]


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    name: str
    delivered: int
    skipped: int  # frames that went by while this consumer was busy


@dataclass(frozen=True, slots=True)
class AudioConsumerStats:
    name: str
    delivered: int
    dropped: int  # oldest chunks discarded because this consumer's queue was full
    queued: int


@dataclass(frozen=True, slots=True)
class VideoStats:
    name: str
    source: str
    state: DeviceState
    reason: str
    since_monotonic: float
    since_wall: float
    state_for_s: float
    mode: VideoMode | None
    fps: float  # measured over the last two seconds
    frames_read: int
    read_errors: int
    reopen_attempts: int
    consumers: tuple[ConsumerStats, ...]
    # BT.601 luma (0-255) of the latest frame, from the frozen check's subsample; None
    # while no frame is arriving. A covered lens or a dead sensor reads near 0.
    mean_luma: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_device_state(
                self.source, self.state, self.reason, self.since_wall, self.state_for_s
            ),
            "mode": None if self.mode is None else str(self.mode),
            "fps": round(self.fps, 1),
            "frames_read": self.frames_read,
            "read_errors": self.read_errors,
            "reopen_attempts": self.reopen_attempts,
            "mean_luma": None if self.mean_luma is None else round(self.mean_luma, 1),
            "consumers": {
                c.name: {"delivered": c.delivered, "skipped": c.skipped} for c in self.consumers
            },
        }


def _device_state(
    source: str, state: DeviceState, reason: str, since_wall: float, state_for_s: float
) -> dict[str, Any]:
    """The fields every device's stats share in the health topic."""
    return {
        "source": source,
        "state": state.value,
        "reason": reason,
        "since": round(since_wall, 3),
        "state_for_s": round(state_for_s, 1),
    }


@dataclass(frozen=True, slots=True)
class AudioStats:
    name: str
    source: str
    state: DeviceState
    reason: str
    since_monotonic: float
    since_wall: float
    state_for_s: float
    format: AudioFormat | None
    chunks_per_s: float
    chunks_read: int
    read_errors: int
    reopen_attempts: int
    level_dbfs: float | None  # RMS over the last second, re full scale; None without audio
    peak_dbfs: float | None
    clipping: bool  # a sample hit full scale within the last second
    consumers: tuple[AudioConsumerStats, ...]
    # The processing stage (echo cancellation...); None when capture.audio.processing
    # .mode is off. The level, peak and clipping above are of the processed signal: what the
    # lesson sends, so a silent-microphone alert means the other rooms hear nothing.
    processing: ProcessingStats | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.processing is None else {"processing": self.processing.to_dict()}
        return {
            **extra,
            **_device_state(
                self.source, self.state, self.reason, self.since_wall, self.state_for_s
            ),
            "format": None if self.format is None else str(self.format),
            "chunks_per_s": round(self.chunks_per_s, 1),
            "chunks_read": self.chunks_read,
            "read_errors": self.read_errors,
            "reopen_attempts": self.reopen_attempts,
            "level_dbfs": None if self.level_dbfs is None else round(self.level_dbfs, 1),
            "peak_dbfs": None if self.peak_dbfs is None else round(self.peak_dbfs, 1),
            "clipping": self.clipping,
            "consumers": {
                c.name: {"delivered": c.delivered, "dropped": c.dropped, "queued": c.queued}
                for c in self.consumers
            },
        }


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CaptureError) else f"{type(exc).__name__}: {exc}"


ModeT = TypeVar("ModeT")
ModeT_co = TypeVar("ModeT_co", covariant=True)
ItemT = TypeVar("ItemT")


class _Source(Protocol[ModeT_co]):
    @property
    def description(self) -> str: ...

    def open(self) -> ModeT_co: ...

    def read(self) -> NDArray[Any]: ...

    def close(self) -> None: ...

    def interrupt(self) -> None: ...


class _Subscription(ABC, Generic[ItemT]):
    """What every consumer has: a name and an event the hub sets when there is news."""

    def __init__(self, hub: _CaptureHub[Any], name: str) -> None:
        self.name = name
        self._hub = hub
        self._event = asyncio.Event()
        self._closed = False

    def close(self) -> None:
        """Stop receiving; a pending get() raises, an ``async for`` ends."""
        if not self._closed:
            self._closed = True
            self._hub._unsubscribe(self)
            self._event.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"subscription {self.name!r} to {self._hub.name} is closed")

    @abstractmethod
    async def get(self) -> ItemT:
        """The next item for this consumer; raises once the subscription is closed."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ItemT:
        try:
            return await self.get()
        except RuntimeError:
            if self._closed:
                raise StopAsyncIteration from None
            raise


class _CaptureHub(ABC, Generic[ModeT]):
    _unit = "item"

    def __init__(
        self,
        name: str,
        source: _Source[ModeT],
        capture: CaptureConfig,
        rng: random.Random | None,
    ) -> None:
        self.name = name
        self.source = source
        self._cfg = capture
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # guards everything the reader thread touches
        self._state = DeviceState.STOPPED
        self._reason = "not started"
        self._since_mono, self._since_wall = time.monotonic(), time.time()
        self._mode: ModeT | None = None
        self._reads = 0
        self._read_errors = 0
        self._open_attempts = 0
        self._recent: deque[int] = deque(maxlen=256)
        self._started_ns = time.monotonic_ns()
        self._last_item_ns = self._started_ns
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._subs: list[_Subscription[Any]] = []
        self._listeners: list[StateListener] = []
        self._changed = asyncio.Event()

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        with self._lock:
            return self._state

    @property
    def reason(self) -> str:
        with self._lock:
            return self._reason

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener`` on the event loop at every state change; returns a remover."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def wait_for_state(self, *states: DeviceState) -> DeviceState:
        """Return once the device is in one of ``states`` (at once if it already is)."""
        while True:
            changed = self._changed
            current = self.state
            if current in states:
                return current
            await changed.wait()

    def _change_locked(self, state: DeviceState, reason: str) -> StateChange | None:
        if state is self._state:
            self._reason = reason  # the same condition goes on; keep its start time
            return None
        previous = self._state
        self._state, self._reason = state, reason
        self._since_mono, self._since_wall = time.monotonic(), time.time()
        return StateChange(self.name, state, previous, reason, self._since_mono, self._since_wall)

    def _set_state(self, state: DeviceState, reason: str) -> None:
        with self._lock:
            change = self._change_locked(state, reason)
        self._announce(change)

    def _announce(self, change: StateChange | None) -> None:
        if change is None:
            return
        fields = {"hub": self.name, "state": change.state.value, "reason": change.reason}
        if change.state in (DeviceState.LOST, DeviceState.DEGRADED):
            log.warning(
                "%s %s: %s", self.name, change.state, change.reason, extra={"fields": fields}
            )
        elif change.state is DeviceState.OK and change.previous is not DeviceState.STARTING:
            log.info(
                "%s recovered (%s)", self.name, self.source.description, extra={"fields": fields}
            )
        else:
            log.debug("%s %s: %s", self.name, change.state, change.reason)
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._emit(change)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            loop.call_soon_threadsafe(self._emit, change)

    def _emit(self, change: StateChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("%s: state listener failed", self.name)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the service ---------------------------------------------------------------

    async def run(self) -> None:
        """Read the device until cancelled; the reader thread is stopped and joined."""
        previous = self._thread
        if previous is not None and previous.is_alive():
            raise RuntimeError(
                f"{self.name}: the previous reader thread is still inside the source"
            )
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        stop = threading.Event()
        with self._lock:
            self._started_ns = self._last_item_ns = time.monotonic_ns()
            self._recent.clear()
            self._wake_pending = False
        self._set_state(DeviceState.STARTING, f"opening {self.source.description}")
        exited = asyncio.Event()
        thread = threading.Thread(
            target=self._read_loop,
            args=(stop, self._loop, exited),
            name=f"{self.name} reader",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        try:
            while True:
                await asyncio.sleep(_WATCH_INTERVAL_S)
                if not thread.is_alive():
                    raise RuntimeError(f"{self.name}: reader thread died ({self.reason})")
                self._check_stall()
        finally:
            stop.set()
            self.source.interrupt()
            try:
                async with asyncio.timeout(_JOIN_TIMEOUT_S):
                    await exited.wait()
                    # The device is released by now; wait out the thread's last
                    # microseconds without blocking the loop in join().
                    while thread.is_alive():  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
            except TimeoutError:
                # A driver stuck in a blocking call; the daemon thread is left behind
                # and run() refuses to start a second reader on the same source.
                log.warning(
                    "%s: reader thread still inside %s after %.1f s; leaving it behind",
                    self.name,
                    self.source.description,
                    _JOIN_TIMEOUT_S,
                )
            self._set_state(DeviceState.STOPPED, "hub stopped")

    def _check_stall(self) -> None:
        now = time.monotonic_ns()
        with self._lock:
            quiet_s = (now - self._last_item_ns) / 1e9
            change = None
            if (
                self._state in (DeviceState.STARTING, DeviceState.OK, DeviceState.DEGRADED)
                and quiet_s > self._cfg.stall_timeout_s
            ):
                change = self._change_locked(
                    DeviceState.LOST,
                    f"no {self._unit} for {quiet_s:.1f} s (stall_timeout_s "
                    f"{self._cfg.stall_timeout_s:g})",
                )
        self._announce(change)

    # -- the reader thread ---------------------------------------------------------

    def _read_loop(
        self, stop: threading.Event, loop: asyncio.AbstractEventLoop, exited: asyncio.Event
    ) -> None:
        try:
            attempt = 0
            while not stop.is_set():
                with self._lock:
                    self._open_attempts += 1
                try:
                    mode = self.source.open()
                except Exception as exc:
                    if stop.is_set():
                        break
                    log.debug("%s: open failed: %s", self.name, _describe(exc))
                    self._set_state(DeviceState.LOST, f"cannot open: {_describe(exc)}")
                else:
                    with self._lock:
                        self._mode = mode
                        self._last_item_ns = time.monotonic_ns()
                    log.info("%s: opened %s (%s)", self.name, self.source.description, mode)
                    if self._pump(stop):
                        attempt = 0
                if stop.is_set():
                    break
                delay = backoff_delay(
                    attempt, self._cfg.retry_min_s, self._cfg.retry_max_s, self._rng
                )
                attempt += 1
                log.debug("%s: reopening in %.2f s", self.name, delay)
                stop.wait(delay)
        except Exception as exc:  # a bug here must not pass silently: run() sees the thread die
            log.exception("%s: reader thread crashed", self.name)
            self._set_state(DeviceState.LOST, f"reader crashed: {_describe(exc)}")
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(exited.set)

    def _pump(self, stop: threading.Event) -> bool:
        """Read until an error or stop; True if at least one item arrived."""
        delivered = False
        try:
            while not stop.is_set():
                data = self.source.read()
                captured_ns, wall_ns = time.monotonic_ns(), time.time_ns()
                if stop.is_set():
                    break
                self._accept(data, captured_ns, wall_ns)
                delivered = True
        except Exception as exc:
            if not stop.is_set():
                with self._lock:
                    self._read_errors += 1
                self._set_state(DeviceState.LOST, f"read failed: {_describe(exc)}")
        finally:
            try:
                self.source.close()
            except Exception:
                log.warning(
                    "%s: closing %s failed", self.name, self.source.description, exc_info=True
                )
        return delivered

    @abstractmethod
    def _accept(self, data: NDArray[Any], captured_ns: int, wall_ns: int) -> None:
        """Publish one item (reader thread)."""

    def _note_item_locked(self, captured_ns: int) -> int:
        index = self._reads
        self._reads += 1
        self._last_item_ns = captured_ns
        self._recent.append(captured_ns)
        return index

    def _schedule_wake_locked(self) -> None:
        if self._wake_pending or self._loop is None:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            self._wake_pending = False

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            subs = list(self._subs)
        for sub in subs:
            sub._event.set()

    # -- consumers and stats -------------------------------------------------------

    def _add(self, sub: _Subscription[Any]) -> None:
        with self._lock:
            if any(existing.name == sub.name for existing in self._subs):
                raise ValueError(f"{self.name} already has a consumer named {sub.name!r}")
            self._subs.append(sub)

    def _unsubscribe(self, sub: _Subscription[Any]) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def _common_locked(self, now_ns: int) -> dict[str, Any]:
        window_ns = int(_RATE_WINDOW_S * 1e9)
        recent = sum(1 for t in self._recent if t > now_ns - window_ns)
        span_s = min(_RATE_WINDOW_S, (now_ns - self._started_ns) / 1e9)
        running = self._state is not DeviceState.STOPPED
        return {
            "name": self.name,
            "source": self.source.description,
            "state": self._state,
            "reason": self._reason,
            "since_monotonic": self._since_mono,
            "since_wall": self._since_wall,
            "state_for_s": max(0.0, now_ns / 1e9 - self._since_mono),
            "read_errors": self._read_errors,
            "reopen_attempts": max(0, self._open_attempts - 1),
            "rate": recent / span_s if running and span_s > 0.05 else 0.0,
        }


class FrameSubscription(_Subscription[Frame]):
    """A video consumer: always the newest frame, never a backlog."""

    def __init__(self, hub: FrameHub, name: str, last_index: int) -> None:
        super().__init__(hub, name)
        self._frames = hub
        self._last = last_index
        self.delivered = 0
        self.skipped = 0

    async def get(self) -> Frame:
        """The newest frame this consumer has not seen yet; waits for one if needed."""
        while True:
            if self._closed:
                raise self._closed_error()
            frame = self._frames.latest
            if frame is not None and frame.index > self._last:
                self.skipped += frame.index - self._last - 1
                self._last = frame.index
                self.delivered += 1
                return frame
            self._event.clear()
            await self._event.wait()

    def stats(self) -> ConsumerStats:
        # Frames that went by since the last delivery count as skipped already, so a
        # consumer stuck in a long computation shows it before its next get().
        latest = self._frames.latest
        behind = 0 if latest is None else max(0, latest.index - self._last - 1)
        return ConsumerStats(self.name, self.delivered, self.skipped + behind)


def _mean_luma(image: Image) -> float | None:
    """BT.601 luma of a BGR image's mean colour (0-255); None for an unexpected layout."""
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        return None
    # A matrix product, not mean(axis=0): a strided per-channel reduction is ~10x slower.
    return float((image.reshape(-1, 3) @ _BT601_BGR).mean())


class FrameHub(_CaptureHub[VideoMode]):
    """One camera (or file, or pattern) shared by every video consumer.

    Frozen pictures are caught with a CRC of every 8th pixel in each direction: cheap
    (tens of microseconds at 720p) and, unlike a real sensor's noise, a stuck driver
    buffer repeats exactly. The same subsample is kept (a reference, no copy) so that
    ``stats()`` can report the picture's mean luma: computed once per stats call rather
    than once per frame, since only health telemetry reads it.
    """

    _unit = "frame"

    def __init__(
        self,
        source: VideoSource,
        capture: CaptureConfig,
        *,
        name: str = "capture.video",
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, source, capture, rng)
        self._latest: Frame | None = None
        self._digest: int | None = None
        self._same_since_ns = 0
        self._subsample: Image | None = None

    @property
    def latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    @property
    def mode(self) -> VideoMode | None:
        with self._lock:
            return self._mode

    def subscribe(self, name: str) -> FrameSubscription:
        """A new consumer; it receives frames captured from now on."""
        latest = self.latest
        sub = FrameSubscription(self, name, -1 if latest is None else latest.index)
        self._add(sub)
        return sub

    def _accept(self, data: NDArray[Any], captured_ns: int, wall_ns: int) -> None:
        image: Image = data
        image.flags.writeable = False  # shared by every consumer
        subsample = np.ascontiguousarray(image[::8, ::8])
        digest = zlib.crc32(subsample.data)
        with self._lock:
            index = self._note_item_locked(captured_ns)
            self._subsample = subsample
            self._latest = Frame(image, index, captured_ns, wall_ns)
            if digest != self._digest:
                self._digest, self._same_since_ns = digest, captured_ns
            still_s = (captured_ns - self._same_since_ns) / 1e9
            if still_s >= self._cfg.frozen_after_s:
                change = self._change_locked(
                    DeviceState.DEGRADED, f"frozen: identical frames for {still_s:.1f} s"
                )
            else:
                change = self._change_locked(DeviceState.OK, "frames arriving")
            self._schedule_wake_locked()
        self._announce(change)

    def stats(self) -> VideoStats:
        now_ns = time.monotonic_ns()
        with self._lock:
            common = self._common_locked(now_ns)
            subs = [s for s in self._subs if isinstance(s, FrameSubscription)]
            mode, frames = self._mode, self._reads
            subsample = self._subsample
        rate = common.pop("rate")
        arriving = common["state"] in (DeviceState.OK, DeviceState.DEGRADED)
        return VideoStats(
            **common,
            mode=mode,
            fps=rate,
            frames_read=frames,
            consumers=tuple(s.stats() for s in subs),
            mean_luma=_mean_luma(subsample) if arriving and subsample is not None else None,
        )


class AudioSubscription(_Subscription[AudioChunk]):
    """An audio consumer: every chunk in order, up to ``max_chunks`` behind."""

    def __init__(self, hub: AudioHub, name: str, max_chunks: int) -> None:
        super().__init__(hub, name)
        self._queue: deque[AudioChunk] = deque()
        self._max = max_chunks
        self.delivered = 0
        self.dropped = 0

    def _push_locked(self, chunk: AudioChunk) -> None:
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(chunk)

    def get_nowait(self) -> AudioChunk | None:
        with self._hub._lock:
            if not self._queue:
                return None
            self.delivered += 1
            return self._queue.popleft()

    async def get(self) -> AudioChunk:
        """The oldest chunk not yet taken; waits for one if the queue is empty."""
        while True:
            chunk = self.get_nowait()
            if chunk is not None:
                return chunk
            if self._closed:
                raise self._closed_error()
            self._event.clear()
            await self._event.wait()

    def stats(self) -> AudioConsumerStats:
        with self._hub._lock:
            queued, dropped = len(self._queue), self.dropped
        return AudioConsumerStats(self.name, self.delivered, dropped, queued)


def _dbfs(power: float) -> float:
    return max(_SILENCE_DBFS, 10 * math.log10(power / 32768.0**2)) if power > 0 else _SILENCE_DBFS


class AudioHub(_CaptureHub[AudioFormat]):
    """One microphone (or file, or tone) shared by every audio consumer.

    A silent microphone is still a working one (muted, or an empty room): silence is
    reported as a level, and alert rules decide what it means.

    While ``capture.audio.processing`` is active (``mode: auto`` once a loudspeaker
    playback feeds :meth:`echo_reference`, or ``mode: on``), every chunk goes through
    the processing stage (:class:`~agent.capture.processing.AudioProcessor`) on the
    reader thread before any consumer, or the level meter, sees it.
    """

    _unit = "audio"

    def __init__(
        self,
        source: AudioSource,
        capture: CaptureConfig,
        *,
        name: str = "capture.audio",
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, source, capture, rng)
        self._levels: deque[tuple[int, float, int]] = deque(maxlen=512)  # (ns, power, peak)
        settings = capture.audio.processing
        self.processor = AudioProcessor(settings) if settings.mode != "off" else None
        self._sample_rate = capture.audio.sample_rate

    def echo_reference(self) -> FarEndReference | None:
        """The reference this microphone's echo canceller reads: what the room's
        loudspeakers play must be pushed into it (``AudioPlayback.reference``). Asking
        for it says the room plays and captures at once, which turns ``mode: auto``
        processing on. None when processing is off."""
        processor = self.processor
        if processor is None:
            return None
        if processor.reference is None:
            processor.reference = FarEndReference(self._sample_rate)
        return processor.reference

    @property
    def format(self) -> AudioFormat | None:
        with self._lock:
            return self._mode

    def subscribe(self, name: str, *, max_chunks: int = 50) -> AudioSubscription:
        """A new consumer; it receives chunks captured from now on (50 x 20 ms = 1 s)."""
        if max_chunks < 1:
            raise ValueError("max_chunks must be at least 1")
        sub = AudioSubscription(self, name, max_chunks)
        self._add(sub)
        return sub

    def _accept(self, data: NDArray[Any], captured_ns: int, wall_ns: int) -> None:
        samples: Samples = data
        processor, fmt = self.processor, self._mode
        if processor is not None and fmt is not None:
            samples = processor.process(samples, captured_ns, fmt)
        samples.flags.writeable = False
        if samples.size:
            power = float(np.mean(np.square(samples, dtype=np.float32)))
            peak = max(int(samples.max()), -int(samples.min()))
        else:
            power, peak = 0.0, 0
        with self._lock:
            index = self._note_item_locked(captured_ns)
            rate = self._mode.sample_rate if self._mode is not None else 0
            chunk = AudioChunk(samples, index, captured_ns, wall_ns, rate)
            self._levels.append((captured_ns, power, peak))
            for sub in self._subs:
                if isinstance(sub, AudioSubscription):
                    sub._push_locked(chunk)
            change = self._change_locked(DeviceState.OK, "audio arriving")
            self._schedule_wake_locked()
        self._announce(change)

    def stats(self) -> AudioStats:
        now_ns = time.monotonic_ns()
        with self._lock:
            common = self._common_locked(now_ns)
            subs = [s for s in self._subs if isinstance(s, AudioSubscription)]
            fmt, chunks = self._mode, self._reads
            cutoff = now_ns - int(_LEVEL_WINDOW_S * 1e9)
            window = [(p, k) for t, p, k in self._levels if t > cutoff]
        rate = common.pop("rate")
        level = peak_dbfs = None
        clipping = False
        if window and common["state"] is not DeviceState.STOPPED:
            level = _dbfs(sum(p for p, _ in window) / len(window))
            peak = max(k for _, k in window)
            peak_dbfs = _dbfs(float(peak) ** 2)
            clipping = peak >= 32767
        return AudioStats(
            **common,
            format=fmt,
            chunks_per_s=rate,
            chunks_read=chunks,
            level_dbfs=level,
            peak_dbfs=peak_dbfs,
            clipping=clipping,
            consumers=tuple(s.stats() for s in subs),
            processing=None if self.processor is None else self.processor.stats(),
        )
