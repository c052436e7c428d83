"""A simulated classroom for echo tests: synthetic speech, a synthetic room, a mic.

Honestly labelled: nothing here is a recording. Speech is Debian's ``espeak-ng``; the
room is a synthetic impulse response (a bulk delay, a direct path and an exponentially
decaying noise tail for a chosen RT60); the microphone sums the loudspeaker's echo, the
near-end talker and white noise, sampled on a clock that drifts against the
loudspeaker's by ``drift_ppm``. The benchmark (bench/audio.py) and the tests use the same
scene, so the figures in the README are what the tests check.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import threading
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from agent.capture import AudioFormat, AudioSource

Signal = NDArray[np.float32]
"""Mono audio as float32 in [-1, 1]."""

FAR_TEXT = (
    "Good morning everyone. Today we will read the story of the little fox and the old "
    "river. Please open your books at page twelve, and listen carefully to each sentence. "
    "When you hear a new word, write it down in your notebook. We will talk about the "
    "story together after the reading, so think about what the fox wanted most."
)
NEAR_TEXT = (
    "Teacher, we cannot find page twelve. Our books are a different edition, and the "
    "story starts on page fourteen here. Could you say the first sentence again, please?"
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speech(text: str, *, voice: str = "en-us", rate: int = 48_000, wpm: int = 150) -> Signal:
    """``text`` spoken by espeak-ng, resampled to ``rate`` (linear interpolation: the
    synthesiser has nothing above 11 kHz to alias), peak-normalised to -6 dBFS."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    wav_bytes = subprocess.run(
        [exe, "-v", voice, "-s", str(wpm), "--stdout", text],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        src_rate = wav.getframerate()
        raw = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32)
    n_out = int(len(raw) * rate / src_rate)
    t_out = np.arange(n_out) * (src_rate / rate)
    out = np.interp(t_out, np.arange(len(raw)), raw).astype(np.float32)
    peak = float(np.max(np.abs(out))) or 1.0
    scaled: Signal = (out * (0.5 / peak)).astype(np.float32)
    return scaled


def room_response(
    rate: int,
    *,
    delay_ms: float,
    rt60_s: float = 0.3,
    drr_db: float = -6.0,
    length_ms: float = 250.0,
    seed: int = 1,
) -> Signal:
    """A synthetic loudspeaker-to-microphone impulse response: ``delay_ms`` of bulk
    delay (acoustic path plus the sound card's buffers), a direct path, then a noise tail
    decaying by 60 dB in ``rt60_s`` with ``drr_db`` direct-to-reverberant energy ratio
    (-6 dB: a ceiling microphone a few metres from a wall speaker). Unit energy; the
    scene sets the echo level."""
    rng = np.random.default_rng(seed)
    start = round(rate * delay_ms / 1000)
    n = round(rate * length_ms / 1000)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    tail[: round(rate * 0.003)] = 0.0  # the first reflections come a few ms after the direct path
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    tail[0] = 1.0
    h = np.zeros(start + n, np.float64)
    h[start:] = tail
    response: Signal = (h / np.sqrt(np.sum(h**2))).astype(np.float32)
    return response


def synthetic_music(seconds: float = 40.0, *, rate: int = 48_000, seed: int = 5) -> Signal:
    """A far end that is not speech, honestly synthetic: three-note chords of harmonic
    tones (up to 12 kHz) changing every 250 ms, and a hi-hat (differenced noise, 30 ms)
    every 125 ms. Tonal, wideband and without speech's pauses: what a class's video or
    song on the loudspeakers gives the canceller. Peak -6 dBFS."""
    rng = np.random.default_rng(seed)
    total = round(seconds * rate)
    out = np.zeros(total, np.float32)
    t = np.arange(round(0.25 * rate)) / rate
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-t / 0.3)
    for start in range(0, total - len(t), len(t)):
        for midi in rng.choice(np.arange(45, 80), 3, replace=False):
            f0 = 440.0 * 2 ** ((int(midi) - 69) / 12)
            note = np.zeros(len(t))
            for harmonic in range(1, 13):
                if f0 * harmonic < 12_000:
                    note += 0.6 ** (harmonic - 1) * np.sin(2 * np.pi * f0 * harmonic * t)
            out[start : start + len(t)] += (envelope * note).astype(np.float32)
    hat_n = round(0.03 * rate)
    hat = np.diff(rng.standard_normal(hat_n), prepend=0.0) * np.exp(
        -np.arange(hat_n) / (0.008 * rate)
    )
    for start in range(0, total - hat_n, round(0.125 * rate)):
        out[start : start + hat_n] += (0.3 * hat).astype(np.float32)
    peak = float(np.max(np.abs(out))) or 1.0
    music: Signal = (out * (0.5 / peak)).astype(np.float32)
    return music


def _dbfs_gain(signal: Signal, dbfs: float, active: NDArray[np.bool_] | None = None) -> Signal:
    """``signal`` scaled so its RMS (over ``active`` samples) is ``dbfs``."""
    part = signal if active is None else signal[active]
    rms = float(np.sqrt(np.mean(np.square(part, dtype=np.float64)))) or 1.0
    return (signal * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def _speaking(signal: Signal) -> NDArray[np.bool_]:
    """Samples inside 20 ms frames whose level is within 30 dB of the loudest frame's."""
    n = len(signal) // 960 * 960
    frames = np.square(signal[:n].reshape(-1, 960), dtype=np.float64).mean(axis=1)
    active = np.repeat(frames > frames.max() * 1e-3, 960)
    return np.concatenate([active, np.zeros(len(signal) - n, bool)])


def _drift(signal: Signal, ppm: float) -> Signal:
    """``signal`` as a clock ``ppm`` faster would sample it."""
    if ppm == 0:
        return signal
    t = np.arange(len(signal)) * (1 + ppm * 1e-6)
    t = t[t <= len(signal) - 1]
    drifted: Signal = np.interp(t, np.arange(len(signal)), signal).astype(np.float32)
    return drifted


def _fit(signal: Signal, n: int) -> Signal:
    out = np.zeros(n, np.float32)
    out[: min(n, len(signal))] = signal[:n]
    return out


def _place(total: int, parts: list[tuple[int, Signal]]) -> Signal:
    out = np.zeros(total, np.float32)
    for start, part in parts:
        end = min(total, start + len(part))
        out[start:end] += part[: end - start]
    return out


@dataclass(frozen=True)
class Segment:
    name: str
    start_s: float
    end_s: float


@dataclass
class Scene:
    """One simulated lesson minute, sample-aligned: ``far`` is what the loudspeaker
    played (the canceller's reference), ``mic`` what the microphone heard, ``echo`` and
    ``near`` its two speech parts (for scoring only)."""

    rate: int
    far: Signal
    mic: Signal
    echo: Signal
    near: Signal
    noise: Signal
    segments: list[Segment] = field(default_factory=list)
    delays_ms: tuple[float, float] = (0.0, 0.0)
    change_s: float = 0.0

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def span(self, name: str) -> slice:
        s = self.segment(name)
        return slice(round(s.start_s * self.rate), round(s.end_s * self.rate))


def classroom_scene(
    *,
    rate: int = 48_000,
    delay_ms: float = 40.0,
    changed_delay_ms: float = 90.0,
    drift_ppm: float = 100.0,
    echo_dbfs: float = -24.0,
    near_dbfs: float = -28.0,
    noise_dbfs: float = -60.0,
    far: Signal | None = None,
    near: Signal | None = None,
) -> Scene:
    """The benchmark's scene (about 34 s):

    * 0-12 s: far end alone (the main room's teacher on the loudspeaker): convergence
      and ERLE after 2 s;
    * 12-18 s: double talk (a pupil answers while the teacher talks);
    * 18-22 s: the near end alone (what the pupil sounds like unprocessed);
    * 22 s: the echo path's delay jumps (``delay_ms`` to ``changed_delay_ms``, as when
      the sound card's buffer changes), then the far end alone again to 34 s.

    The microphone clock runs ``drift_ppm`` fast against the loudspeaker's throughout.
    """
    far_speech = far if far is not None else speech(FAR_TEXT, voice="en-us")
    near_speech = near if near is not None else speech(NEAR_TEXT, voice="en-gb+f3", wpm=165)
    total = round(34.0 * rate)
    s = rate  # samples per second
    far_parts = [
        (0, _fit(far_speech, 12 * s)),
        (12 * s, _fit(far_speech[12 * s :], 6 * s)),
        (22 * s, _fit(far_speech[4 * s :], 12 * s)),
    ]
    far_sig = _place(total, far_parts)
    near_sig = _place(
        total, [(12 * s, _fit(near_speech, 6 * s)), (18 * s, _fit(near_speech[6 * s :], 4 * s))]
    )
    change = 22 * s
    h1 = room_response(rate, delay_ms=delay_ms, seed=1)
    h2 = room_response(rate, delay_ms=changed_delay_ms, seed=2)
    echo_a = np.convolve(far_sig, h1)[:total]
    echo_b = np.convolve(far_sig, h2)[:total]
    echo = np.concatenate([echo_a[:change], echo_b[change:]]).astype(np.float32)
    echo = _fit(_drift(echo, drift_ppm), total)
    echo = _dbfs_gain(echo, echo_dbfs, _speaking(echo))
    near_sig = _dbfs_gain(near_sig, near_dbfs, _speaking(near_sig))
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(total) * 10 ** (noise_dbfs / 20)).astype(np.float32)
    mic = np.clip(echo + near_sig + noise, -1.0, 1.0).astype(np.float32)
    segments = [
        Segment("far_alone", 0.0, 12.0),
        Segment("double_talk", 12.0, 18.0),
        Segment("near_alone", 18.0, 22.0),
        Segment("after_change", 22.0, 34.0),
    ]
    return Scene(
        rate, far_sig, mic, echo, near_sig, noise, segments, (delay_ms, changed_delay_ms), 22.0
    )


# -- a lesson with a known T/S script (the talk analysis' tests, the demo's sensing room) --

LESSON_TEACHER_TEXT = (
    "Good morning class. Today we look at fractions. A fraction has a top number and a "
    "bottom number. The bottom number says into how many equal parts the whole is cut. "
    "The top number says how many of those parts we take. Look at the cake on the board."
)
LESSON_PUPIL_TEXTS = (
    (
        "en-us+f4",
        "I think the answer is three quarters, because we took three of the four pieces. "
        "Can we cut it into eight pieces instead? Then it would be six eighths, I think.",
    ),
    (
        "en-us+m3",
        "Half of the cake is two quarters. If four of us share two cakes, everybody gets "
        "half a cake, and that is the same as two quarters of one cake.",
    ),
)
TEACHER_DBFS, PUPIL_DBFS = -20.0, -36.0  # the speech's RMS while speaking, before the
# half-power factor the levels were calibrated with (3 dB lower in fact)
_HALF_POWER_DB = 20 * math.log10(math.sqrt(0.5))


def _speech_at(signal: Signal, dbfs: float) -> Signal:
    return _dbfs_gain(signal, dbfs + _HALF_POWER_DB, np.abs(signal) > 1e-3)


def lesson_voices(rate: int = 48_000, *, pupils: int = 1) -> dict[str, Signal]:
    """The lesson's voices by speaker: ``T`` the teacher (espeak-ng ``en-gb``) near the
    microphone, ``S`` ``pupils`` pupils one after the other (``en-us+f4``, ``en-us+m3``)
    at their seats: much quieter (the distance is a level) and more reverberant."""
    if not 1 <= pupils <= len(LESSON_PUPIL_TEXTS):
        raise ValueError(f"pupils must be between 1 and {len(LESSON_PUPIL_TEXTS)}")
    teacher = speech(LESSON_TEACHER_TEXT, voice="en-gb", rate=rate)
    pupil = np.concatenate(
        [
            speech(text, voice=voice, rate=rate, wpm=140)
            for voice, text in LESSON_PUPIL_TEXTS[:pupils]
        ]
    )
    reverb = room_response(rate, delay_ms=12, rt60_s=0.5, drr_db=-9, seed=3)
    pupil = np.convolve(pupil, reverb)[: len(pupil)].astype(np.float32)
    return {"T": _speech_at(teacher, TEACHER_DBFS), "S": _speech_at(pupil, PUPIL_DBFS)}


def lesson_audio(
    script: str,
    voices: dict[str, Signal],
    *,
    rate: int = 48_000,
    interval_s: float = 4.0,
    talk_s: float = 2.8,
    remote: str = "",
) -> tuple[Signal, Signal | None]:
    """The microphone (and what the agent played, when ``remote`` names who is on the
    loudspeaker) for ``script``: per interval 'T' the teacher talks ``talk_s``, 'S' a
    pupil, '.' silence (silent practice: an S sample), each from 0.5 s into its interval
    and a different part of the voice each time; white noise at -65 dBFS throughout. The
    loudspeaker plays at -12 dBFS and reaches the microphone through a room response."""
    n = int(len(script) * interval_s * rate)
    mic = np.random.default_rng(7).standard_normal(n).astype(np.float32) * 10 ** (-65 / 20)
    played = np.zeros(n, np.float32) if remote else None
    echo = room_response(rate, delay_ms=20, rt60_s=0.4, drr_db=-6, seed=5)
    size = int(talk_s * rate)
    for k, who in enumerate(script):
        if who == ".":
            continue
        start = int((k * interval_s + 0.5) * rate)
        voice = voices[who]
        at = (k * size * 7 // 3) % max(1, len(voice) - size)
        part = voice[at : at + size]
        if who == remote and played is not None:
            loud = _speech_at(part, -12)
            played[start : start + len(part)] = loud
            heard = np.convolve(loud, echo)[: len(part)] * 10 ** (-12 / 20)
            mic[start : start + len(part)] += heard.astype(np.float32)
        else:
            mic[start : start + len(part)] += part
    return mic, played


def to_int16(signal: Signal) -> NDArray[np.int16]:
    return np.clip(np.round(signal * 32767), -32768, 32767).astype(np.int16)


def to_float(samples: NDArray[np.int16]) -> Signal:
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


def power(signal: NDArray[np.floating] | NDArray[np.int16]) -> float:
    return float(np.mean(np.square(signal, dtype=np.float64))) if signal.size else 0.0


def db(ratio: float) -> float:
    return 10 * float(np.log10(max(ratio, 1e-12)))


def erle_windows(
    scene: Scene, out: Signal, span: slice, *, window_s: float = 0.5
) -> list[tuple[float, float]]:
    """(start time, ERLE dB) for each window of ``span`` where the echo is active:
    the echo's power at the microphone over the output's power."""
    w = round(window_s * scene.rate)
    result = []
    floor = power(scene.echo[span]) * 0.05
    for start in range(span.start, span.stop - w + 1, w):
        part = slice(start, start + w)
        pe = power(scene.echo[part])
        if pe < floor:
            continue  # a pause in the far end's speech: nothing to cancel
        result.append((start / scene.rate, db(pe / max(power(out[part]), 1e-12))))
    return result


def erle(scene: Scene, out: Signal, span: slice) -> float:
    """ERLE over the echo-active windows of ``span`` (power-summed, not averaged in dB)."""
    w = round(0.5 * scene.rate)
    floor = power(scene.echo[span]) * 0.05
    pe = po = 0.0
    for start in range(span.start, span.stop - w + 1, w):
        part = slice(start, start + w)
        if power(scene.echo[part]) < floor:
            continue
        pe += power(scene.echo[part])
        po += power(out[part])
    return db(pe / max(po, 1e-12))


def convergence_s(
    scene: Scene, out: Signal, start_s: float, *, target_db: float = 20.0, end_s: float = 12.0
) -> float | None:
    """Seconds from ``start_s`` until the first 0.5 s window at or above ``target_db``
    ERLE (None: never)."""
    span = slice(round(start_s * scene.rate), round(end_s * scene.rate))
    for t, value in erle_windows(scene, out, span):
        if value >= target_db:
            return t - start_s + 0.5
    return None


def kept_db(
    reference: Signal,
    out: Signal,
    span: slice,
    *,
    lag: int = 0,
    frame_ms: int = 20,
    rate: int = 48_000,
) -> float:
    """How much of ``reference`` (the near-end talker) survives in ``out`` over ``span``:
    per 20 ms frame the least-squares gain of ``reference`` in ``out``, power-weighted
    over the frames where the talker speaks; 0 dB is untouched, -3 dB half the power."""
    n = rate * frame_ms // 1000
    kept = total = 0.0
    floor = power(reference[span]) * 0.05
    for start in range(span.start, span.stop - n + 1, n):
        ref = reference[start : start + n].astype(np.float64)
        pr = float(np.dot(ref, ref))
        if pr / n < floor:
            continue
        got = out[start + lag : start + lag + n].astype(np.float64)
        if len(got) < n:
            break
        g = float(np.dot(got, ref)) / pr
        kept += g * g * pr
        total += pr
    return db(kept / max(total, 1e-12))


def lag_samples(a: Signal, b: Signal, *, max_lag: int = 4800) -> int:
    """The lag (samples) by which ``b`` trails ``a``, by cross-correlation (FFT)."""
    n = len(a) + len(b)
    size = 1 << (n - 1).bit_length()
    spec = np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size))
    corr = np.fft.irfft(spec, size)
    lags = np.concatenate([corr[: max_lag + 1], corr[-max_lag:]])
    index = int(np.argmax(np.abs(lags)))
    return index if index <= max_lag else index - len(lags)


class LoudspeakerEcho(AudioSource):
    """A microphone in a simulated room that hears the room's loudspeaker: it reads the
    WAV file a ``WavFileOutput`` writes (the loudspeaker), in real time, through a
    synthetic room response (:func:`room_response`), and adds a near-end talker while
    :attr:`talking` is set, and white noise. Used to loop a room's sound back into its
    own microphone in the live-lesson and self-test tests.

    The file is written ahead of what it plays; ``clock`` (the output's
    ``frame_heard_at``) says which of its frames plays at a given moment, so each read
    returns the 20 ms just played; a reader thread held up (a busy test machine) gets
    the buffered frames back to back, as from a sound card.
    """

    def __init__(
        self,
        speaker: Path,
        clock: Callable[[float], int | None],
        *,
        rate: int = 48_000,
        frame_ms: int = 20,
        delay_ms: float = 20.0,
        echo_db: float = -6.0,
        noise_dbfs: float = -60.0,
        talker: Signal | None = None,
    ) -> None:
        self._path = speaker
        self._rate = rate
        self._n = rate * frame_ms // 1000
        self._period_s = frame_ms / 1000
        self._due = 0.0
        self._interrupt = threading.Event()
        self._clock = clock
        response = room_response(rate, delay_ms=delay_ms) * np.float32(10 ** (echo_db / 20))
        self._size = 1 << (len(response) + self._n - 1).bit_length()
        self._spectrum = np.fft.rfft(response, self._size)
        self._tail = np.zeros(self._size, np.float64)
        self._talker = talker
        self._talker_at = 0
        self._noise = 10 ** (noise_dbfs / 20)
        self._rng = np.random.default_rng(11)
        self._channels = 0
        self.talking = threading.Event()
        self.heard_frames = 0  # frames of loudspeaker sound read so far
        # (time each frame ended, its echo's power): what reached the microphone from
        # the loudspeaker, for ERLE on what a room sends (the last minute).
        self._echo_powers: deque[tuple[float, float]] = deque(maxlen=3000)
        self._echo_lock = threading.Lock()

    @property
    def description(self) -> str:
        return f"simulated room hearing {self._path.name}"

    def open(self) -> AudioFormat:
        self._due = time.monotonic()
        self._interrupt.clear()
        return AudioFormat(self._rate, 1, self._n)

    def _pace(self) -> float:
        """Wait until the next frame is complete, like a sound card, and return when it
        ended. A reader held up gets what the "card" buffered, back to back; held up
        past 0.5 s, the card overran and that sound is lost."""
        self._due += self._period_s
        wait = self._due - time.monotonic()
        if wait > 0:
            self._interrupt.wait(wait)
        elif wait < -0.5:
            self._due = time.monotonic()
        return self._due

    def _speaker(self, ended: float) -> NDArray[np.float64]:
        """The frame the loudspeaker played until ``ended`` (silence before it starts)."""
        n = self._n
        end = self._clock(ended)
        if end is None or end <= 0:
            return np.zeros(n)
        try:
            size = self._path.stat().st_size
        except OSError:
            return np.zeros(n)
        if size <= 44:
            return np.zeros(n)
        with self._path.open("rb") as f:
            if not self._channels:
                f.seek(22)
                self._channels = int.from_bytes(f.read(2), "little") or 1
            frame_bytes = 2 * self._channels
            start = max(0, end - n)
            f.seek(44 + start * frame_bytes)
            data = f.read((end - start) * frame_bytes)
        got = len(data) // frame_bytes
        pcm = np.frombuffer(data[: got * frame_bytes], "<i2").reshape(-1, self._channels)
        out = np.zeros(n)
        out[n - (end - start) : n - (end - start) + got] = pcm.mean(axis=1) / 32768.0
        self.heard_frames += got
        return out

    def echo_dbfs(self, since: float, until: float) -> float | None:
        """The echo's level (dBFS) at the microphone over the frames that ended from
        ``since`` to ``until`` (``time.monotonic()``); None when none did."""
        with self._echo_lock:
            powers = [p for t, p in self._echo_powers if since <= t < until]
        return db(float(np.mean(powers))) if powers else None

    def read(self) -> NDArray[np.int16]:
        ended = self._pace()
        frame = self._speaker(ended)
        wet = np.fft.irfft(np.fft.rfft(frame, self._size) * self._spectrum, self._size)
        self._tail += wet
        echo = self._tail[: self._n].copy()
        with self._echo_lock:
            self._echo_powers.append((ended, power(echo)))
        self._tail = np.concatenate([self._tail[self._n :], np.zeros(self._n)])
        mic = echo + self._rng.standard_normal(self._n) * self._noise
        talker = self._talker
        if talker is not None and self.talking.is_set():
            part = np.resize(talker[self._talker_at : self._talker_at + self._n], self._n)
            self._talker_at = (self._talker_at + self._n) % len(talker)
            mic += part
        return to_int16(mic.astype(np.float32))[:, None]

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        self._interrupt.set()
