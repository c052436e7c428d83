"""Playing the lesson's sound: received audio frames to the loudspeakers (or a WAV file).

:class:`AudioPlayback` is a :class:`~agent.stream.sinks.FrameObserver`: on the event loop
it only copies each decoded ``av.AudioFrame`` (aiortc's Opus decoder gives packed ``s16``
stereo at 48 kHz, 20 ms a frame) into a small inbox; a dedicated thread converts it to
the output's format (``av.AudioResampler``, one per source), keeps a bounded jitter
buffer per source and writes one period at a time to an :class:`AudioOutput`, which
blocks like a sound card does.

* Latency over completeness: a source's buffer holds at most ``buffer_ms`` (200 ms);
  beyond that the oldest audio is dropped (counted), because late sound in a
  conversation is worse than a click.
* Several sources (the main room hears every receiving room): they are **mixed**, summed
  with clipping, rather than playing only the loudest: "loudest wins" chops the first
  syllable of whoever starts talking and needs hysteresis to avoid flapping, while two
  rooms answering at once is exactly what a teacher must hear. Speech at classroom
  levels rarely clips when summed. A receiving room hears only the main room:
  :meth:`AudioPlayback.only` keeps one source audible.
* A device that fails to open or dies puts playback in state ``lost`` with the reason,
  logged once per outage, and is reopened with capped, jittered backoff
  (:func:`agent.backoff.backoff_delay`); nothing is raised into the lesson.

:class:`WavFileOutput` is the honest fake for rooms without a sound card and for tests:
it is paced like a device (a write blocks until the "hardware" would have played it)
and it writes silence for short pauses, so the file's timeline is what a loudspeaker
would have played, gaps included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import wave
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyaudio
from numpy.typing import NDArray

from agent.backoff import backoff_delay
from agent.capture import (
    AudioDeviceError,
    DeviceState,
    FarEndReference,
    close_pyaudio,
    start_pyaudio,
)
from agent.config import PlaybackConfig

log = logging.getLogger(__name__)

Samples = NDArray[np.int16]
"""Interleaved PCM as (frames, channels) int16."""

SAMPLE_RATE = 48_000  # aiortc's Opus rate: what a device is asked for first
PERIOD_MS = 20
BUFFER_MS = 200  # per source: more than this is latency, not jitter
PRIME_MS = 40  # buffered before playing starts (again), to ride out network jitter
HOLD_MS = 200  # silence written after the sound stops before going idle
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
LEVEL_WINDOW_S = 1.0
_SILENCE_DBFS = -120.0
_JOIN_TIMEOUT_S = 2.0


class PlaybackError(Exception):
    """An output that cannot be opened or written (the text says which setting to fix)."""


@dataclass(frozen=True, slots=True)
class OutputFormat:
    sample_rate: int
    channels: int

    @property
    def layout(self) -> str:
        return "mono" if self.channels == 1 else "stereo"

    def __str__(self) -> str:
        return f"{self.sample_rate} Hz {self.channels} ch"


class AudioOutput(ABC):
    """One loudspeaker-like thing; every method but :meth:`interrupt` runs on the
    playback thread."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Short label for logs and health (``speaker 'USB Audio'``)."""

    @abstractmethod
    def open(self) -> OutputFormat:
        """Acquire the device; return the format it plays. Raises PlaybackError."""

    @abstractmethod
    def write(self, samples: Samples) -> None:
        """Play (frames, channels) int16, blocking about as long as the device needs to
        make room for it. Raises PlaybackError when the device is gone."""

    @abstractmethod
    def close(self) -> None:
        """Release the device; safe to call when not open."""

    def interrupt(self) -> None:  # noqa: B027  (optional: only waiting outputs need it)
        """Wake a write() that is waiting, so playback can stop promptly (any thread)."""

    def latency_s(self) -> float:
        """How long written sound waits in the output before it is heard (the driver's
        figure); 0 when unknown."""
        return 0.0

    def heard_at_ns(self, frames: int, rate: int) -> int:
        """When the first of the ``frames`` just written is heard (``time.monotonic_ns``
        clock): for the echo canceller's reference. A blocking write returns once the
        output has room again, so what it holds then is ``latency_s`` ending with this
        block."""
        return time.monotonic_ns() + round(1e9 * (self.latency_s() - frames / rate))


class PyAudioOutput(AudioOutput):
    """Loudspeakers through PyAudio (PortAudio/ALSA), paced by the sound card.

    Asks for 48 kHz (no resampling of the lesson's Opus) in stereo, or mono on a mono
    device, then for the device's own default rate. Every open starts a fresh PyAudio
    instance, so a USB speakerphone plugged in later is found on the next retry.
    """

    def __init__(
        self, device: str | None = None, *, channels: int = 2, period_ms: int = PERIOD_MS
    ) -> None:
        self._wanted = device
        self._channels = channels
        self._period_ms = period_ms
        self._name = device or "default"
        self._pa: Any = None
        self._stream: Any = None

    @property
    def description(self) -> str:
        return f"speaker {self._name!r}"

    def open(self) -> OutputFormat:
        try:
            pa, info = start_pyaudio(self._wanted, "output", "stream.playback.device")
        except AudioDeviceError as exc:
            raise PlaybackError(
                f"{exc}. In a room without loudspeakers set stream.playback.output to "
                "'file' or 'none'"
            ) from exc
        try:
            self._name = str(info["name"])
            channels = max(1, min(self._channels, int(info.get("maxOutputChannels", 2))))
            rates = [SAMPLE_RATE]
            default_rate = int(float(info.get("defaultSampleRate", SAMPLE_RATE)))
            if default_rate != SAMPLE_RATE:
                rates.append(default_rate)
            errors = []
            for rate in rates:
                try:
                    stream = pa.open(
                        format=pyaudio.paInt16,
                        channels=channels,
                        rate=rate,
                        output=True,
                        output_device_index=int(info["index"]),
                        frames_per_buffer=rate * self._period_ms // 1000,
                    )
                except (OSError, ValueError) as exc:
                    errors.append(f"{rate} Hz: {exc}")
                    continue
                self._pa, self._stream = pa, stream
                log.info("speaker %r opened (%d Hz, %d ch)", self._name, rate, channels)
                return OutputFormat(rate, channels)
            raise PlaybackError(
                f"stream.playback.device: cannot open {self._name!r} for output "
                f"({'; '.join(errors)})"
            )
        except BaseException:
            pa.terminate()
            raise

    def write(self, samples: Samples) -> None:
        if self._stream is None:
            raise PlaybackError(f"{self.description} is not open")
        try:
            self._stream.write(samples.tobytes(), exception_on_underflow=False)
        except OSError as exc:
            raise PlaybackError(f"{self.description}: write failed: {exc}") from exc

    def close(self) -> None:
        stream, pa = self._stream, self._pa
        self._stream = self._pa = None
        close_pyaudio(stream, pa)

    def latency_s(self) -> float:
        stream = self._stream
        if stream is None:
            return 0.0
        try:
            return float(stream.get_output_latency())
        except (OSError, AttributeError):
            return 0.0


class WavFileOutput(AudioOutput):
    """A 16-bit PCM WAV file played in real time, like a sound card with ``buffer_ms``
    of buffer: :meth:`write` blocks until the audio is due. Pauses up to ``max_gap_s``
    are written as silence (what the room would have heard); after a longer one the
    file simply goes on. The header is kept current, so the file is readable while it
    grows. The file is created (or replaced) with mode 0o640 at each open, and again
    when it holds ``max_s`` of sound: it keeps the latest stretch, never the whole day.
    """

    def __init__(
        self,
        path: Path,
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 2,
        buffer_ms: int = 60,
        max_gap_s: float = 1.0,
        max_s: float = 600.0,
    ) -> None:
        self.path = Path(path)
        self._max_frames = round(max_s * sample_rate)
        self._in_file = 0  # frames in the file now
        self.restarts = 0  # times the file was full and started again
        self._format = OutputFormat(sample_rate, channels)
        self._buffer_s = buffer_ms / 1000
        self._max_gap_s = max_gap_s
        self._interrupt = threading.Event()
        self._wav: wave.Wave_write | None = None
        self._t0 = 0.0
        self._written = 0  # frames since _t0
        self._base = 0  # frames in the file when the timeline (re)started
        self.frames_written = 0
        self.gap_frames = 0  # silence written for pauses

    @property
    def description(self) -> str:
        return f"file {self.path}"

    def open(self) -> OutputFormat:
        self._create()
        self._interrupt.clear()
        self._t0, self._written = time.monotonic(), 0
        self._base = 0
        log.info("playing the lesson's sound into %s (%s)", self.path, self._format)
        return self._format

    def _create(self) -> None:
        """The file, empty, with its header."""
        where = f"stream.playback.path: {self.path}"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.fchmod(fd, 0o640)
            raw = os.fdopen(fd, "wb")
        except OSError as exc:
            raise PlaybackError(f"{where} cannot be written ({exc.strerror or exc})") from exc
        wav = wave.open(raw, "wb")  # noqa: SIM115  (kept open while playing)
        wav.setnchannels(self._format.channels)
        wav.setsampwidth(2)
        wav.setframerate(self._format.sample_rate)
        self._wav = wav
        self._raw = raw
        self._in_file = 0

    def write(self, samples: Samples) -> None:
        wav = self._wav
        if wav is None:
            raise PlaybackError(f"{self.description} is not open")
        rate = self._format.sample_rate
        now = time.monotonic()
        late_s = now - (self._t0 + self._written / rate)
        if late_s > self._max_gap_s:
            self._t0, self._written = now, 0  # a long pause: start a new timeline
            self._base = self.frames_written
        elif late_s > 0:
            gap = round(late_s * rate)
            self._frames(np.zeros((gap, self._format.channels), np.int16))
            self.gap_frames += gap
        self._frames(samples)
        ahead_s = self._t0 + self._written / rate - self._buffer_s - time.monotonic()
        if ahead_s > 0:
            self._interrupt.wait(ahead_s)

    def _frames(self, samples: Samples) -> None:
        if self._in_file + int(samples.shape[0]) > self._max_frames:
            self._start_again()
        assert self._wav is not None
        try:
            self._wav.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
        except OSError as exc:
            raise PlaybackError(
                f"stream.playback.path: writing {self.path} failed ({exc.strerror or exc})"
            ) from exc
        self._written += int(samples.shape[0])
        self._in_file += int(samples.shape[0])
        self.frames_written += int(samples.shape[0])

    def _start_again(self) -> None:
        """The file is full: the same file, empty; the timeline goes on (its frame
        numbers now count from the new start)."""
        self._base -= self._in_file
        self.close()
        self._create()
        self.restarts += 1
        log.info(
            "%s held %.0f s of sound: started again empty",
            self.path,
            self._max_frames / self._format.sample_rate,
        )

    def frame_heard_at(self, monotonic_s: float) -> int | None:
        """The file's frame that plays at ``monotonic_s`` on its timeline (None before
        the file is open): what a microphone next to this "loudspeaker" hears."""
        if self._wav is None:
            return None
        return self._base + round((monotonic_s - self._t0) * self._format.sample_rate)

    def heard_at_ns(self, frames: int, rate: int) -> int:
        # The file's own timeline: where these frames sit in it is when they are heard.
        return round(1e9 * (self._t0 + (self._written - frames) / self._format.sample_rate))

    def close(self) -> None:
        wav, self._wav = self._wav, None
        if wav is not None:
            with contextlib.suppress(Exception):
                wav.close()
            with contextlib.suppress(Exception):
                self._raw.close()

    def interrupt(self) -> None:
        self._interrupt.set()


@dataclass(frozen=True, slots=True)
class PlaybackStats:
    output: str
    state: DeviceState
    reason: str
    since_wall: float
    playing: bool  # sound is being written now (False: idle between sounds, or lost)
    format: OutputFormat | None
    frames_received: int  # audio frames observed from audible sources
    frames_played: int  # periods written to the output (silence while refilling included)
    dropped: int  # received frames discarded: buffer beyond buffer_ms, or no output
    underruns: int  # times the buffers ran dry while playing (each: silence until refilled)
    level_dbfs: float | None  # RMS of what was played in the last second
    sources: tuple[str, ...]  # sources with sound buffered or playing
    reopen_attempts: int  # failed opens and writes since playback started

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "state": self.state.value,
            "reason": self.reason,
            "since": round(self.since_wall, 3),
            "playing": self.playing,
            "format": None if self.format is None else str(self.format),
            "frames_received": self.frames_received,
            "frames_played": self.frames_played,
            "dropped": self.dropped,
            "underruns": self.underruns,
            "level_dbfs": None if self.level_dbfs is None else round(self.level_dbfs, 1),
            "sources": list(self.sources),
            "reopen_attempts": self.reopen_attempts,
        }


@dataclass(slots=True)
class _Received:
    source: str
    data: NDArray[Any]  # a private copy of the frame's samples, as to_ndarray() gives them
    format: str
    layout: str
    rate: int


@dataclass(slots=True)
class _SourceBuffer:
    """One source's converted audio waiting to be played."""

    chunks: deque[Samples] = field(default_factory=deque)
    offset: int = 0  # frames of chunks[0] already played
    frames: int = 0  # frames buffered (after offset)
    resampler: Any = None
    key: tuple[str, str, int] | None = None
    last_audio: float = 0.0

    def push(self, samples: Samples) -> None:
        if samples.shape[0]:
            self.chunks.append(samples)
            self.frames += int(samples.shape[0])

    def trim(self, limit: int) -> int:
        """Drop the oldest whole chunks beyond ``limit`` frames; how many were dropped."""
        dropped = 0
        while self.frames > limit and len(self.chunks) > 1:
            first = self.chunks.popleft()
            self.frames -= int(first.shape[0]) - self.offset
            self.offset = 0
            dropped += 1
        return dropped

    def take(self, count: int, channels: int) -> tuple[NDArray[np.int32], int]:
        """Up to ``count`` frames as int32 (zero-padded), and how many were real."""
        out = np.zeros((count, channels), np.int32)
        got = 0
        while got < count and self.chunks:
            first = self.chunks[0]
            n = min(count - got, int(first.shape[0]) - self.offset)
            out[got : got + n] = first[self.offset : self.offset + n]
            got += n
            self.offset += n
            if self.offset >= first.shape[0]:
                self.chunks.popleft()
                self.offset = 0
        self.frames -= got
        return out, got


class AudioPlayback:
    """Plays received audio frames through ``output``; see the module docstring.

    Start it with :meth:`start` and stop it with :meth:`stop` (or run it as a supervisor
    service: :meth:`run`). Observing before the start is harmless: at most
    ``buffer_ms`` per source waits, the rest is dropped.
    """

    name = "playback"

    def __init__(
        self,
        output: AudioOutput,
        *,
        buffer_ms: int = BUFFER_MS,
        prime_ms: int = PRIME_MS,
        period_ms: int = PERIOD_MS,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
        reference: FarEndReference | None = None,
    ) -> None:
        self.output = output
        # The microphone's echo canceller reads what is played here (set by whoever
        # wires the room's capture to its playback; None: nothing cancels our sound).
        self.reference = reference
        self._buffer_ms = buffer_ms
        self._prime_ms = prime_ms
        self._period_ms = period_ms
        self._retry = (retry_min_s, retry_max_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[_Received] = deque()
        self._inbox_ms: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._only: str | None = None
        # Written by the thread, read anywhere (single assignments).
        self._state = DeviceState.STOPPED
        self._reason = "not started"
        self._since_wall = time.time()
        self._format: OutputFormat | None = None
        self._playing = False
        self._buffers: dict[str, _SourceBuffer] = {}
        self._levels: deque[tuple[float, float]] = deque(maxlen=256)
        self.frames_received = 0
        self.frames_played = 0
        self.dropped = 0
        self.underruns = 0
        self.reopen_attempts = 0

    # -- control ----------------------------------------------------------------------------

    def only(self, source: str | None) -> None:
        """Play only ``source`` (a receiving room: the main room); None: mix them all."""
        with self._lock:
            self._only = source
            self._inbox = deque(r for r in self._inbox if source is None or r.source == source)

    def start(self) -> None:
        """Start the playback thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._set_state(DeviceState.STARTING, f"opening {self.output.description}")
        self._thread = threading.Thread(target=self._main, name="audio-playback", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread and close the output (idempotent; never raises)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
        self.output.interrupt()
        await asyncio.to_thread(thread.join, _JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.warning("%s: the playback thread did not stop in time", self.output.description)

    async def run(self) -> None:
        """As a supervisor service: play until cancelled."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # -- the observer -----------------------------------------------------------------------

    def observe(self, source: str, kind: str, frame: Any) -> None:
        if kind != "audio" or (self._only is not None and source != self._only):
            return
        received = _Received(
            source,
            np.array(frame.to_ndarray(), copy=True),
            frame.format.name,
            frame.layout.name,
            int(frame.sample_rate),
        )
        duration_ms = 1000 * frame.samples / max(1, frame.sample_rate)
        with self._lock:
            self.frames_received += 1
            self._inbox.append(received)
            queued = self._inbox_ms.get(source, 0.0) + duration_ms
            # The thread normally empties the inbox every period; this bound only
            # matters while there is no output (lost, or not started).
            while queued > self._buffer_ms and self._inbox:
                oldest = next((r for r in self._inbox if r.source == source), None)
                if oldest is None:
                    break
                self._inbox.remove(oldest)
                queued -= 1000 * oldest.data.size / max(1, oldest.rate) / _channels(oldest)
                self.dropped += 1
            self._inbox_ms[source] = queued
            self._wake.notify()

    def track_ended(self, source: str, kind: str) -> None:
        """Nothing to do: what is buffered plays out, then playback goes idle."""

    # -- figures ----------------------------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    def stats(self) -> PlaybackStats:
        now = time.monotonic()
        with self._lock:
            window = [p for t, p in self._levels if now - t <= LEVEL_WINDOW_S]
            sources = tuple(s for s, b in self._buffers.items() if b.frames > 0)
        level = None
        if window and self._state is DeviceState.OK:
            power = sum(window) / len(window)
            level = _dbfs(power)
        return PlaybackStats(
            output=self.output.description,
            state=self._state,
            reason=self._reason,
            since_wall=self._since_wall,
            playing=self._playing,
            format=self._format,
            frames_received=self.frames_received,
            frames_played=self.frames_played,
            dropped=self.dropped,
            underruns=self.underruns,
            level_dbfs=level,
            sources=sources,
            reopen_attempts=self.reopen_attempts,
        )

    def _set_state(self, state: DeviceState, reason: str) -> None:
        if state is self._state and reason == self._reason:
            return
        self._state, self._reason, self._since_wall = state, reason, time.time()

    # -- the thread -------------------------------------------------------------------------

    def _main(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    fmt = self.output.open()
                except Exception as exc:  # a broken driver must not end playback for good
                    self.output.close()
                    self._lost(_describe(exc))
                    self._stop.wait(backoff_delay(attempt, *self._retry))
                    attempt += 1
                    continue
                if attempt:
                    log.info("audio playback: %s is back (%s)", self.output.description, fmt)
                self._format = fmt
                self._set_state(DeviceState.OK, f"playing to {self.output.description}")
                with self._lock:
                    self._buffers = {}
                try:
                    self._play(fmt)
                    attempt = 0
                except Exception as exc:
                    self.output.close()
                    self._lost(_describe(exc))
                    attempt = 1  # it opened before: retry soon, then back off
                    self._stop.wait(backoff_delay(0, *self._retry))
                else:
                    self.output.close()
        finally:
            self._playing = False
            self._set_state(DeviceState.STOPPED, "stopped")

    def _lost(self, reason: str) -> None:
        self._playing = False
        self.reopen_attempts += 1
        if self._state is not DeviceState.LOST:
            log.warning(
                "audio playback: %s: %s; retrying with backoff", self.output.description, reason
            )
        self._set_state(DeviceState.LOST, reason)

    def _play(self, fmt: OutputFormat) -> None:
        """Write one period at a time while there is sound; idle (write nothing) while
        there is none. A buffer that runs dry is one underrun: silence is written until
        ``prime_ms`` is buffered again, or for ``HOLD_MS`` before going idle."""
        period = fmt.sample_rate * self._period_ms // 1000
        limit = fmt.sample_rate * self._buffer_ms // 1000
        prime = fmt.sample_rate * self._prime_ms // 1000
        hold_periods = max(1, HOLD_MS // self._period_ms)
        refilling, dry = False, 0
        while not self._stop.is_set():
            with self._lock:
                if not self._inbox and not self._playing:
                    self._wake.wait(self._period_ms / 1000)
                received = list(self._inbox)
                self._inbox.clear()
                self._inbox_ms.clear()
                only = self._only
                self._convert(received, fmt, limit)
                buffers = [b for s, b in self._buffers.items() if (only is None or s == only)]
            primed = any(b.frames >= prime for b in buffers)
            if not self._playing:
                if not primed:
                    continue
                self._playing, refilling = True, False
            if refilling:
                if primed:
                    refilling = False
                else:
                    dry += 1
                    if dry > hold_periods:
                        self._playing = False  # the sound stopped: idle until it is back
                        continue
                    self._write(np.zeros((period, fmt.channels), np.int16))
                    continue
            mixed = np.zeros((period, fmt.channels), np.int32)
            real = 0
            for buffer in buffers:
                part, got = buffer.take(period, fmt.channels)
                mixed += part
                real = max(real, got)
            if real < period:
                self.underruns += 1
                refilling, dry = True, 1
            self._write(np.clip(mixed, -32768, 32767).astype(np.int16))

    def _write(self, block: Samples) -> None:
        self.output.write(block)
        reference, fmt = self.reference, self._format
        if reference is not None and fmt is not None:
            rate = fmt.sample_rate
            reference.push(block, rate, self.output.heard_at_ns(int(block.shape[0]), rate))
        self.frames_played += 1
        power = float(np.mean(np.square(block, dtype=np.float32))) if block.size else 0.0
        with self._lock:
            self._levels.append((time.monotonic(), power))

    def _convert(self, received: list[_Received], fmt: OutputFormat, limit: int) -> None:
        """Received frames into each source's buffer, in the output's format (called
        with the lock held: a few conversions of 20 ms each)."""
        for item in received:
            buffer = self._buffers.get(item.source)
            if buffer is None:
                buffer = self._buffers[item.source] = _SourceBuffer()
            buffer.last_audio = time.monotonic()
            buffer.push(self._resample(buffer, item, fmt))
            dropped = buffer.trim(limit)
            if dropped:
                self.dropped += dropped

    @staticmethod
    def _resample(buffer: _SourceBuffer, item: _Received, fmt: OutputFormat) -> Samples:
        if item.format == "s16" and item.rate == fmt.sample_rate and item.layout == fmt.layout:
            direct: Samples = item.data.reshape(-1, fmt.channels).astype(np.int16, copy=False)
            return direct
        key = (item.format, item.layout, item.rate)
        if buffer.resampler is None or buffer.key != key:
            buffer.resampler = av.AudioResampler(
                format="s16", layout=fmt.layout, rate=fmt.sample_rate
            )
            buffer.key = key
        frame = av.AudioFrame.from_ndarray(item.data, format=item.format, layout=item.layout)
        frame.sample_rate = item.rate
        parts = [f.to_ndarray().reshape(-1, fmt.channels) for f in buffer.resampler.resample(frame)]
        if not parts:
            return np.zeros((0, fmt.channels), np.int16)
        out: Samples = np.concatenate(parts).astype(np.int16, copy=False)
        return out


def _channels(item: _Received) -> int:
    return 1 if item.layout == "mono" else 2


def _dbfs(power: float) -> float:
    return max(_SILENCE_DBFS, 10 * math.log10(power / 32768.0**2)) if power > 0 else _SILENCE_DBFS


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PlaybackError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def open_playback(config: PlaybackConfig, **options: Any) -> AudioPlayback | None:
    """The playback ``stream.playback`` asks for, not started (None for output 'none').
    ``options`` go to :class:`AudioPlayback` (buffer and retry tuning)."""
    if config.output == "none":
        return None
    if config.output == "file":
        if config.path is None:  # the config model already refuses this
            raise ValueError("stream.playback.path: required when stream.playback.output is 'file'")
        return AudioPlayback(WavFileOutput(config.path, max_s=config.file_max_s), **options)
    return AudioPlayback(PyAudioOutput(config.device), **options)
