"""The real audio device path, with no sound card: PyAudio (PortAudio's ALSA host API)
enumerates, opens, reads and writes ALSA PCMs that a per-test ALSA configuration defines
(issue 12, point 6).

The fake hardware is alsa-lib's own ``file`` plugin on a ``null`` slave, with no daemon:

* the microphone ``fakemic`` reads its samples from ``infile``, a FIFO that a feeder
  thread fills in real time (the ``null`` slave has no clock, so the FIFO is what paces
  the capture, as a sound card would);
* the loudspeakers ``fakespk`` write what they play into a raw PCM file.

``ALSA_CONFIG_PATH`` points at the test's own configuration (which includes the
system's ``alsa.conf``) and ``HOME`` at a directory of the test, so no real
``~/.asoundrc`` plays a part. PortAudio scans devices once per initialisation: every
open of `PyAudioSource` / `PyAudioOutput` starts a fresh one, which is how an unplugged
device is noticed as missing and a replugged one found again.

Unplugged is a configuration without the PCM (as a USB device gone from the card
list): opening fails until it is back. What the ``file`` plugin cannot do is fail a
read or a write that is under way: it ignores the errors and the end of its ``infile``
(a reader then gets stale samples at full speed, which :func:`captured` would catch)
and of its output file. A microphone that disappears mid-stream is therefore one whose
stream stops delivering (its FIFO goes quiet): the hub must report it lost by its
stall timer, and take it back when it delivers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from numpy.typing import NDArray

from agent.capture import AudioHub, DeviceState, open_audio_source
from agent.config.models import AudioConfig, CaptureConfig, PlaybackConfig
from agent.stream.playback import AudioPlayback, open_playback
from tests.brokers import eventually

SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
RATE = 48_000
CHUNK = RATE // 50  # 20 ms
MIC_HZ, SPEAKER_HZ = 1000.0, 440.0
AMPLITUDE = 0.25  # -12 dBFS peak, -15 dBFS RMS for a sine
SINE_RMS_DBFS = 20 * math.log10(AMPLITUDE / math.sqrt(2))

pytestmark = pytest.mark.skipif(
    not SYSTEM_ALSA_CONF.exists(), reason="alsa-lib's configuration is not installed"
)


def tone(hz: float, start: int, count: int) -> NDArray[np.int16]:
    n = np.arange(start, start + count, dtype=np.float64)
    return (AMPLITUDE * 32767 * np.sin(2 * np.pi * hz * n / RATE)).astype(np.int16)


def dominant_hz(samples: NDArray[np.int16]) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * RATE / len(samples)


def rms_dbfs(samples: NDArray[np.int16]) -> float:
    power = float(np.mean(np.square(samples.astype(np.float64))))
    return 10 * math.log10(power / 32768.0**2) if power > 0 else -120.0


class FakeSoundCard:
    """The ALSA configuration of one test; :meth:`plug` / :meth:`unplug` edit it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "asound.conf"
        self.fifo = root / "mic.fifo"
        self.speaker_file = root / "speaker.raw"

    def write(self, *, mic: bool, speaker: bool) -> None:
        lines = [f"<{SYSTEM_ALSA_CONF}>"]
        if mic:
            if not self.fifo.exists():
                os.mkfifo(self.fifo, 0o600)
            lines.append(
                "pcm.fakemic { type file; slave.pcm null; file /dev/null; "
                f'infile "{self.fifo}"; format raw }}'
            )
        elif self.fifo.exists():
            self.fifo.unlink()
        if speaker:
            lines.append(
                f'pcm.fakespk {{ type file; slave.pcm null; file "{self.speaker_file}"; '
                "format raw }"
            )
        # A new inode: alsa-lib reloads a configuration whose file changed identity.
        staged = self.config.with_suffix(".new")
        staged.write_text("\n".join(lines) + "\n", encoding="utf-8")
        staged.replace(self.config)

    def speaker_samples(self, channels: int) -> NDArray[np.int16]:
        if not self.speaker_file.exists():
            return np.zeros((0, channels), np.int16)
        raw = self.speaker_file.read_bytes()
        usable = len(raw) - len(raw) % (2 * channels)
        return np.frombuffer(raw[:usable], dtype="<i2").reshape(-1, channels)


class Feeder:
    """Writes a tone into the microphone's FIFO in real time, like a sound card's clock.

    PortAudio opens and closes the PCM (and so the FIFO) while it scans devices, so a
    closed reader (EPIPE) just means: open again, for the next reader.
    """

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.feeding = threading.Event()
        self.feeding.set()
        self.stop = threading.Event()
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="test-mic-feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)

    def _open(self) -> int | None:
        while not self.stop.is_set():
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
            self.stop.wait(0.005)  # no reader yet
        return None

    def _run(self) -> None:
        fd = None
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                if fd is None:
                    fd = self._open()
                    if fd is None:
                        return
                    os.set_blocking(fd, True)
                    next_at = time.monotonic()
                if not self.feeding.is_set():
                    self.stop.wait(0.01)  # the device went quiet: the reader waits
                    next_at = time.monotonic()
                    continue
                chunk = tone(MIC_HZ, self.written, CHUNK).astype("<i2").tobytes()
                try:
                    os.write(fd, chunk)
                except BrokenPipeError:
                    os.close(fd)
                    fd = None
                    continue
                self.written += CHUNK
                next_at += CHUNK / RATE
                self.stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if fd is not None:
                os.close(fd)


@pytest.fixture
def card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSoundCard:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no real ~/.asoundrc
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(tmp_path / "asound.conf"))
    monkeypatch.delenv("AUDIODEV", raising=False)
    return FakeSoundCard(tmp_path)


async def captured(hub: AudioHub, seconds: float) -> NDArray[np.int16]:
    """``seconds`` of what the hub delivers from now on (mono), checked to arrive at the
    device's pace (not faster: stale samples at full speed would also hold the tone)."""
    sub = hub.subscribe("test-listener", max_chunks=int(seconds * 50) + 50)
    try:
        parts: list[NDArray[np.int16]] = []
        got = 0
        started = time.monotonic()
        async with asyncio.timeout(seconds + 20):
            while got < seconds * RATE:
                chunk = await sub.get()
                parts.append(chunk.samples[:, 0])
                got += len(chunk.samples)
        assert time.monotonic() - started > 0.7 * seconds, "faster than real time"
        return np.concatenate(parts)
    finally:
        sub.close()


def check_tone(samples: NDArray[np.int16]) -> None:
    assert abs(dominant_hz(samples) - MIC_HZ) < 5
    assert abs(rms_dbfs(samples) - SINE_RMS_DBFS) < 0.5


async def test_the_microphone_hub_reads_a_real_alsa_device_and_survives_its_loss(
    card: FakeSoundCard,
) -> None:
    capture = CaptureConfig(
        audio=AudioConfig(source="device", device="fakemic", sample_rate=RATE, channels=1),
        stall_timeout_s=1.0,
        retry_min_s=0.2,
        retry_max_s=0.5,
    )
    card.write(mic=False, speaker=False)  # not plugged in yet
    hub = AudioHub(open_audio_source(capture.audio), capture)
    task = asyncio.create_task(hub.run(), name="test-audio-hub")
    feeder = None
    try:
        # Every open is a fresh PortAudio scan: missing now...
        await eventually(lambda: hub.state is DeviceState.LOST, within=20, what="mic missing")
        assert "no input device matches 'fakemic'" in hub.reason, hub.reason
        # ...and found once it is plugged in.
        card.write(mic=True, speaker=False)
        feeder = Feeder(card.fifo)
        feeder.start()
        await eventually(lambda: hub.state is DeviceState.OK, within=20, what="mic found")
        assert hub.format is not None
        assert hub.format.sample_rate == RATE
        check_tone(await captured(hub, 1.0))
        level = hub.stats().level_dbfs
        assert level is not None
        assert abs(level - SINE_RMS_DBFS) < 1.0, level

        # Mid-stream the device stops delivering: reported lost by the stall timer.
        feeder.feeding.clear()
        await eventually(lambda: hub.state is DeviceState.LOST, within=20, what="mic lost")
        assert "no audio for" in hub.reason, hub.reason
        lost_reads = hub.stats().chunks_read

        # It delivers again: the hub is back, with the tone, at the device's pace.
        feeder.feeding.set()
        await eventually(lambda: hub.state is DeviceState.OK, within=20, what="mic back")
        check_tone(await captured(hub, 0.5))
        assert hub.stats().chunks_read > lost_reads
    finally:
        if feeder is not None:
            feeder.feeding.set()  # a reader blocked in the FIFO wakes up and stops
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if feeder is not None:
            feeder.close()


def audio_frame(start: int, channels: int = 2) -> av.AudioFrame:
    """20 ms of the loudspeaker tone as aiortc delivers it (s16, packed)."""
    mono = tone(SPEAKER_HZ, start, CHUNK)
    packed = np.repeat(mono[:, None], channels, axis=1).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(
        packed, format="s16", layout="stereo" if channels == 2 else "mono"
    )
    frame.sample_rate = RATE
    return frame


async def play_tone(playback: AudioPlayback, seconds: float, start: int = 0) -> int:
    """Hand the playback ``seconds`` of the tone at the pace a peer delivers it."""
    observe = playback.observe
    sent = start
    next_at = time.monotonic()
    while sent < start + seconds * RATE:
        observe("school1.room1", "audio", audio_frame(sent))
        sent += CHUNK
        next_at += CHUNK / RATE
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def test_the_playback_sink_plays_into_a_real_alsa_device_and_finds_it_again(
    card: FakeSoundCard,
) -> None:
    card.write(mic=False, speaker=False)  # no loudspeakers yet
    playback = open_playback(
        PlaybackConfig(output="device", device="fakespk"), retry_min_s=0.2, retry_max_s=0.5
    )
    assert playback is not None
    playback.start()
    try:
        await eventually(
            lambda: playback.state is DeviceState.LOST, within=20, what="speaker missing"
        )
        assert "fakespk" in playback.reason, playback.reason

        card.write(mic=False, speaker=True)
        await eventually(lambda: playback.state is DeviceState.OK, within=20, what="speaker")
        assert playback.stats().format is not None
        await play_tone(playback, 1.0)
        await eventually(
            lambda: len(card.speaker_samples(2)) >= 0.8 * RATE, within=20, what="sound played"
        )
        played = card.speaker_samples(2)
        sound = played[np.abs(played[:, 0]) > 0]  # leave out idle and primer silence
        assert len(sound) >= 0.5 * RATE
        assert abs(dominant_hz(sound[: RATE // 2, 0]) - SPEAKER_HZ) < 5
        assert np.array_equal(sound[:, 0], sound[:, 1])
        assert abs(rms_dbfs(sound[:, 0]) - SINE_RMS_DBFS) < 0.5
        assert playback.stats().frames_played > 0
    finally:
        await playback.stop()
