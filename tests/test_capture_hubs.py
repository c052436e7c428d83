"""Hubs with real sources and fake hardware: fan-out, device loss, recovery, shutdown.

The fake devices below are VideoSource subclasses standing in for hardware that fails
in the ways cameras do (unplugged, stuck, frozen); the hubs under test are the real ones.
Every wait is for a condition with a generous deadline: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import (
    AudioHub,
    DeviceState,
    Frame,
    FrameHub,
    StateChange,
    VideoMode,
    VideoSource,
    open_audio_source,
    open_video_source,
    read_stamp,
)
from agent.capture.audio import WavFileSource
from agent.capture.video import SyntheticVideoSource
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig

FAST = CaptureConfig(stall_timeout_s=0.5, frozen_after_s=0.5, retry_min_s=0.05, retry_max_s=0.2)


@contextlib.asynccontextmanager
async def running(hub: FrameHub | AudioHub) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(hub.run(), name=f"test {hub.name}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def reach(hub: FrameHub | AudioHub, state: DeviceState, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        await hub.wait_for_state(state)


def reader_threads(hub: FrameHub | AudioHub) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{hub.name} reader"]


class FakeCamera(VideoSource):
    """Fake hardware: 50 fps of distinct small frames, with switches for the ways real
    cameras fail: unplugged after N frames, stuck inside read(), or frozen."""

    def __init__(self, unplug_after: int | None = None) -> None:
        self.unplug_after = unplug_after
        self.unplugged = False
        self.failed_at: float | None = None
        self.frozen = False
        self.stuck = threading.Event()
        self.release = threading.Event()
        self.count = 0
        self.opens = 0
        self._wake = threading.Event()

    @property
    def description(self) -> str:
        return "fake camera"

    def open(self) -> VideoMode:
        self.opens += 1
        if self.unplugged:
            raise OSError("No such device")
        self._wake.clear()
        return VideoMode(160, 120, 50, "FAKE")

    def read(self) -> np.ndarray:
        if self.unplug_after is not None and self.count >= self.unplug_after:
            self.unplug_after = None
            self.unplugged = True
        if self.unplugged:
            if self.failed_at is None:
                self.failed_at = time.monotonic()
            raise OSError("No such device")
        if self.stuck.is_set():
            self.release.wait()
        self._wake.wait(0.02)
        self.count += 1
        value = 7 if self.frozen else self.count % 251
        return np.full((120, 160, 3), value, dtype=np.uint8)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        self._wake.set()
        self.release.set()


# -- fan-out ---------------------------------------------------------------------------


async def test_fast_consumer_gets_every_frame_while_slow_one_skips() -> None:
    hub = FrameHub(SyntheticVideoSource(320, 240, 30), FAST)
    fast_frames: list[Frame] = []
    slow_frames: list[Frame] = []
    fast_done = asyncio.Event()
    snapshots = []

    async def fast() -> None:
        with hub.subscribe("stream") as frames:
            async for frame in frames:
                fast_frames.append(frame)
                if len(fast_frames) >= 60:
                    snapshots.append(hub.stats())
                    fast_done.set()
                    return

    async def slow() -> None:
        with hub.subscribe("sensing") as frames:
            while not fast_done.is_set():
                slow_frames.append(await frames.get())
                await asyncio.sleep(0.2)  # 5 fps of "analysis"

    async with running(hub), asyncio.TaskGroup() as group:
        group.create_task(fast(), name="fast consumer")
        group.create_task(slow(), name="slow consumer")

    indices = [f.index for f in fast_frames]
    assert indices == sorted(indices)
    assert indices[-1] - indices[0] + 1 - len(indices) <= 6  # nearly every frame
    stamps = [read_stamp(f.image) for f in fast_frames]
    assert all(s is not None for s in stamps)
    numbers = [s.frame for s in stamps if s]
    assert numbers == sorted(numbers)
    captured = [f.captured_ns for f in fast_frames]
    assert captured == sorted(captured)
    assert len(slow_frames) < len(fast_frames) / 2
    consumers = {c.name: c for c in snapshots[0].consumers}
    assert consumers["stream"].skipped <= 6
    assert consumers["sensing"].skipped > 2 * consumers["sensing"].delivered
    assert consumers["sensing"].delivered in (len(slow_frames), len(slow_frames) - 1)
    assert not fast_frames[0].image.flags.writeable  # shared: consumers must copy to draw


async def test_file_hub_is_paced_to_the_file_rate(tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"MJPG"), 20, (320, 240))
    for k in range(6):
        writer.write(np.full((240, 320, 3), 30 * k, dtype=np.uint8))
    writer.release()
    source = open_video_source(VideoConfig(source="file", path=clip, width=320, height=240))
    hub = FrameHub(source, FAST)
    async with running(hub):
        with hub.subscribe("stream") as frames:
            first = await frames.get()
            last = first
            while last.index - first.index < 40:
                last = await frames.get()
            stats = hub.stats()
    fps = (last.index - first.index) / ((last.captured_ns - first.captured_ns) / 1e9)
    assert 14 < fps < 26, fps  # 20 fps; unthrottled decoding would be hundreds
    assert stats.mode == VideoMode(320, 240, 20, "file")
    assert stats.state is DeviceState.OK  # a looping clip is not a frozen camera
    assert stats.fps > 10


# -- device loss -----------------------------------------------------------------------


async def test_missing_camera_is_lost_and_retried() -> None:
    hub = FrameHub(open_video_source(VideoConfig(source="camera", device="/dev/video9")), FAST)
    async with running(hub) as task:
        await reach(hub, DeviceState.LOST)
        await wait_until(lambda: hub.stats().reopen_attempts >= 3, "three reopen attempts")
        assert not task.done()
        stats = hub.stats()
    assert "/dev/video9" in stats.reason
    assert "capture.video.device" in stats.reason
    assert stats.frames_read == 0
    assert hub.state is DeviceState.STOPPED


async def test_unplugged_camera_is_lost_then_recovers() -> None:
    camera = FakeCamera(unplug_after=10)
    hub = FrameHub(camera, FAST)
    changes: list[StateChange] = []
    hub.add_state_listener(changes.append)
    async with running(hub):
        await reach(hub, DeviceState.LOST)
        assert camera.failed_at is not None
        lost = hub.stats()
        assert lost.since_monotonic - camera.failed_at < 3.0
        assert "read failed" in lost.reason
        await wait_until(lambda: camera.opens >= 3, "reopen attempts while unplugged")
        camera.unplugged = False  # plugged back in
        await reach(hub, DeviceState.OK)
        with hub.subscribe("stream") as frames:
            frame = await frames.get()
        stats = hub.stats()
    assert frame.index >= 10
    assert stats.read_errors == 1
    assert stats.reopen_attempts >= 2
    states = [c.state for c in changes]
    assert states[:4] == [DeviceState.STARTING, DeviceState.OK, DeviceState.LOST, DeviceState.OK]
    assert states[-1] is DeviceState.STOPPED


async def test_stalled_camera_is_lost_then_recovers() -> None:
    camera = FakeCamera()
    hub = FrameHub(camera, FAST)
    async with running(hub):
        await reach(hub, DeviceState.OK)
        camera.stuck.set()  # read() now blocks, like a camera that stopped streaming
        stalled_at = time.monotonic()
        await reach(hub, DeviceState.LOST)
        stats = hub.stats()
        assert stats.since_monotonic - stalled_at < 3.0
        assert "no frame for" in stats.reason
        camera.stuck.clear()
        camera.release.set()
        await reach(hub, DeviceState.OK)


async def test_frozen_picture_is_degraded_until_it_moves() -> None:
    camera = FakeCamera()
    hub = FrameHub(camera, FAST)
    async with running(hub):
        await reach(hub, DeviceState.OK)
        camera.frozen = True
        frozen_at = time.monotonic()
        await reach(hub, DeviceState.DEGRADED)
        stats = hub.stats()
        assert stats.since_monotonic - frozen_at < 3.0
        assert stats.reason.startswith("frozen")
        camera.frozen = False
        await reach(hub, DeviceState.OK)


# -- shutdown --------------------------------------------------------------------------


async def test_cancellation_stops_the_reader_thread_promptly() -> None:
    # At 1 fps the reader spends its time waiting for the next frame: stopping must
    # interrupt that wait rather than sit it out.
    hub = FrameHub(SyntheticVideoSource(320, 240, 1), FAST)
    task = asyncio.create_task(hub.run(), name="hub under test")
    await reach(hub, DeviceState.OK)
    assert len(reader_threads(hub)) == 1
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert reader_threads(hub) == []
    assert hub.state is DeviceState.STOPPED


async def test_a_driver_stuck_in_read_does_not_hold_up_shutdown() -> None:
    class Stuck(FakeCamera):
        def interrupt(self) -> None:  # a driver that cannot be woken
            pass

    camera = Stuck()
    hub = FrameHub(camera, FAST)
    task = asyncio.create_task(hub.run(), name="hub under test")
    await reach(hub, DeviceState.OK)
    camera.stuck.set()
    await reach(hub, DeviceState.LOST)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 3.0
    with pytest.raises(RuntimeError, match="still inside the source"):
        await hub.run()  # never two readers on one device
    camera.release.set()
    await wait_until(lambda: not reader_threads(hub), "the stuck reader to exit")


async def test_hub_can_run_again_after_stopping() -> None:
    hub = FrameHub(FakeCamera(), FAST)
    async with running(hub):
        await reach(hub, DeviceState.OK)
    first = hub.stats().frames_read
    async with running(hub):
        with hub.subscribe("stream") as frames:
            frame = await frames.get()
    assert frame.index >= first


# -- audio -----------------------------------------------------------------------------


def ramp_wav(path: Path, length: int = 1000, rate: int = 8000) -> np.ndarray:
    ramp = np.arange(length, dtype=np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(ramp.tobytes())
    return ramp


async def test_audio_hub_delivers_every_chunk_in_order_to_each_consumer(tmp_path: Path) -> None:
    ramp = ramp_wav(tmp_path / "ramp.wav")
    hub = AudioHub(WavFileSource(tmp_path / "ramp.wav", 8000, 1, 10), FAST)  # 100 chunks/s
    received: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    indices: dict[str, list[int]] = {"a": [], "b": []}

    async def consume(name: str, pause: float) -> None:
        with hub.subscribe(name) as chunks:
            async for chunk in chunks:
                received[name].append(chunk.samples[:, 0])
                indices[name].append(chunk.index)
                if len(indices[name]) >= 60:
                    return
                await asyncio.sleep(pause)  # "b" falls behind, but within its queue

    async with running(hub), asyncio.TaskGroup() as group:
        group.create_task(consume("a", 0), name="consumer a")
        group.create_task(consume("b", 0.012), name="consumer b")

    for name in ("a", "b"):
        got = indices[name]
        assert got == list(range(got[0], got[0] + 60)), name
        joined = np.concatenate(received[name])
        start = int(joined[0])
        assert np.array_equal(
            joined, np.roll(np.tile(ramp, joined.size // ramp.size + 2), -start)[: joined.size]
        ), name
    assert hub.stats().consumers == ()  # both unsubscribed on exit


async def test_audio_consumer_that_falls_behind_loses_the_oldest_chunks(tmp_path: Path) -> None:
    ramp_wav(tmp_path / "ramp.wav")
    hub = AudioHub(WavFileSource(tmp_path / "ramp.wav", 8000, 1, 10), FAST)
    async with running(hub):
        with hub.subscribe("lagging", max_chunks=5) as chunks:
            await wait_until(lambda: hub.stats().chunks_read >= 25, "25 chunks")
            stats = {c.name: c for c in hub.stats().consumers}["lagging"]
            assert stats.queued == 5
            assert stats.dropped >= 15
            kept = [chunks.get_nowait() for _ in range(5)]
    newest = [c.index for c in kept if c is not None]
    assert newest == list(range(newest[0], newest[0] + 5))


async def test_audio_level_and_clipping_are_reported_and_silence_is_not_lost(
    tmp_path: Path,
) -> None:
    silent, loud = tmp_path / "silent.wav", tmp_path / "loud.wav"
    for path, value in ((silent, 0), (loud, 32767)):
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(16000)
            samples = np.full(1600, value, dtype=np.int16)
            samples[::2] = -value
            wav.writeframes(samples.tobytes())
    results = {}
    for path in (silent, loud):
        hub = AudioHub(
            open_audio_source(AudioConfig(source="file", path=path, sample_rate=16000)), FAST
        )
        async with running(hub):
            await wait_until(lambda h=hub: h.stats().chunks_read >= 10, "ten chunks")
            results[path] = hub.stats()
    assert results[silent].state is DeviceState.OK
    assert results[silent].level_dbfs == -120.0
    assert results[silent].clipping is False
    assert results[loud].clipping is True
    assert results[loud].level_dbfs is not None
    assert results[loud].level_dbfs > -1.0
    json.dumps(results[loud].to_dict())


async def test_synthetic_audio_level_is_the_tone() -> None:
    hub = AudioHub(open_audio_source(AudioConfig(sample_rate=16000)), FAST)
    async with running(hub):
        await wait_until(lambda: hub.stats().chunks_read >= 20, "twenty chunks")
        stats = hub.stats()
    assert stats.level_dbfs is not None
    assert -30.0 < stats.level_dbfs < -14.0  # -15 dBFS tone, partly silence
    assert stats.clipping is False
    assert str(stats.format) == "16000 Hz 1 ch 20 ms"


async def test_missing_microphone_is_lost_with_the_config_field() -> None:
    source = open_audio_source(AudioConfig(source="device", device="no-such-microphone-xyz"))
    hub = AudioHub(source, FAST)
    async with running(hub) as task:
        await reach(hub, DeviceState.LOST)
        await wait_until(lambda: hub.stats().reopen_attempts >= 2, "reopen attempts")
        assert not task.done()
        assert "capture.audio.device" in hub.reason


# -- stats -----------------------------------------------------------------------------


async def test_stats_snapshot_is_json_ready() -> None:
    hub = FrameHub(FakeCamera(), FAST)
    assert hub.stats().state is DeviceState.STOPPED
    async with running(hub):
        with hub.subscribe("health"):
            await reach(hub, DeviceState.OK)
            await wait_until(lambda: hub.stats().frames_read >= 5, "five frames")
            data = hub.stats().to_dict()
            with pytest.raises(ValueError, match="already has a consumer"):
                hub.subscribe("health")
    text = json.dumps(data)
    assert data["state"] == "ok"
    assert data["mode"] == "160x120@50 FAKE"
    assert data["consumers"] == {"health": {"delivered": 0, "skipped": data["frames_read"] - 1}}
    assert "fps" in text
