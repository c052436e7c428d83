"""Where received media goes: the fan-out sink and its observers (latest picture,
loudspeakers, recorder).

Real components throughout: synthetic capture hubs, the real shared H.264 encoder, real
aiortc peers on loopback, real PyAV decoding of what was written. Only the hardware is
faked: the loudspeaker is a WAV file (and PyAudio, with no sound card here, must fail
cleanly).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import stat
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyaudio
import pytest
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pydantic import ValidationError

from agent.capture import AudioHub, DeviceState, FrameHub, open_audio_source, open_video_source
from agent.capture import read_stamp as read_stamp_
from agent.capture.audio import SyntheticAudioSource
from agent.config.models import AudioConfig, CaptureConfig, PlaybackConfig, VideoConfig
from agent.stream import EncoderSettings, HubAudioTrack, SharedH264Encoder
from agent.stream.ice import gather, new_peer_connection
from agent.stream.peer import h264_preferences
from agent.stream.playback import AudioPlayback, PyAudioOutput, WavFileOutput, open_playback
from agent.stream.recorder import LessonRecorder
from agent.stream.sinks import FanOutSink, LatestFrames, ProbeSink, luma
from tests.brokers import eventually

SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)


@contextlib.asynccontextmanager
async def tasks(*coros: Any) -> AsyncIterator[list[asyncio.Task[Any]]]:
    running = [asyncio.create_task(c) for c in coros]
    try:
        yield running
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def picture(n: int, width: int = 320, height: int = 240) -> av.VideoFrame:
    image = np.full((height, width, 3), n % 256, np.uint8)
    return av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")


class ListTrack(MediaStreamTrack):
    """A finite track of prepared frames (what a remote track looks like to a sink)."""

    def __init__(self, kind: str, frames: list[Any]) -> None:
        super().__init__()
        self.kind = kind
        self._frames = list(frames)

    async def recv(self) -> Any:
        if not self._frames:
            self.stop()
            raise MediaStreamError
        await asyncio.sleep(0)
        return self._frames.pop(0)


class Recording:
    """An observer that notes what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.ended: list[tuple[str, str]] = []

    def observe(self, source: str, kind: str, frame: Any) -> None:
        self.seen.append((source, kind))

    def track_ended(self, source: str, kind: str) -> None:
        self.ended.append((source, kind))


class Broken:
    def observe(self, source: str, kind: str, frame: Any) -> None:
        raise ValueError("observer bug")

    def track_ended(self, source: str, kind: str) -> None:
        raise ValueError("observer bug at the end")


# -- fan-out and the latest picture ----------------------------------------------------------


async def test_fan_out_feeds_every_observer_and_survives_a_failing_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, latest = Recording(), Recording(), LatestFrames()
    sink = FanOutSink([first, Broken(), second, latest])
    frames = [picture(i) for i in range(20)]
    with caplog.at_level(logging.ERROR, logger="agent.stream.sinks"):
        await asyncio.gather(
            sink.consume("village-a.room-1", ListTrack("video", frames)),
            sink.consume("village-b.room-1", ListTrack("video", frames[:5])),
        )
    assert first.seen.count(("village-a.room-1", "video")) == 20
    assert second.seen == first.seen
    assert sorted(first.ended) == [("village-a.room-1", "video"), ("village-b.room-1", "video")]
    assert sink.failures() == {"village-a.room-1": 21, "village-b.room-1": 6}
    # Logged once per source, not once per frame.
    failures = [r for r in caplog.records if "media observer Broken failed" in r.getMessage()]
    assert len(failures) == 2
    assert sink.tracks == 0
    _seq, frame, _ = latest.latest("village-a.room-1") or (0, None, 0)
    assert frame is frames[-1]  # the very object: no copy
    assert latest.sources() == ["village-a.room-1", "village-b.room-1"]
    assert not latest.is_live("village-a.room-1")


async def test_observers_added_and_removed_while_a_track_runs() -> None:
    sink = FanOutSink()
    late = Recording()
    gate = asyncio.Event()

    class Gated(ListTrack):
        async def recv(self) -> Any:
            if len(self._frames) == 5:
                await gate.wait()
            return await super().recv()

    consumer = asyncio.create_task(
        sink.consume("main", Gated("video", [picture(i) for i in range(10)]))
    )
    await eventually(lambda: sink.tracks == 1, what="the track to be read")
    sink.add(late)
    gate.set()
    await consumer
    assert len(late.seen) == 5
    sink.remove(late)
    assert sink.observers == ()


async def test_latest_frames_waits_for_a_newer_picture() -> None:
    latest = LatestFrames()
    assert await latest.next_frame("main", 0, timeout=0.05) is None
    assert latest.age_s("main") is None
    one, two = picture(1), picture(2)
    latest.observe("main", "video", one)
    latest.observe("main", "audio", object())  # ignored: pictures only
    got = await latest.next_frame("main", 0, timeout=1)
    assert got is not None
    assert got[1] is one
    seq = got[0]
    # Nothing newer: a waiter wakes as soon as the next picture arrives.
    waiter = asyncio.create_task(latest.next_frame("main", seq, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    latest.observe("other", "video", picture(3))  # another source does not wake it
    await asyncio.sleep(0)
    assert not waiter.done()
    latest.observe("main", "video", two)
    newer = await asyncio.wait_for(waiter, 5)
    assert newer is not None
    assert newer[0] > seq
    assert newer[1] is two
    # A slow viewer skips to the newest, it never queues.
    for n in range(5):
        latest.observe("main", "video", picture(10 + n))
    newest = latest.latest("main")
    assert newest is not None
    skipped = await latest.next_frame("main", newer[0], timeout=1)
    assert skipped is not None
    assert skipped[0] == newest[0]
    assert await latest.next_frame("main", newest[0], timeout=0.05) is None
    age = latest.age_s("main")
    assert age is not None
    assert 0 <= age < 5
    assert latest.describe()["main"]["size"] == "320x240"
    assert latest._waiters == {}  # timed-out and served waiters leave nothing behind
    latest.forget("main")
    assert latest.sources() == ["other"]


async def test_probe_sink_as_an_observer_reads_stamps_from_the_luma_plane() -> None:
    from agent.capture import Stamp, draw_stamp

    frames = []
    for n in range(5):
        image = np.zeros((240, 320, 3), np.uint8)
        draw_stamp(image, Stamp(100 + n, 1))
        frames.append(av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p"))
    assert read_stamp_(luma(frames[0])) is not None
    probe = ProbeSink()
    await FanOutSink([probe]).consume("main", ListTrack("video", frames))
    stats = probe.stats("main")
    assert (stats.frames, stats.stamped, stats.advanced, stats.backwards) == (5, 5, 4, 0)
    assert probe.summary()["main"]["frames"] == 5


# -- audio playback ------------------------------------------------------------------------


def tone_frames(count: int, hz: float = 440.0, rate: int = 48_000) -> list[av.AudioFrame]:
    """Stereo s16 20 ms frames, as aiortc's Opus decoder gives them."""
    frames = []
    for i in range(count):
        n = np.arange(i * 960, (i + 1) * 960)
        mono = (8000 * np.sin(2 * np.pi * hz * n / rate)).astype(np.int16)
        data = np.repeat(mono[:, None], 2, axis=1).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
        frame.sample_rate = rate
        frame.pts, frame.time_base = i * 960, fractions.Fraction(1, rate)
        frames.append(frame)
    return frames


def read_wav(path: Path) -> tuple[np.ndarray[Any, Any], int]:
    with wave.open(str(path), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        data = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, channels)
    return data[:, 0].astype(np.float64), rate


def dominant_hz(signal: np.ndarray[Any, Any], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[int(np.argmax(spectrum))])


def gaps(signal: np.ndarray[Any, Any], rate: int, block_ms: int = 10) -> int:
    """Silent runs shorter than 300 ms between sound: dropouts (the synthetic tone's own
    pauses are 500 ms)."""
    block = rate * block_ms // 1000
    blocks = signal[: len(signal) // block * block].reshape(-1, block)
    loud = np.sqrt(np.mean(blocks**2, axis=1)) > 0.1 * np.abs(signal).max()
    count, run, seen_sound = 0, 0, False
    for is_loud in loud:
        if is_loud:
            if seen_sound and 0 < run * block_ms < 300:
                count += 1
            seen_sound, run = True, 0
        else:
            run += 1
    return count


async def test_playback_into_a_wav_file_plays_the_tone_at_real_time(tmp_path: Path) -> None:
    path = tmp_path / "speaker.wav"
    playback = AudioPlayback(WavFileOutput(path))
    playback.start()
    try:
        await eventually(lambda: playback.state is DeviceState.OK, what="the output to open")
        for frame in tone_frames(50):  # 1 s, delivered as the network would: 20 ms apart
            playback.observe("main", "audio", frame)
            await asyncio.sleep(0.02)
        await eventually(lambda: not playback.stats().playing, within=10, what="idle")
        stats = playback.stats()
    finally:
        await playback.stop()
    assert playback.state is DeviceState.STOPPED
    assert stats.frames_received == 50
    assert stats.level_dbfs is None or stats.level_dbfs < 0
    signal, rate = read_wav(path)
    assert abs(dominant_hz(signal, rate) - 440) < 5
    assert 0.9 * rate <= len(signal) <= 1.5 * rate
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_full_wav_output_starts_again_and_keeps_the_latest_sound(tmp_path: Path) -> None:
    # A room playing into a file all day must not fill the disk: at max_s the file
    # starts again empty, and what it holds is the newest sound, in a valid WAV file.
    path = tmp_path / "speaker.wav"
    output = WavFileOutput(path, sample_rate=8000, channels=1, buffer_ms=2000, max_s=0.5)
    output.open()
    try:
        for value in range(1, 13):  # 1.2 s: 100 ms blocks, each of its own value
            output.write(np.full((800, 1), value, np.int16))
            # The timeline goes on across restarts: the newest block plays at the
            # file's newest frames.
            heard = output.frame_heard_at(output._t0 + 0.1 * value)
            assert heard is not None
            assert output._in_file - 2 <= heard <= output._in_file + 2
    finally:
        output.close()
    assert output.restarts == 2  # at 0.5 s and at 1.0 s
    assert output.frames_written == 12 * 800
    signal, rate = read_wav(path)
    assert rate == 8000
    assert list(np.unique(signal)) == [11, 12]  # the last 0.2 s, nothing older
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(ValidationError, match="file_max_s"):
        PlaybackConfig(output="file", path=path, file_max_s=1.0)


async def test_playback_drops_the_oldest_beyond_its_buffer_and_mixes_sources(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mix.wav"
    playback = AudioPlayback(WavFileOutput(path), buffer_ms=200)
    # Not started: a burst of 1 s is bounded to the newest 200 ms, the rest dropped.
    for frame in tone_frames(50):
        playback.observe("a", "audio", frame)
    assert playback.dropped >= 35
    playback.start()
    try:
        await eventually(lambda: playback.frames_played >= 5, what="playing")
        # Two rooms at once: summed (each at 8000 peak: the mix reaches about 16000).
        a, b = tone_frames(10, 440), tone_frames(10, 440)
        for fa, fb in zip(a, b, strict=True):
            playback.observe("a", "audio", fa)
            playback.observe("b", "audio", fb)
        await eventually(lambda: not playback.stats().playing, within=10, what="idle")
    finally:
        await playback.stop()
    signal, _ = read_wav(path)
    assert 14000 < np.abs(signal).max() <= 16100


async def test_playback_plays_one_source_when_told(tmp_path: Path) -> None:
    playback = AudioPlayback(WavFileOutput(tmp_path / "one.wav"))
    playback.only("main")
    for frame in tone_frames(5):
        playback.observe("village", "audio", frame)
        playback.observe("main", "audio", frame)
    assert playback.frames_received == 5


async def test_pyaudio_output_without_a_sound_card_is_lost_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    playback = AudioPlayback(
        PyAudioOutput("no-such-speaker-anywhere"), retry_min_s=0.01, retry_max_s=0.05
    )
    with caplog.at_level(logging.WARNING, logger="agent.stream.playback"):
        playback.start()
        try:
            await eventually(lambda: playback.reopen_attempts >= 3, what="several retries")
            for frame in tone_frames(30):  # received audio meanwhile: bounded, no error
                playback.observe("main", "audio", frame)
            stats = playback.stats()
        finally:
            await playback.stop()
    assert stats.state is DeviceState.LOST
    assert "stream.playback.device" in stats.reason
    assert "no-such-speaker-anywhere" in stats.reason
    assert stats.to_dict()["state"] == "lost"
    assert len([r for r in caplog.records if "audio playback" in r.getMessage()]) == 1


def sound_devices() -> int:
    pa = pyaudio.PyAudio()
    try:
        return int(pa.get_device_count())
    finally:
        pa.terminate()


async def test_default_output_on_a_machine_without_sound_card() -> None:
    if await asyncio.to_thread(sound_devices) > 0:
        pytest.skip("this machine has a sound device")
    playback = open_playback(PlaybackConfig(output="device"))
    assert playback is not None
    playback.start()
    try:
        await eventually(lambda: playback.state is DeviceState.LOST, what="lost")
        reason = playback.reason
    finally:
        await playback.stop()
    assert "no default output device" in reason


def test_open_playback_follows_the_config(tmp_path: Path) -> None:
    assert open_playback(PlaybackConfig(output="none")) is None
    file_playback = open_playback(PlaybackConfig(output="file", path=tmp_path / "x.wav"))
    assert file_playback is not None
    assert isinstance(file_playback.output, WavFileOutput)
    assert not (tmp_path / "x.wav").exists()  # nothing opened until started


# -- a real lesson's media over loopback: loudspeaker, recorder, latest picture ------------


def decode_file(path: Path) -> tuple[list[av.VideoFrame], float, dict[str, Any]]:
    """Every picture of the file's video, seconds of audio, and stream facts."""
    with av.open(str(path)) as container:
        facts = {s.type: s for s in container.streams}
        info = {
            "video_codec": facts["video"].codec_context.name if "video" in facts else None,
            "audio_codec": facts["audio"].codec_context.name if "audio" in facts else None,
        }
        frames = list(container.decode(video=0)) if "video" in facts else []
    audio_s = 0.0
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio_s = sum(f.samples for f in container.decode(audio=0)) / 48_000
    return frames, audio_s, info


def stamps(frames: list[av.VideoFrame]) -> list[int]:
    found = [read_stamp_(f.to_ndarray(format="gray")) for f in frames]
    return [s.frame for s in found if s is not None]


@pytest.mark.slow
async def test_loopback_lesson_plays_the_tone_and_records_what_arrived(tmp_path: Path) -> None:
    """Sender: the main room's camera (shared encoder) and synthetic microphone. Receiver:
    one FanOutSink feeding the loudspeaker (a WAV file), a receiving-room recorder, the
    latest-picture board and the probe."""
    audio_cfg = CaptureConfig(video=SMALL.video, audio=AudioConfig(frame_ms=20, channels=1))
    video = FrameHub(open_video_source(SMALL.video), SMALL)
    mic = AudioHub(open_audio_source(audio_cfg.audio), audio_cfg)
    encoder = SharedH264Encoder(video, EncoderSettings(bitrate_kbps=400))
    wav = tmp_path / "speaker.wav"
    playback = AudioPlayback(WavFileOutput(wav))
    recorder = LessonRecorder(tmp_path / "rec", "village-a.room-1")
    latest, probe = LatestFrames(), ProbeSink()
    sink = FanOutSink([playback, recorder, latest, probe])
    receiver, sender = new_peer_connection([]), new_peer_connection([])
    consumers: list[asyncio.Task[None]] = []
    receiver.on(
        "track",
        lambda track: consumers.append(asyncio.create_task(sink.consume("main.room", track))),
    )
    audio_track = HubAudioTrack(mic, "receiver")
    playback.start()
    try:
        async with tasks(video.run(), mic.run(), encoder.run()):
            path = await recorder.start("lesson-1", source="main.room")
            assert path == tmp_path / "rec" / "lesson-1-village-a.room-1.mkv"
            receiver.addTransceiver("video", direction="recvonly").setCodecPreferences(
                h264_preferences()
            )
            receiver.addTransceiver("audio", direction="recvonly")
            await gather(receiver, await receiver.createOffer(), ["127.0.0.1"])
            await sender.setRemoteDescription(receiver.localDescription)
            sender.addTrack(encoder.track("receiver"))
            sender.addTrack(audio_track)
            await gather(sender, await sender.createAnswer(), ["127.0.0.1"])
            answer = sender.localDescription
            await receiver.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
            # 3.5 s of sound: at least two tone bursts of the synthetic source.
            await eventually(
                lambda: playback.frames_played >= 175, within=60, what="3.5 s of sound played"
            )
            await eventually(lambda: probe.stats("main.room").advanced >= 20, within=30)
            newest = await latest.next_frame("main.room", 0, timeout=10)
            summary = await recorder.stop()
            stats = playback.stats()
    finally:
        audio_track.stop()
        await receiver.close()
        await sender.close()
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await playback.stop()
        await recorder.stop()
    assert newest is not None
    assert (newest[1].width, newest[1].height) == (320, 240)
    # The loudspeaker: the synthetic microphone's tone, with few dropouts.
    signal, rate = read_wav(wav)
    loud = signal[np.abs(signal) > 0]
    assert abs(dominant_hz(signal, rate) - SyntheticAudioSource.tone_hz) < 5
    assert len(loud) > rate  # more than a second of tone
    assert gaps(signal, rate) <= 2
    assert stats.underruns <= 5, stats
    assert stats.level_dbfs is not None
    # The recorder: what arrived, re-encoded, readable, in order.
    assert summary is not None
    assert summary.error is None
    assert summary.bytes > 10_000
    assert stat.S_IMODE(os.stat(summary.path).st_mode) == 0o640
    frames, audio_s, info = decode_file(summary.path)
    assert info == {"video_codec": "h264", "audio_codec": "opus"}
    assert (frames[0].width, frames[0].height) == (320, 240)
    assert len(frames) >= 0.8 * summary.video_frames > 0
    numbers = stamps(frames)
    assert len(numbers) >= 20
    assert numbers == sorted(numbers)
    assert audio_s > 1.5


# -- main-room recording ---------------------------------------------------------------------


@pytest.mark.slow
async def test_main_room_records_its_stream_without_reencoding(tmp_path: Path) -> None:
    config = CaptureConfig(
        video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
    )
    video = FrameHub(open_video_source(config.video), config)
    mic = AudioHub(open_audio_source(config.audio), config)
    encoder = SharedH264Encoder(video, EncoderSettings(bitrate_kbps=400))
    recorder = LessonRecorder(tmp_path, "central.room-101", encoder=encoder, microphone=mic)
    async with tasks(video.run(), mic.run(), encoder.run()):
        assert await recorder.start("lesson-2") is not None
        assert recorder.state == "recording"
        await eventually(lambda: recorder.stats()["video_frames"] >= 30, within=30)
        encoded_before = encoder.frames_encoded
        summary = await recorder.stop()
    assert summary is not None
    assert summary.error is None
    assert encoder.track_count == 0  # its track went with the recording
    assert summary.path == tmp_path / "lesson-2-central.room-101.mkv"
    frames, audio_s, info = decode_file(summary.path)
    assert info == {"video_codec": "h264", "audio_codec": "opus"}
    assert (frames[0].width, frames[0].height) == (320, 240)
    # Stream copy: every packet written is one picture the shared encoder made.
    assert len(frames) == summary.video_frames
    assert summary.video_frames <= encoded_before
    assert 1.5 <= summary.duration_s <= 10
    numbers = stamps(frames)
    assert len(numbers) >= 25
    assert numbers == sorted(numbers)
    assert numbers[-1] - numbers[0] >= 25
    assert audio_s >= 1.0
    # A second lesson with the same id never overwrites the first recording.
    async with tasks(video.run(), mic.run(), encoder.run()):
        again = await recorder.start("lesson-2")
        await recorder.stop()
    assert again == tmp_path / "lesson-2-central.room-101-1.mkv"


async def test_unwritable_record_dir_is_a_clear_error_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    recorder = LessonRecorder(blocker / "recordings", "village-a.room-1")
    with caplog.at_level(logging.ERROR, logger="agent.stream.recorder"):
        assert await recorder.start("lesson-3") is None
    assert recorder.state == "failed"
    assert recorder.error is not None
    assert "stream.record_dir" in recorder.error
    assert "stream.record_dir" in caplog.text
    recorder.observe("main", "video", picture(1))  # the lesson's frames keep coming: ignored
    assert await recorder.stop() is None


RECORD_AND_DIE = r"""
import asyncio, os, resource, signal, sys, time
from pathlib import Path
from agent.capture import FrameHub, AudioHub, open_video_source, open_audio_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import EncoderSettings, SharedH264Encoder
from agent.stream.recorder import LessonRecorder

async def main(out: Path, mode: str) -> None:
    config = CaptureConfig(video=VideoConfig(width=320, height=240, fps=15),
                           audio=AudioConfig(frame_ms=20))
    video = FrameHub(open_video_source(config.video), config)
    mic = AudioHub(open_audio_source(config.audio), config)
    encoder = SharedH264Encoder(video, EncoderSettings(bitrate_kbps=400))
    recorder = LessonRecorder(out, "room", encoder=encoder, microphone=mic)
    tasks = [asyncio.create_task(c) for c in (video.run(), mic.run(), encoder.run())]
    await recorder.start("lesson")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if mode == "kill" and recorder.stats()["video_frames"] >= 45:
            print("killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "full" and recorder.state == "failed":
            break
    summary = await recorder.stop()
    print("summary", summary, flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

if sys.argv[2] == "full":
    # A disk that fills up: writes past 60 kB fail with EFBIG (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
"""


REPO = Path(__file__).resolve().parents[1]


async def run_script(tmp_path: Path, mode: str) -> tuple[int, str]:
    """RECORD_AND_DIE in its own process (this interpreter, the repository as cwd)."""
    script = tmp_path / "record_and_die.py"
    script.write_text(RECORD_AND_DIE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(tmp_path / "rec"),
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.slow
async def test_recording_cut_by_sigkill_is_still_playable(tmp_path: Path) -> None:
    code, out = await run_script(tmp_path, "kill")
    assert code == -9, out
    frames, _, info = decode_file(tmp_path / "rec" / "lesson-room.mkv")
    assert info["video_codec"] == "h264"
    # Clusters close every second: a crash loses at most about that much.
    assert len(frames) >= 15, out
    numbers = stamps(frames)
    assert numbers == sorted(numbers)
    assert len(numbers) >= 15


@pytest.mark.slow
async def test_a_full_disk_stops_the_recording_cleanly(tmp_path: Path) -> None:
    code, out = await run_script(tmp_path, "full")
    assert code == 0, out
    assert "stream.record_dir" in out
    assert "error=" in out
    assert "error=None" not in out
