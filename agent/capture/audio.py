"""Audio sources: a PyAudio input device, a looping WAV file, a synthetic tone.

Every source yields ``frame_ms`` chunks of int16 samples shaped (frames, channels) in
real time. Methods other than :meth:`AudioSource.interrupt` run on the hub's reader
thread only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import wave
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyaudio

from agent.capture._native import quiet_audio_libraries
from agent.capture.errors import CaptureError
from agent.capture.frames import AudioFormat, Samples
from agent.capture.pacing import Pacer
from agent.config import AudioConfig

log = logging.getLogger(__name__)


class AudioSource(ABC):
    """One microphone-like thing. Subclass it for new sources, and for fakes in tests."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Short human label for logs and health (``microphone 'USB Audio'``)."""

    @abstractmethod
    def open(self) -> AudioFormat:
        """Acquire the device; return the format it delivers. Raises CaptureError."""

    @abstractmethod
    def read(self) -> Samples:
        """Block until the next chunk: (frames, channels) int16, a new array each call."""

    @abstractmethod
    def close(self) -> None:
        """Release the device; safe to call when not open."""

    def interrupt(self) -> None:  # noqa: B027  (optional: only waiting sources need it)
        """Wake a read() that is waiting, so the hub can stop promptly (any thread)."""


def frame_samples(sample_rate: int, frame_ms: int) -> int:
    return sample_rate * frame_ms // 1000


class SyntheticAudioSource(AudioSource):
    """A 440 Hz tone at -12 dBFS for one second, then half a second of silence.

    The silences make voice-activity and silent-microphone logic testable, and the tone's
    phase runs on across chunks so a listener hears a clean beep, not clicks.
    """

    tone_hz = 440.0
    amplitude = 0.25  # -12 dBFS peak
    tone_s = 1.0
    cycle_s = 1.5

    def __init__(self, sample_rate: int, channels: int, frame_ms: int) -> None:
        self._format = AudioFormat(sample_rate, channels, frame_samples(sample_rate, frame_ms))
        self._pacer = Pacer(1000.0 / frame_ms)
        self._interrupt = threading.Event()
        self._position = 0
        self._open = False

    @property
    def description(self) -> str:
        return f"synthetic tone {self._format}"

    def open(self) -> AudioFormat:
        self._pacer.reset()
        self._interrupt.clear()
        self._open = True
        return self._format

    def read(self) -> Samples:
        if not self._open:
            raise CaptureError(f"{self.description} is not open")
        self._pacer.wait(self._interrupt)
        fmt = self._format
        n = self._position + np.arange(fmt.frame_samples, dtype=np.int64)
        self._position += fmt.frame_samples
        t = n / fmt.sample_rate
        wave_ = self.amplitude * 32767 * np.sin(2 * np.pi * self.tone_hz * t)
        wave_[(t % self.cycle_s) >= self.tone_s] = 0.0
        mono = wave_.astype(np.int16)
        return np.repeat(mono[:, None], fmt.channels, axis=1)

    def close(self) -> None:
        self._open = False

    def interrupt(self) -> None:
        self._interrupt.set()


class WavFileSource(AudioSource):
    """A 16-bit PCM WAV file played in a loop in real time.

    Channels are converted (mono to stereo and back); the sample rate is not, because a
    silent resampler would hide a wrong file: the error says which two settings disagree.
    """

    def __init__(self, path: Path, sample_rate: int, channels: int, frame_ms: int) -> None:
        self._path = path
        self._format = AudioFormat(sample_rate, channels, frame_samples(sample_rate, frame_ms))
        self._pacer = Pacer(1000.0 / frame_ms)
        self._interrupt = threading.Event()
        self._wav: wave.Wave_read | None = None
        self._file_channels = 0
        self.loops = 0

    @property
    def description(self) -> str:
        return f"file {self._path}"

    def open(self) -> AudioFormat:
        where = f"capture.audio.path: {self._path}"
        try:
            wav = wave.open(str(self._path), "rb")  # noqa: SIM115  (kept open while playing)
        except FileNotFoundError:
            raise CaptureError(f"{where} does not exist") from None
        except (OSError, EOFError, wave.Error) as exc:
            raise CaptureError(f"{where} is not a readable WAV file ({exc})") from None
        try:
            if wav.getsampwidth() != 2:
                raise CaptureError(
                    f"{where} has {8 * wav.getsampwidth()}-bit samples; only 16-bit PCM works"
                )
            if wav.getframerate() != self._format.sample_rate:
                raise CaptureError(
                    f"{where} is {wav.getframerate()} Hz but capture.audio.sample_rate is "
                    f"{self._format.sample_rate}; convert the file or change the rate"
                )
            if wav.getnframes() == 0:
                raise CaptureError(f"{where} holds no audio")
        except BaseException:
            wav.close()
            raise
        self._wav = wav
        self._file_channels = wav.getnchannels()
        self._pacer.reset()
        self._interrupt.clear()
        log.info("playing %s in a loop (%s)", self._path, self._format)
        return self._format

    def read(self) -> Samples:
        wav = self._wav
        if wav is None:
            raise CaptureError(f"{self.description} is not open")
        wanted = self._format.frame_samples
        parts: list[bytes] = []
        got = 0
        while got < wanted:
            try:
                data = wav.readframes(wanted - got)
            except (OSError, EOFError, wave.Error) as exc:
                raise CaptureError(
                    f"capture.audio.path: {self._path} became unreadable: {exc}"
                ) from exc
            if not data:
                wav.rewind()
                self.loops += 1
                continue
            parts.append(data)
            got += len(data) // (2 * self._file_channels)
        raw = np.frombuffer(b"".join(parts), dtype="<i2").astype(np.int16)
        samples = self._convert(raw.reshape(-1, self._file_channels))
        self._pacer.wait(self._interrupt)
        return samples

    def _convert(self, samples: Samples) -> Samples:
        have, want = samples.shape[1], self._format.channels
        if have == want:
            return samples
        if want == 1:
            mixed: Samples = samples.mean(axis=1, dtype=np.float32).astype(np.int16)[:, None]
            return mixed
        if have == 1:
            return np.repeat(samples, want, axis=1)
        return np.ascontiguousarray(samples[:, :want])

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None

    def interrupt(self) -> None:
        self._interrupt.set()


class AudioDeviceError(Exception):
    """PortAudio did not start, or no device matches the config field (the text names
    the field and lists the devices there are)."""


def _find_device(
    pa: Any, wanted: str | None, direction: Literal["input", "output"], field: str
) -> dict[str, Any]:
    """The device ``field`` names: empty (the system default), an index, or part of a
    name."""
    channels = "maxInputChannels" if direction == "input" else "maxOutputChannels"
    devices: list[dict[str, Any]] = []
    for index in range(pa.get_device_count()):
        with contextlib.suppress(OSError):
            info = pa.get_device_info_by_index(index)
            if int(info.get(channels, 0)) > 0:
                devices.append(info)
    names = ", ".join(f"[{d['index']}] {d['name']}" for d in devices) or "none"
    if wanted is None or not wanted.strip():
        default = (
            pa.get_default_input_device_info
            if direction == "input"
            else pa.get_default_output_device_info
        )
        try:
            chosen: dict[str, Any] = default()
        except OSError:
            raise AudioDeviceError(
                f"{field}: no default {direction} device; {direction} devices: {names}"
            ) from None
        return chosen
    text = wanted.strip()
    for device in devices:
        if text.isdigit() and int(device["index"]) == int(text):
            return device
        if not text.isdigit() and text.lower() in str(device["name"]).lower():
            return device
    raise AudioDeviceError(
        f"{field}: no {direction} device matches {wanted!r}; {direction} devices: {names}"
    )


def start_pyaudio(
    wanted: str | None, direction: Literal["input", "output"], field: str
) -> tuple[Any, dict[str, Any]]:
    """A fresh PortAudio instance (it scans devices once per start, so a USB device
    plugged in later is found on the next open) and the device ``field`` names, for a
    microphone or for loudspeakers. On `AudioDeviceError` nothing is left open."""
    quiet_audio_libraries()
    try:
        pa = pyaudio.PyAudio()
    except Exception as exc:
        raise AudioDeviceError(f"{field}: PortAudio did not start: {exc}") from exc
    try:
        return pa, _find_device(pa, wanted, direction, field)
    except BaseException:
        pa.terminate()
        raise


def close_pyaudio(stream: Any, pa: Any) -> None:
    """Stop and close ``stream``, release ``pa`` (either may be None); never raises."""
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.stop_stream()
        with contextlib.suppress(Exception):
            stream.close()
    if pa is not None:
        with contextlib.suppress(Exception):
            pa.terminate()


class PyAudioSource(AudioSource):
    """A microphone through PyAudio (PortAudio/ALSA), paced by the sound card itself.

    PortAudio scans devices once per initialisation, so every open starts a fresh PyAudio
    instance: a USB microphone plugged in after boot is found on the next retry.
    """

    def __init__(self, device: str | None, sample_rate: int, channels: int, frame_ms: int) -> None:
        self._wanted = device
        self._format = AudioFormat(sample_rate, channels, frame_samples(sample_rate, frame_ms))
        self._pa: Any = None
        self._stream: Any = None
        self._name = device or "default"

    @property
    def description(self) -> str:
        return f"microphone {self._name!r}"

    def open(self) -> AudioFormat:
        try:
            pa, info = start_pyaudio(self._wanted, "input", "capture.audio.device")
        except AudioDeviceError as exc:
            raise CaptureError(str(exc)) from exc
        try:
            self._name = str(info["name"])
            fmt = self._format
            try:
                stream = pa.open(
                    format=pyaudio.paInt16,
                    channels=fmt.channels,
                    rate=fmt.sample_rate,
                    input=True,
                    input_device_index=int(info["index"]),
                    frames_per_buffer=fmt.frame_samples,
                )
            except (OSError, ValueError) as exc:
                raise CaptureError(
                    f"capture.audio.device: cannot open {self._name!r} as {fmt}: {exc}"
                ) from exc
        except BaseException:
            pa.terminate()
            raise
        self._pa, self._stream = pa, stream
        log.info("microphone %r opened (%s)", self._name, self._format)
        return self._format

    def read(self) -> Samples:
        if self._stream is None:
            raise CaptureError(f"{self.description} is not open")
        try:
            data = self._stream.read(self._format.frame_samples, exception_on_overflow=False)
        except OSError as exc:
            raise CaptureError(f"{self.description}: read failed: {exc}") from exc
        return np.frombuffer(data, dtype="<i2").astype(np.int16).reshape(-1, self._format.channels)

    def close(self) -> None:
        stream, pa = self._stream, self._pa
        self._stream = self._pa = None
        close_pyaudio(stream, pa)


def open_audio_source(cfg: AudioConfig) -> AudioSource:
    """Build the source ``cfg`` describes; nothing is opened until the hub's thread starts."""
    if cfg.source == "device":
        return PyAudioSource(cfg.device, cfg.sample_rate, cfg.channels, cfg.frame_ms)
    if cfg.source == "file":
        if cfg.path is None:  # the config model already refuses this
            raise CaptureError("capture.audio.path: required when capture.audio.source is 'file'")
        return WavFileSource(cfg.path, cfg.sample_rate, cfg.channels, cfg.frame_ms)
    return SyntheticAudioSource(cfg.sample_rate, cfg.channels, cfg.frame_ms)
