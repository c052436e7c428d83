"""Talk analysis of a live lesson: the microphone's blocks (and what the agent played at
the same moment) fed to the streaming VAD as they come, S-T figures at the lesson's end.

Unlike the recording analysis, the reference's own speech counts as talk where the
microphone does not hear it (the echo canceller removed it). Runs in the sensing
service's worker thread (every call here blocks on numpy or the
model). What is kept per lesson is one probability and one level per 32 ms window (about
1 MB for a 45-minute lesson), never the audio itself; what leaves is :class:`StResult`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from agent.sensing.st_analysis import SAMPLE_INTERVAL_S, StResult, analyse, sample
from agent.sensing.talk import (
    VAD_RATE,
    WINDOW,
    WINDOW_S,
    Audio,
    Role,
    SileroVad,
    TalkSettings,
    _lowpass_taps,
    label_spans,
    loudspeaker_windows,
    resample,
)

SILENT = 1e-4  # a reference block whose peak is below this is silence: no model call


class StreamResampler:
    """:func:`~agent.sensing.talk.resample` over blocks: for integer ratios (48 -> 16 kHz)
    the low-pass keeps its history and the decimation its phase, so block edges leave no
    seams; other rates are resampled block by block (a seam every block, good enough for
    voice activity)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.step = rate // VAD_RATE if rate > VAD_RATE and rate % VAD_RATE == 0 else 0
        self.taps = _lowpass_taps(0.45 * VAD_RATE / rate) if self.step else np.ones(1)
        self.history = np.zeros(len(self.taps) - 1, np.float64)
        self.phase = 0

    def __call__(self, block: Audio) -> Audio:
        if self.rate == VAD_RATE:
            return np.asarray(block, np.float32)
        if not self.step:
            return resample(block, self.rate)
        joined = np.concatenate([self.history, np.asarray(block, np.float64)])
        filtered = np.convolve(joined, self.taps, mode="valid")  # len(block) samples
        self.history = joined[len(joined) - len(self.history) :]
        out = filtered[self.phase :: self.step].astype(np.float32)
        self.phase = (self.phase - len(filtered)) % self.step
        return out


class _Track:
    """One signal's windows: the VAD's probabilities and the mean-square levels."""

    def __init__(self, vad: SileroVad, rate: int) -> None:
        self.stream = vad.stream()
        self.resampler = StreamResampler(rate)
        self.pending = np.zeros(0, np.float32)
        self.probs: list[NDArray[np.float32]] = []
        self.energy: list[NDArray[np.float64]] = []

    def feed(self, block: Audio, *, skip_silence: bool = False) -> int:
        audio = np.concatenate([self.pending, self.resampler(block)])
        n = len(audio) // WINDOW
        self.pending = audio[n * WINDOW :]
        windows = audio[: n * WINDOW]
        if skip_silence and (n == 0 or float(np.max(np.abs(windows))) < SILENT):
            self.probs.append(np.zeros(n, np.float32))
        else:
            self.probs.append(self.stream.feed(windows))
        frames = windows.astype(np.float64).reshape(n, WINDOW)
        self.energy.append(np.mean(frames**2, axis=1))
        return n

    def all_probs(self) -> NDArray[np.float32]:
        return np.concatenate(self.probs) if self.probs else np.zeros(0, np.float32)

    def all_energy(self) -> NDArray[np.float64]:
        return np.concatenate(self.energy) if self.energy else np.zeros(0, np.float64)


class LiveTalk:
    """One lesson's talk, fed block by block; :meth:`result` gives its S-T figures."""

    def __init__(
        self,
        vad: SileroVad,
        rate: int,
        *,
        role: Role,
        settings: TalkSettings | None = None,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.role = role
        self.settings = settings or TalkSettings()
        self.interval_s = interval_s
        self.mic = _Track(vad, rate)
        self.reference = _Track(vad, rate)
        self.windows = 0
        self.referenced = False  # some of what the agent played was fed

    @property
    def heard_s(self) -> float:
        return self.windows * WINDOW_S

    def feed(self, mic: Audio, reference: Audio | None = None) -> None:
        """``mic``: mono float32 in [-1, 1] at the microphone's rate; ``reference``: what
        the loudspeakers played over the same samples (None: nothing playing)."""
        self.windows += self.mic.feed(mic)
        if reference is not None:
            self.referenced = True
        played = np.zeros(len(mic), np.float32) if reference is None else reference
        self.reference.feed(played, skip_silence=True)

    def speech_s(self) -> float:
        probs = self.mic.all_probs()
        return float(np.count_nonzero(probs >= self.settings.threshold)) * WINDOW_S

    def result(self) -> StResult:
        probs = self.mic.all_probs()
        n = len(probs)
        ref = self.reference.all_probs()[:n] if self.referenced else None
        loudspeaker = loudspeaker_windows(ref, n, self.settings)
        if ref is not None:
            # What the agent played is talk even where the echo canceller took it out of
            # the microphone (a receiving room's remote teacher must still count as T).
            probs = np.maximum(probs, ref)
        spans = label_spans(
            probs,
            self.mic.all_energy()[:n],
            loudspeaker,
            role=self.role,
            settings=self.settings,
        )
        samples = sample(spans, n * WINDOW_S, interval_s=self.interval_s)
        return analyse(samples, self.interval_s)
