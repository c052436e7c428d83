"""The microphone's processing stage: echo cancellation, noise suppression, gain control.

A room that plays the other rooms on loudspeakers hears them again in its microphone;
without a canceller every room hears itself a round trip later, and loud speakers howl.
The stage runs WebRTC's audio processing module (AEC3, NS, AGC2, the high-pass filter)
through ``pywebrtc-audio``, chosen over livekit's ``rtc.AudioProcessingModule`` and
``speexdsp`` by ``bench/audio.py`` (figures in the README).

* The far-end reference is exactly what the loudspeakers play: the playback thread
  pushes every block it writes into a :class:`FarEndReference`, stamped with the time
  the block is heard (the write time plus the output's own delay).
* The microphone side runs on the audio hub's reader thread (never the event loop),
  10 ms at a time. For each frame the reference heard at the same moment is handed
  over, so the canceller only has to find the acoustic path and the sound cards'
  unreported buffering.
* What the canceller sees is measured: every second, while the loudspeakers play, the
  raw microphone is cross-correlated (GCC-PHAT, at 8 kHz) with the reference it was
  given. That delay is the echo-path figure in health; when it leaves the range AEC3
  searches (0 to ``max_echo_delay_ms``) or jumps by more than 10 ms (confirmed half a
  second later), the reference is realigned to put the echo 40 ms after it and the
  canceller starts afresh (AEC3 left to follow a jump itself dips for seconds).
* Both clocks are smoothed: blocks are placed back to back, and a stamp that keeps
  disagreeing by more than 5 ms (clock drift) moves the timeline by that much.

Nothing the engine raises reaches the hub: the raw microphone is sent, and the error
is counted and logged once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import numpy as np
import pywebrtc_audio
from numpy.typing import NDArray

from agent.capture.frames import AudioFormat, Samples
from agent.capture.linear_echo import LinearCanceller
from agent.config import AudioProcessingConfig
from agent.contracts import AudioProcessingSection, ReferenceState

log = logging.getLogger(__name__)

FRAME_MS = 10  # WebRTC's APM works on 10 ms frames
_JUMP_NS = 100_000_000  # a stamp this far off the timeline starts a new one (a pause)
_STEP_NS = 5_000_000  # a smoothed disagreement this large moves the timeline (drift)
_BUFFERED_NS = 500_000_000  # a read this late can still be buffered audio; later: a gap
_REFERENCE_KEEP_NS = 3_000_000_000  # reference kept for realignment
_PLAYING_NS = 1_000_000_000  # the loudspeakers count as playing this long after a block
_ESTIMATE_RATE = 8_000  # delay estimation runs on a decimated copy
_ESTIMATE_WINDOW_S = 2.0
_ESTIMATE_EVERY_S = 1.0
_EARLIEST_MS = 300.0  # how early an echo may show (before its reference: stamps too late)
_TARGET_MS = 40.0  # where a realignment puts the echo (inside AEC3's range, off its edges)
_JUMP_MS = 10.0  # a measured delay this far from the settled one is a jump, not drift
_CONFIRM_MS = 3.0  # two estimates this close confirm a jump
_CONFIRM_AFTER_S = 0.5  # the second estimate, this soon after the first
_MIN_CONFIDENCE = 0.2  # normalised correlation at the found lag, to believe a delay
_ECHO_DOMINATED = 0.3  # above this the microphone is mostly echo (a -6 dB DRR room peaks ~0.45)
_LINEAR_LEAD_MS = 5.0  # the linear filter's window starts this long before the echo
_LINEAR_EARLIEST_MS = 2.0  # an echo this close to the window's start (or before) moves it
_LINEAR_LATEST_MS = 40.0  # and one this far into the 160 ms window (its tail cut off)
_FAR_ACTIVE_DBFS = -50.0
_SILENCE_DBFS = -120.0


def engine_version() -> str:
    try:
        return f"pywebrtc-audio {metadata.version('pywebrtc-audio')} (WebRTC AEC3, NS, AGC2)"
    except metadata.PackageNotFoundError:  # pragma: no cover - an unusual install
        return "pywebrtc-audio (WebRTC AEC3, NS, AGC2)"


def _dbfs(power: float) -> float:
    return max(_SILENCE_DBFS, 10 * math.log10(power)) if power > 0 else _SILENCE_DBFS


def _power(signal: NDArray[Any]) -> float:
    """Mean square of float samples in [-1, 1] (a dot product: this runs for every
    10 ms frame, where np.mean's overhead cost more than the sum itself)."""
    flat = signal.reshape(-1)
    return float(flat @ flat) / flat.size if flat.size else 0.0


class _Timeline:
    """Back-to-back sample times from per-block stamps.

    Blocks are placed one after the other. A stamp far off the timeline (100 ms) starts
    a new one, except a late one when ``late_is_jitter``: a microphone read that returns
    late (the reader thread was held up) still delivers the audio the sound card
    buffered, so only the earliest stamp of the last second tells where the timeline
    is; later than half a second (more than a card buffers) is a gap, as when the
    device was reopened. A disagreement that persists past 5 ms (one clock drifting
    against the other) moves the timeline by that much at once.
    """

    def __init__(self, *, late_is_jitter: bool = False) -> None:
        self._next: float | None = None
        self._late_is_jitter = late_is_jitter
        self._errors: deque[float] = deque(maxlen=50)
        self._error = 0.0
        self.steps = 0

    def place(self, stamp_ns: int, frames: int, rate: int) -> float:
        """The start time (ns) of a block whose stamp says it starts at ``stamp_ns``."""
        duration = frames * 1e9 / rate
        error = 0.0 if self._next is None else stamp_ns - self._next
        buffered = self._late_is_jitter and 0 < error < _BUFFERED_NS
        far_off = abs(error) > _JUMP_NS and not buffered
        if self._next is None or far_off:
            start = float(stamp_ns)
            self._errors.clear()
            self._error = 0.0
        else:
            start = self._next
            if self._late_is_jitter:
                self._errors.append(error)
                drift = min(self._errors)  # lateness is one-sided: the earliest is right
                if len(self._errors) == self._errors.maxlen and abs(drift) > _STEP_NS:
                    start += drift
                    self._errors.clear()
                    self.steps += 1
            else:
                self._error = 0.9 * self._error + 0.1 * error
                if abs(self._error) > _STEP_NS:
                    start += self._error
                    self._error = 0.0
                    self.steps += 1
        self._next = start + duration
        return start


class FarEndReference:
    """What the loudspeakers play, by the time it is heard: written by the playback
    thread, read by the microphone's reader thread (any thread may call either).

    Blocks are mixed to mono and, when the loudspeakers run at another rate than the
    microphone, resampled to the microphone's rate (linear interpolation: a reference
    needs the speech band, not hi-fi).
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._blocks: deque[tuple[float, NDArray[np.float32]]] = deque()
        self._timeline = _Timeline()
        self._newest_ns = 0.0
        self.blocks_pushed = 0

    def push(self, samples: Samples, rate: int, heard_at_ns: int) -> None:
        """One block as played: (frames, channels) int16 at ``rate``, its first sample
        heard at ``heard_at_ns`` (``time.monotonic_ns()`` clock)."""
        if samples.size == 0 or rate <= 0:
            return
        mono = samples.astype(np.float32).mean(axis=1) if samples.ndim == 2 else samples
        mono = np.asarray(mono, np.float32) / 32768.0
        if rate != self.rate:
            n_out = max(1, round(len(mono) * self.rate / rate))
            positions = np.arange(n_out) * (rate / self.rate)
            mono = np.interp(positions, np.arange(len(mono)), mono).astype(np.float32)
        with self._lock:
            start = self._timeline.place(heard_at_ns, len(mono), self.rate)
            self._blocks.append((start, mono))
            self._newest_ns = start + len(mono) * 1e9 / self.rate
            while self._blocks and self._blocks[0][0] < self._newest_ns - _REFERENCE_KEEP_NS:
                self._blocks.popleft()
            self.blocks_pushed += 1

    def playing(self, now_ns: int | None = None) -> bool:
        """Sound was heard from the loudspeakers within the last second."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            return bool(self._blocks) and now - self._newest_ns < _PLAYING_NS

    def read(self, start_ns: float, count: int) -> NDArray[np.float32]:
        """``count`` samples heard from ``start_ns`` on (silence where nothing played)."""
        out = np.zeros(count, np.float32)
        step = 1e9 / self.rate
        end_ns = start_ns + count * step
        with self._lock:
            for block_start, block in reversed(self._blocks):
                block_end = block_start + len(block) * step
                if block_end <= start_ns:
                    break
                if block_start >= end_ns:
                    continue
                offset = round((block_start - start_ns) / step)
                src_from = max(0, -offset)
                dst_from = max(0, offset)
                n = min(len(block) - src_from, count - dst_from)
                if n > 0:
                    out[dst_from : dst_from + n] = block[src_from : src_from + n]
        return out


class _DelayEstimator:
    """The delay between the reference handed to the canceller and its echo in the raw
    microphone, by GCC-PHAT over the last two seconds at 8 kHz."""

    def __init__(self, rate: int, max_delay_ms: float) -> None:
        self.decimate = max(1, rate // _ESTIMATE_RATE)
        self.rate = rate / self.decimate
        frames = round(_ESTIMATE_WINDOW_S * 1000 / FRAME_MS)
        self._mic: deque[NDArray[np.float32]] = deque(maxlen=frames)
        self._far: deque[NDArray[np.float32]] = deque(maxlen=frames)
        self._every = round(_ESTIMATE_EVERY_S * 1000 / FRAME_MS)
        self._count = 0
        self._max_lag = round((max_delay_ms + 200) * self.rate / 1000)
        self._min_lag = -round(_EARLIEST_MS * self.rate / 1000)

    def reset(self) -> None:
        """Forget the history (the reference moved: old pairs would mislead)."""
        self._mic.clear()
        self._far.clear()

    def _down(self, signal: NDArray[np.float32]) -> NDArray[np.float32]:
        n = len(signal) // self.decimate * self.decimate
        out: NDArray[np.float32] = signal[:n].reshape(-1, self.decimate).sum(axis=1)
        out *= np.float32(1 / self.decimate)
        return out

    def add(self, mic: NDArray[np.float32], far: NDArray[np.float32]) -> bool:
        """One frame of each; True when an estimate is due."""
        self._mic.append(self._down(mic))
        self._far.append(self._down(far))
        self._count += 1
        if self._count < self._every or len(self._mic) < (self._mic.maxlen or 0):
            return False
        self._count = 0
        return True

    def soon(self, seconds: float) -> None:
        """Make the next estimate due ``seconds`` from now (to confirm a jump)."""
        self._count = max(self._count, self._every - round(seconds * 1000 / FRAME_MS))

    def estimate(self) -> tuple[float, float, float, float] | None:
        """(delay ms, confidence 0-1, microphone power, reference power) or None while
        the reference is too quiet to tell."""
        mic = np.concatenate(self._mic)
        far = np.concatenate(self._far)
        far_power, mic_power = _power(far), _power(mic)
        if _dbfs(far_power) < _FAR_ACTIVE_DBFS or mic_power <= 0:
            return None
        size = 1 << (2 * len(mic) - 1).bit_length()
        cross = np.fft.rfft(mic, size) * np.conj(np.fft.rfft(far, size))
        cross /= np.abs(cross) + 1e-12
        corr = np.fft.irfft(cross, size)
        lags = np.arange(self._min_lag, self._max_lag + 1)
        lag = int(lags[int(np.argmax(np.abs(corr[lags])))])
        if lag >= 0:
            a, b = far[: len(far) - lag], mic[lag:]
        else:
            a, b = far[-lag:], mic[: len(mic) + lag]
        denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
        confidence = abs(float(np.dot(a, b))) / denom if denom > 0 else 0.0
        return 1000 * lag / self.rate, confidence, mic_power, far_power


class _Engine:
    """pywebrtc-audio for one format; 10 ms frames, interleaved.

    The canceller (AEC3, with the high-pass filter it always runs) is its own object,
    ahead of noise suppression and gain control (the order WebRTC's module runs them
    in), so that it can start afresh after an echo path jump while the gain control
    keeps the room's level.
    """

    def __init__(self, cfg: AudioProcessingConfig, fmt: AudioFormat, cancel: bool) -> None:
        self.frame = fmt.sample_rate * FRAME_MS // 1000
        self.channels = fmt.channels
        self.cancel = cancel
        self._aec = (
            pywebrtc_audio.EchoCanceller(sample_rate=fmt.sample_rate, num_channels=fmt.channels)
            if cancel
            else None
        )
        high_pass = cfg.high_pass_filter and not cancel
        self._ap = pywebrtc_audio.AudioProcessor(
            sample_rate=fmt.sample_rate,
            num_channels=fmt.channels,
            noise_suppression=cfg.noise_suppression,
            high_pass_filter=high_pass,
            auto_gain_control=cfg.auto_gain_control,
            ns_level=cfg.noise_suppression_level,
            agc_max_gain_db=cfg.max_gain_db,
        )
        self._rest = cfg.noise_suppression or cfg.auto_gain_control or high_pass
        self._agc = cfg.auto_gain_control
        self.restarts = 0
        self.rate = fmt.sample_rate
        # The linear stage (mono only) starts where a realignment puts the echo, and
        # moves once the echo's delay is measured elsewhere.
        self.linear_on = cancel and cfg.linear_canceller and fmt.channels == 1
        self.linear: LinearCanceller | None = None
        self.place_linear(_TARGET_MS)

    def process(self, near: Samples, far: NDArray[np.float32] | None) -> Samples:
        """One frame (frame, channels) int16; ``far`` mono float or None."""
        out = np.ascontiguousarray(near).reshape(-1)
        if self._aec is not None:
            ref = np.zeros(self.frame, np.float32) if far is None else far * np.float32(32767)
            far16 = np.clip(np.round(ref), -32768, 32767).astype(np.int16)
            if self.channels > 1:
                far16 = np.repeat(far16, self.channels)
            linear = self.linear
            if linear is not None:
                was = linear.engaged
                cleaned = linear.process(out.astype(np.float32), ref)
                out = np.clip(np.round(cleaned), -32768, 32767).astype(np.int16)
                if was and not linear.engaged:
                    # The echo path moved under it: AEC3, which modelled the small
                    # residual, now gets the whole echo; afresh it finds it in 0.5 s.
                    self._reset_aec()
                if linear.lost:  # the drift took its window out of the history
                    self.linear = linear.restarted()
            out = self._aec.process(out, far16)
        if self._rest:
            out = self._ap.process(out)
        result: Samples = np.asarray(out, np.int16).reshape(-1, self.channels)
        return result

    def restart_canceller(self) -> None:
        """Start the canceller afresh (its filters and delay search), nothing else; the
        linear stage starts afresh where it reads, keeping its drift estimate."""
        self._reset_aec()
        if self.linear is not None:
            self.linear = self.linear.restarted()

    def _reset_aec(self) -> None:
        if self._aec is not None:
            self._aec.reset()
            self.restarts += 1

    def place_linear(self, echo_ms: float) -> None:
        """Keep the linear filter's window on an echo ``echo_ms`` after the reference:
        a fresh filter (keeping the drift estimate) starting just before it, unless the
        echo already falls early in the window (the filter follows drift itself)."""
        if not self.linear_on:
            return
        linear = self.linear
        if linear is not None:
            into = echo_ms - linear.reads_ms
            if _LINEAR_EARLIEST_MS <= into <= _LINEAR_LATEST_MS:
                return
        delay = round((echo_ms - _LINEAR_LEAD_MS) * self.rate / 1000)
        if linear is None:
            self.linear = LinearCanceller(self.rate, self.frame, delay)
        else:
            self.linear = linear.restarted(delay)

    @property
    def gain_db(self) -> float | None:
        return float(self._ap.gain_db) if self._agc else None


@dataclass(frozen=True, slots=True)
class ProcessingStats:
    """The processing stage in health (``capture.audio.processing``)."""

    engine: str
    mode: Literal["auto", "on", "off"]  # as configured
    active: bool  # processing now ('auto': while loudspeakers feed the reference)
    echo_cancellation: bool  # configured and active
    noise_suppression: bool
    high_pass_filter: bool
    auto_gain_control: bool
    linear_canceller: bool  # configured, echo cancellation on, a mono microphone
    reference: ReferenceState
    cancelling: bool  # the canceller has a live reference now
    echo_delay_ms: float | None  # reference to its echo, as the canceller is handed them
    echo_path_ms: float | None  # loudspeaker (by its stamps) to microphone
    echo_confidence: float | None  # normalised correlation at that delay (0-1)
    realignments: int  # times the reference was moved to keep the delay in range
    alignment_ms: float  # how far the reference is shifted from its stamps
    erle_db: float | None  # microphone over output power while the room hears only echo
    linear_engaged: bool  # the linear stage's output goes to AEC3 (it has converged)
    linear_erle_db: float | None  # microphone over the linear stage's output, last second
    echo_return_loss_db: float | None  # loudspeaker reference over microphone power
    input_level_dbfs: float | None  # the raw microphone, last second
    gain_db: float | None  # the gain control's current gain
    frames: int
    errors: int
    cpu_percent: float  # of one core, mean over the last few seconds

    def to_dict(self) -> AudioProcessingSection:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "engine": self.engine,
            "mode": self.mode,
            "active": self.active,
            "stages": {
                "echo_cancellation": self.echo_cancellation,
                "noise_suppression": self.noise_suppression,
                "high_pass_filter": self.high_pass_filter,
                "auto_gain_control": self.auto_gain_control,
                "linear_canceller": self.linear_canceller,
            },
            "reference": self.reference,
            "cancelling": self.cancelling,
            "echo_delay_ms": r(self.echo_delay_ms),
            "echo_path_ms": r(self.echo_path_ms),
            "echo_confidence": None
            if self.echo_confidence is None
            else round(self.echo_confidence, 2),
            "realignments": self.realignments,
            "alignment_ms": round(self.alignment_ms, 1),
            "erle_db": r(self.erle_db),
            "linear_engaged": self.linear_engaged,
            "linear_erle_db": r(self.linear_erle_db),
            "echo_return_loss_db": r(self.echo_return_loss_db),
            "input_level_dbfs": r(self.input_level_dbfs),
            "gain_db": r(self.gain_db),
            "frames": self.frames,
            "errors": self.errors,
            "cpu_percent": round(self.cpu_percent, 2),
        }


class AudioProcessor:
    """The stage between a microphone and its consumers; see the module docstring.

    :meth:`process` runs on the hub's reader thread only; :meth:`stats` on any thread.
    """

    def __init__(
        self, config: AudioProcessingConfig, reference: FarEndReference | None = None
    ) -> None:
        self.config = config
        self.reference = reference
        self._lock = threading.Lock()
        self._engine: _Engine | None = None
        self._format: AudioFormat | None = None
        self._estimator: _DelayEstimator | None = None
        self._timeline = _Timeline(late_is_jitter=True)
        self._shift_ns = 0.0  # reference read this much earlier than its stamps say
        self._delay_ms: float | None = None
        self._settled_ms: float | None = None  # the delay the canceller has settled on
        self._jump_ms: float | None = None  # a jump seen once, awaiting confirmation
        self._confidence: float | None = None
        self._erle: float | None = None
        self._erl: float | None = None
        self._out_power: deque[float] = deque(maxlen=round(_ESTIMATE_WINDOW_S * 100))
        self._in_levels: deque[tuple[int, float]] = deque(maxlen=200)
        self._cpu: deque[float] = deque(maxlen=500)
        self._cancelling = False
        self._gain: float | None = None
        self._linear_on = False
        self._linear_engaged = False
        self._linear_erle: float | None = None
        self.realignments = 0
        self.frames = 0
        self.errors = 0
        self._error_logged = False

    @property
    def active(self) -> bool:
        """Processing now: mode 'on', or 'auto' once loudspeakers feed the reference."""
        mode = self.config.mode
        return mode == "on" or (mode == "auto" and self.reference is not None)

    @property
    def cancels(self) -> bool:
        return self.active and self.config.echo_cancellation and self.reference is not None

    def _engine_for(self, fmt: AudioFormat) -> _Engine:
        if self._engine is None or self._format != fmt or self._engine.cancel != self.cancels:
            self._engine = _Engine(self.config, fmt, self.cancels)
            self._format = fmt
            self._estimator = (
                _DelayEstimator(fmt.sample_rate, self.config.max_echo_delay_ms)
                if self.cancels
                else None
            )
            log.info(
                "microphone processing: %s at %s (echo cancellation %s, noise suppression "
                "%s, high-pass %s, gain control %s)",
                engine_version(),
                fmt,
                "on" if self.cancels else "off",
                "on" if self.config.noise_suppression else "off",
                "on" if self.config.high_pass_filter else "off",
                "on" if self.config.auto_gain_control else "off",
            )
        return self._engine

    def process(self, samples: Samples, captured_ns: int, fmt: AudioFormat) -> Samples:
        """One chunk as read, ``captured_ns`` when its read returned; the processed
        chunk (the same shape), or the input itself when the stage is off or fails."""
        if not self.active or samples.size == 0:
            return samples
        frames = samples.shape[0]
        try:
            engine = self._engine_for(fmt)
            size = engine.frame
            if frames % size:
                raise ValueError(f"chunks of {frames} samples are not whole {FRAME_MS} ms frames")
            started = time.perf_counter()
            rate = fmt.sample_rate
            start = self._timeline.place(captured_ns - round(frames * 1e9 / rate), frames, rate)
            out = np.empty_like(samples)
            reference = self.reference
            playing = reference is not None and reference.playing(captured_ns)
            for i in range(0, frames, size):
                near = samples[i : i + size]
                far = None
                if engine.cancel and reference is not None:
                    t = start + i * 1e9 / rate - self._shift_ns
                    far = reference.read(t, size) if playing else np.zeros(size, np.float32)
                out[i : i + size] = engine.process(near, far)
                self._observe(near, out[i : i + size], far, captured_ns)
            gain = engine.gain_db
            linear = engine.linear
            elapsed = time.perf_counter() - started
        except Exception as exc:
            self.errors += 1
            if not self._error_logged:
                self._error_logged = True
                log.error(
                    "microphone processing failed, sending the microphone unprocessed: %s",
                    exc,
                    extra={"fields": {"error": str(exc)}},
                )
            return samples
        with self._lock:
            self._cancelling = playing and engine.cancel
            self._gain = gain
            self._linear_on = engine.linear_on
            self._linear_engaged = linear is not None and linear.engaged
            self._linear_erle = None if linear is None else linear.erle_db
            self._cpu.append(elapsed / (frames / rate))
            self.frames += frames // size
        return out

    def _observe(
        self, near: Samples, out: Samples, far: NDArray[np.float32] | None, now_ns: int
    ) -> None:
        """Level, delay and ERLE bookkeeping for one frame (reader thread)."""
        scale = np.float32(1 / 32768)
        if near.shape[1] == 1:
            mic = near.reshape(-1) * scale
        else:
            mic = near.mean(axis=1, dtype=np.float32) * scale
        in_power = _power(mic)
        out_power = _power(out.reshape(-1) * scale)
        with self._lock:
            self._in_levels.append((now_ns, in_power))
            self._out_power.append(out_power)
        estimator = self._estimator
        if estimator is None or far is None or not estimator.add(mic, far):
            return
        found = estimator.estimate()
        if found is None:
            return
        delay_ms, confidence, mic_power, far_power = found
        if confidence < _MIN_CONFIDENCE:
            with self._lock:
                self._confidence = confidence
            return
        out_power = sum(self._out_power) / max(1, len(self._out_power))
        with self._lock:
            seen = delay_ms
            self._delay_ms = seen
            self._confidence = confidence
            self._erl = 10 * math.log10(far_power / mic_power)
            if confidence >= _ECHO_DOMINATED and out_power > 0:
                erle = 10 * math.log10(mic_power / out_power)
                self._erle = erle if self._erle is None else 0.7 * self._erle + 0.3 * erle
        settled = self._settled_ms
        if seen < 0 or seen > self.config.max_echo_delay_ms:
            why = "is outside what the canceller searches"
        elif settled is None or abs(seen - settled) <= _JUMP_MS:
            self._settled_ms = seen  # first found, or drifting: the canceller follows
            self._jump_ms = None
            if self._engine is not None:
                self._engine.place_linear(seen)
            return
        elif confidence < _ECHO_DOMINATED:
            return  # a jump is only believed while the microphone hears mostly echo
        elif self._jump_ms is None or abs(seen - self._jump_ms) > _CONFIRM_MS:
            self._jump_ms = seen  # once may be a fluke: confirm it half a second later
            estimator.soon(_CONFIRM_AFTER_S)
            return
        else:
            # The sound card's buffering changed. Left alone, AEC3 finds the new delay
            # within half a second but then dips below 20 dB now and then for the
            # next ten; set back to where it works best and started afresh, it holds
            # 30-34 dB from 2 s after the jump on (bench/audio.py, over stamp seeds).
            why = f"jumped from {settled:.0f} ms"
        self._realign(seen, why)
        estimator.reset()

    def _realign(self, seen_ms: float, why: str) -> None:
        """Move the reference so the canceller sees the echo ``_TARGET_MS`` after it,
        and start the canceller afresh there (its filters modelled the old delay)."""
        with self._lock:
            self._shift_ns += (seen_ms - _TARGET_MS) * 1e6
            self._settled_ms = _TARGET_MS
            self._jump_ms = None
            self.realignments += 1
            shift = self._shift_ns / 1e6
        if self._engine is not None:
            self._engine.restart_canceller()
            self._engine.place_linear(_TARGET_MS)
        log.warning(
            "echo path delay %.0f ms %s (0-%d ms): the loudspeaker reference now goes to "
            "the canceller %+.0f ms off its stamps, and the canceller starts afresh",
            seen_ms,
            why,
            self.config.max_echo_delay_ms,
            shift,
            extra={"fields": {"echo_delay_ms": round(seen_ms, 1), "alignment_ms": shift}},
        )

    def stats(self) -> ProcessingStats:
        now = time.monotonic_ns()
        cfg = self.config
        reference = self.reference
        active = self.active
        ref_state: ReferenceState = "none"
        if reference is not None:
            ref_state = "playing" if reference.playing(now) else "idle"
        with self._lock:
            levels = [p for t, p in self._in_levels if now - t < 1_000_000_000]
            cpu = sum(self._cpu) / len(self._cpu) if self._cpu else 0.0
            path = None if self._delay_ms is None else self._delay_ms + self._shift_ns / 1e6
            return ProcessingStats(
                engine=engine_version(),
                mode=cfg.mode,
                active=active,
                echo_cancellation=active and cfg.echo_cancellation,
                noise_suppression=active and cfg.noise_suppression,
                high_pass_filter=active and cfg.high_pass_filter,
                auto_gain_control=active and cfg.auto_gain_control,
                linear_canceller=active and self._linear_on,
                reference=ref_state,
                cancelling=self._cancelling and ref_state == "playing",
                echo_delay_ms=self._delay_ms,
                echo_path_ms=path,
                echo_confidence=self._confidence,
                realignments=self.realignments,
                alignment_ms=self._shift_ns / 1e6,
                erle_db=self._erle,
                linear_engaged=self._linear_engaged,
                linear_erle_db=self._linear_erle,
                echo_return_loss_db=self._erl,
                input_level_dbfs=_dbfs(sum(levels) / len(levels)) if levels else None,
                gain_db=self._gain,
                frames=self.frames,
                errors=self.errors,
                cpu_percent=100 * cpu,
            )
