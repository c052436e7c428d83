"""Who is talking: voice activity (Silero VAD, ONNX) and a teacher-vs-class heuristic.

Audio never leaves the device: this module turns the room microphone into speech spans
labelled T (teacher) or S (class); only the S-T aggregates built from them
(:mod:`agent.sensing.st_analysis`) are ever published.

Voice activity: Silero VAD v6 (``silero-vad-16k.onnx``, see models.json) at 16 kHz in
32 ms windows (512 samples plus the model's 64-sample context), the microphone resampled
from its own rate (48 kHz on the agent) with a windowed-sinc low-pass first. A window is
speech once its probability reaches ``threshold`` and stays speech until it falls below
``threshold - 0.15`` for ``min_silence_s`` (Silero's own hysteresis); spans shorter than
``min_speech_s`` are dropped (clicks, chairs).

Teacher or class (the heuristic, documented in the README):

1. **The reference.** What the agent itself plays through the room's loudspeakers (the
   other side of the lesson) is run through the same VAD. Microphone speech while the
   reference speaks (from ``echo_lead_s`` before the reference's VAD fires, for its
   onset latency, to ``echo_hold_s`` after it stops, for the room's delay and reverberation)
   is the loudspeaker, never the local room talking: in a *receiving* room it is the
   remote teacher, so it counts as **T**; in the *main* room it is the receiving rooms'
   pupils answering, so it counts as **S**.
2. **Local speech, main room.** The teacher stands at the front near the microphone (or
   wears it); pupils speak from their seats, metres further away, so their speech reaches
   the microphone well below the teacher's. A run of local speech whose RMS level is at or
   above ``teacher_dbfs`` is **T**, below it **S**. The level is per room (microphone
   placement): set it from ``sensing talk``'s printed levels on a recorded lesson.
3. **Local speech, receiving room.** The teacher is remote, so local speech is the class:
   **S** (a supervising adult in the room counts as S too; the lesson analysed is the
   remote teacher's).

Double talk (a pupil speaking over the loudspeaker) counts as the loudspeaker's side.
"""

from __future__ import annotations

import logging
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from agent.sensing.models import model_info, open_session

log = logging.getLogger(__name__)

VAD_MODEL = "silero-vad-16k"
VAD_RATE = 16_000
WINDOW = 512  # samples at 16 kHz: 32 ms, the window Silero VAD is trained on
CONTEXT = 64  # samples of the previous window the model sees before each new one
WINDOW_S = WINDOW / VAD_RATE
MIN_PIECE = 3  # windows (96 ms): shorter slivers cut off at the loudspeaker's edges are dropped

Role = Literal["main", "receiving"]
Speaker = Literal["T", "S"]
Source = Literal["room", "loudspeaker"]
Audio = NDArray[np.float32]


@dataclass(frozen=True)
class TalkSettings:
    """The heuristic's thresholds (defaults suit a front-of-room ceiling microphone)."""

    threshold: float = 0.5  # Silero's own default speech probability
    min_silence_s: float = 0.1  # speech ends after this long below threshold - 0.15
    min_speech_s: float = 0.25  # shorter spans are dropped
    teacher_dbfs: float = -28.0  # local speech at or above this RMS level is the teacher
    echo_hold_s: float = 0.3  # the loudspeaker's speech still reaches the mic this long after
    echo_lead_s: float = 0.3  # and the reference's VAD may fire this much after its onset


@dataclass(frozen=True)
class Span:
    """One stretch of speech: who (T or S) and from where (the room or its loudspeaker)."""

    start_s: float
    end_s: float
    speaker: Speaker
    source: Source
    level_dbfs: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "speaker": self.speaker,
            "source": self.source,
            "level_dbfs": round(self.level_dbfs, 1),
        }


@dataclass
class TalkResult:
    """A recording's speech spans, with its length and what the VAD cost."""

    duration_s: float
    spans: list[Span] = field(default_factory=list)
    vad_s: float = 0.0  # seconds of CPU (wall) spent in the model, all tracks together

    def talk_s(self, speaker: Speaker) -> float:
        return sum(s.duration_s for s in self.spans if s.speaker == speaker)


def _lowpass_taps(cutoff: float, taps: int = 63) -> NDArray[np.float64]:
    """A Hann-windowed sinc low-pass, ``cutoff`` as a fraction of the input rate."""
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hanning(taps)
    return np.asarray(h / h.sum(), dtype=np.float64)


def resample(signal: Audio, rate: int, target: int = VAD_RATE) -> Audio:
    """``signal`` at ``target`` Hz: low-pass below the new Nyquist, then decimate (integer
    ratios, 48 -> 16 kHz) or interpolate linearly (anything else)."""
    x = np.asarray(signal, dtype=np.float32)
    if rate == target:
        return x
    if rate > target:
        x = np.convolve(x, _lowpass_taps(0.45 * target / rate), mode="same").astype(np.float32)
    if rate % target == 0:
        decimated: Audio = np.ascontiguousarray(x[:: rate // target])
        return decimated
    n_out = int(len(x) * target / rate)
    out: Audio = np.interp(np.arange(n_out) * (rate / target), np.arange(len(x)), x).astype(
        np.float32
    )
    return out


class SileroVad:
    """Silero VAD v6 on onnxruntime: speech probability per 32 ms window at 16 kHz.

    Blocking (one model call per window): run it in a worker thread, never on the event
    loop."""

    def __init__(self, *, models_dir: Path | None = None, threads: int = 1) -> None:
        self.info = model_info(VAD_MODEL, models_dir)
        self.session = open_session(self.info, threads=threads, provider="cpu")

    def probabilities(self, audio16k: Audio) -> NDArray[np.float32]:
        """One probability per whole 512-sample window of ``audio16k`` (16 kHz mono)."""
        return self.stream().feed(audio16k)

    def stream(self) -> VadStream:
        """A live stream: feed it audio in chunks of any size, the model's state kept."""
        return VadStream(self.session)


class VadStream:
    """Silero VAD over audio that arrives in pieces (the microphone's blocks): the
    recurrent state, the 64-sample context and any part window carry over between calls,
    so the probabilities are those of the whole recording analysed at once."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros((1, CONTEXT), np.float32)
        self.pending = np.zeros(0, np.float32)
        self.sr = np.array(VAD_RATE, dtype=np.int64)

    def feed(self, audio16k: Audio) -> NDArray[np.float32]:
        """Probabilities of the windows completed by ``audio16k`` (16 kHz mono)."""
        audio = np.concatenate([self.pending, np.asarray(audio16k, np.float32)])
        n = len(audio) // WINDOW
        self.pending = audio[n * WINDOW :]
        probs = np.zeros(n, np.float32)
        frames = audio[: n * WINDOW].reshape(n, 1, WINDOW)
        for i in range(n):
            x = np.concatenate([self.context, frames[i]], axis=1)
            out, self.state = self.session.run(
                None, {"input": x, "state": self.state, "sr": self.sr}
            )
            probs[i] = out[0, 0]
            self.context = x[:, -CONTEXT:]
        return probs


def speech_mask(probs: NDArray[np.float32], settings: TalkSettings) -> NDArray[np.bool_]:
    """Silero's hysteresis over window probabilities, short spans dropped."""
    low = settings.threshold - 0.15
    hold = max(1, round(settings.min_silence_s / WINDOW_S))
    mask = np.zeros(len(probs), bool)
    speaking, quiet = False, 0
    for i, p in enumerate(probs):
        if p >= settings.threshold:
            speaking, quiet = True, 0
        elif speaking and p < low:
            quiet += 1
            if quiet >= hold:
                speaking = False
                mask[i - quiet + 1 : i + 1] = False
                continue
        mask[i] = speaking
    shortest = round(settings.min_speech_s / WINDOW_S)
    for start, end in _runs(mask):
        if end - start < shortest:
            mask[start:end] = False
    return mask


def _runs(mask: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) index pairs of the True runs in ``mask``."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _window_energy(audio16k: Audio, n: int) -> NDArray[np.float64]:
    frames = np.asarray(audio16k[: n * WINDOW], np.float64).reshape(n, WINDOW)
    return np.asarray(np.mean(frames**2, axis=1), dtype=np.float64)


def _dbfs(energy: float) -> float:
    # RMS relative to a full-scale sine (the usual dBFS), floored at -120
    return float(10 * np.log10(max(energy * 2, 1e-12)))


def loudspeaker_windows(
    ref_probs: NDArray[np.float32] | None, n: int, settings: TalkSettings
) -> NDArray[np.bool_]:
    """The microphone windows the loudspeaker's speech may reach: the reference's speech,
    from ``echo_lead_s`` before to ``echo_hold_s`` after (all False without a reference)."""
    loudspeaker = np.zeros(n, bool)
    if ref_probs is None:
        return loudspeaker
    ref_mask = np.zeros(n, bool)
    ref_mask[: min(n, len(ref_probs))] = speech_mask(ref_probs[:n], settings)
    hold = round(settings.echo_hold_s / WINDOW_S)
    lead = round(settings.echo_lead_s / WINDOW_S)
    for start, end in _runs(ref_mask):
        loudspeaker[max(0, start - lead) : min(n, end + hold)] = True
    return loudspeaker


def label_spans(
    probs: NDArray[np.float32],
    energy: NDArray[np.float64],
    loudspeaker: NDArray[np.bool_],
    *,
    role: Role,
    settings: TalkSettings,
) -> list[Span]:
    """The heuristic (module docstring) over per-window microphone speech probabilities,
    mean-square levels and loudspeaker windows: speech spans labelled T or S."""
    mask = speech_mask(probs, settings)
    remote: Speaker = "T" if role == "receiving" else "S"
    spans: list[Span] = []
    for start, end in _runs(mask):
        # split each speech run where the loudspeaker starts or stops speaking
        for i, j in _runs(loudspeaker[start:end]) + _runs(~loudspeaker[start:end]):
            a, b = i + start, j + start
            if b - a < MIN_PIECE:
                continue  # a sliver between the loudspeaker's edges, not a talker
            level = _dbfs(float(np.mean(energy[a:b])))
            source: Source = "loudspeaker" if loudspeaker[a] else "room"
            if source == "loudspeaker":
                speaker = remote
            elif role == "receiving":
                speaker = "S"
            else:
                speaker = "T" if level >= settings.teacher_dbfs else "S"
            spans.append(Span(a * WINDOW_S, b * WINDOW_S, speaker, source, level))
    spans.sort(key=lambda s: s.start_s)
    return spans


def analyse_talk(
    mic: Audio,
    rate: int,
    *,
    role: Role = "main",
    reference: Audio | None = None,
    reference_rate: int | None = None,
    settings: TalkSettings | None = None,
    vad: SileroVad | None = None,
) -> TalkResult:
    """Who talks when in a recording of the room microphone (and what the agent played)."""
    settings = settings or TalkSettings()
    vad = vad or SileroVad()
    mic16 = resample(mic, rate)
    started = time.perf_counter()
    probs = vad.probabilities(mic16)
    n = len(probs)
    ref_probs: NDArray[np.float32] | None = None
    if reference is not None:
        ref16 = resample(reference, reference_rate or rate)
        ref_probs = vad.probabilities(ref16)[:n]
    loudspeaker = loudspeaker_windows(ref_probs, n, settings)
    vad_s = time.perf_counter() - started
    spans = label_spans(probs, _window_energy(mic16, n), loudspeaker, role=role, settings=settings)
    duration = len(mic) / rate
    log.debug(
        "talk analysed: %.1f s of audio, %d spans, VAD %.3f s",
        duration,
        len(spans),
        vad_s,
        extra={"fields": {"role": role, "reference": reference is not None}},
    )
    return TalkResult(duration, spans, vad_s)


def read_wav(path: Path) -> tuple[Audio, int]:
    """A 16-bit PCM WAV as mono float32 in [-1, 1] and its rate; ValueError says why not."""
    try:
        with wave.open(str(path)) as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{8 * wav.getsampwidth()}-bit samples (16-bit PCM expected)")
            rate, channels = wav.getframerate(), wav.getnchannels()
            raw = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"not a readable WAV file ({exc})") from None
    audio = raw.astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    return audio.astype(np.float32), rate


def write_wav(path: Path, audio: Audio, rate: int) -> None:
    """Mono 16-bit PCM (for tests and tools)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
