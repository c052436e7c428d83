"""Capture sources on their own: stamps, the synthetic pattern, files, and missing devices."""

from __future__ import annotations

import glob
import json
import os
import time
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import (
    CaptureError,
    DeviceInventory,
    Stamp,
    VideoMode,
    draw_stamp,
    list_devices,
    open_audio_source,
    open_video_source,
    read_stamp,
)
from agent.capture.audio import PyAudioSource, SyntheticAudioSource, WavFileSource
from agent.capture.video import CameraSource, FileVideoSource, SyntheticVideoSource
from agent.config.models import AudioConfig, VideoConfig


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def write_stamped_video(path: Path, frames: int, fps: float, size: tuple[int, int]) -> None:
    """A small clip whose frame k carries stamp k, so playback order can be read back."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for k in range(frames):
        image = np.full((size[1], size[0], 3), 40 + 20 * k, dtype=np.uint8)
        draw_stamp(image, Stamp(k, 1_000_000 + k))
        writer.write(image)
    writer.release()


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


# -- stamps and the synthetic pattern --------------------------------------------------


def test_synthetic_frames_carry_advancing_stamps() -> None:
    source = SyntheticVideoSource(1280, 720, 30)
    assert source.open() == VideoMode(1280, 720, 30, "synthetic")
    before = time.time_ns()
    stamps = []
    for _ in range(4):
        image = source.read()
        assert image.shape == (720, 1280, 3)
        assert image.dtype == np.uint8
        stamps.append(read_stamp(image))
    after = time.time_ns()
    source.close()
    assert [s.frame for s in stamps if s] == [0, 1, 2, 3]
    times = [s.time_ns for s in stamps if s]
    assert times == sorted(times)
    assert before <= times[0]
    assert times[-1] <= after
    # Paced at 30 fps: four frames take about three periods, not zero.
    assert (times[-1] - times[0]) / 1e9 > 0.05


@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080), (640, 480), (160, 120)])
def test_stamp_survives_jpeg_quality_70(size: tuple[int, int]) -> None:
    source = SyntheticVideoSource(size[0], size[1], 60)
    source.open()
    image = source.read()
    original = read_stamp(image)
    assert original is not None
    assert read_stamp(jpeg(image, 70)) == original
    grey = cv2.cvtColor(jpeg(image, 70), cv2.COLOR_BGR2GRAY)
    assert read_stamp(grey) == original


def test_stamp_round_trips_extreme_values() -> None:
    image = np.full((720, 1280, 3), 128, dtype=np.uint8)
    stamp = Stamp(2**32 - 1, 2**63 + 12345)
    draw_stamp(image, stamp)
    assert read_stamp(jpeg(image, 70)) == stamp


def test_read_stamp_rejects_images_without_a_valid_stamp() -> None:
    rng = np.random.default_rng(1)
    assert read_stamp(np.zeros((720, 1280, 3), dtype=np.uint8)) is None
    assert read_stamp(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)) is None
    image = np.zeros((720, 1280, 3), dtype=np.uint8)
    draw_stamp(image, Stamp(7, 123))
    image[0:16, 16 * 40 : 16 * 41] = 255 - image[0:16, 16 * 40 : 16 * 41]  # flip one bit
    assert read_stamp(image) is None


def test_synthetic_frames_are_cheap_to_make() -> None:
    source = SyntheticVideoSource(1280, 720, 60)
    source.open()
    source.read()
    images = 0
    spent = 0.0
    while images < 20:
        started = time.process_time()
        source.read()
        spent += time.process_time() - started
        images += 1
    # About 0.3 ms here; the bound only catches a pattern that renders everything per frame.
    assert spent / images < 0.010


def test_synthetic_audio_is_a_tone_in_int16_chunks() -> None:
    source = SyntheticAudioSource(48000, 2, 20)
    fmt = source.open()
    assert (fmt.sample_rate, fmt.channels, fmt.frame_samples) == (48000, 2, 960)
    chunk = source.read()
    assert chunk.dtype == np.int16
    assert chunk.shape == (960, 2)
    assert np.array_equal(chunk[:, 0], chunk[:, 1])
    assert 0.2 * 32767 < np.abs(chunk).max() <= 0.25 * 32767 + 1


# -- files -----------------------------------------------------------------------------


def test_file_source_loops_in_order_and_is_paced(tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    write_stamped_video(clip, frames=8, fps=20, size=(320, 240))
    source = FileVideoSource(clip, 320, 240, fallback_fps=30)
    assert source.open() == VideoMode(320, 240, 20, "file")
    started = time.monotonic()
    frames = [read_stamp(source.read()) for _ in range(30)]
    elapsed = time.monotonic() - started
    source.close()
    assert [s.frame if s else None for s in frames] == [k % 8 for k in range(30)]
    assert source.loops >= 3
    # 30 frames at 20 fps take about 1.45 s; unthrottled they would take milliseconds.
    assert 1.0 < elapsed < 5.0, elapsed


def test_file_source_scales_to_the_configured_size(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"mp4v"), 25, (320, 240))
    for k in range(3):
        writer.write(np.full((240, 320, 3), 60 * k, dtype=np.uint8))
    writer.release()
    source = open_video_source(VideoConfig(source="file", path=clip, width=160, height=120))
    mode = source.open()
    assert (mode.width, mode.height, mode.fps) == (160, 120, 25)
    assert source.read().shape == (120, 160, 3)
    source.close()


def test_missing_or_broken_video_file_names_the_config_field(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"capture\.video\.path: .*missing\.mp4"):
        FileVideoSource(tmp_path / "missing.mp4", 320, 240, 30).open()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(CaptureError, match=r"capture\.video\.path: .*junk\.mp4"):
        FileVideoSource(junk, 320, 240, 30).open()


def test_unreadable_wav_names_the_config_field(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF nonsense, not a wave file at all")
    with pytest.raises(CaptureError, match=r"capture\.audio\.path: .*junk\.wav") as caught:
        WavFileSource(junk, 48000, 1, 20).open()
    assert "not a readable WAV file" in str(caught.value)
    with pytest.raises(CaptureError, match=r"capture\.audio\.path: .*absent\.wav"):
        WavFileSource(tmp_path / "absent.wav", 48000, 1, 20).open()
    eight_bit = tmp_path / "8bit.wav"
    write_wav(eight_bit, np.zeros(800, dtype=np.uint8), 48000, width=1)
    with pytest.raises(CaptureError, match=r"capture\.audio\.path: .*16-bit"):
        WavFileSource(eight_bit, 48000, 1, 20).open()
    wrong_rate = tmp_path / "44k.wav"
    write_wav(wrong_rate, np.zeros(441, dtype=np.int16), 44100)
    with pytest.raises(CaptureError, match=r"capture\.audio\.sample_rate"):
        WavFileSource(wrong_rate, 48000, 1, 20).open()


def test_wav_source_loops_every_sample_in_order(tmp_path: Path) -> None:
    ramp = np.arange(200, dtype=np.int16)  # 2.5 chunks of 10 ms at 8 kHz
    path = tmp_path / "ramp.wav"
    write_wav(path, ramp, 8000)
    source = WavFileSource(path, 8000, 2, 10)
    fmt = source.open()
    assert fmt.frame_samples == 80
    chunks = [source.read() for _ in range(5)]
    source.close()
    joined = np.concatenate(chunks)
    assert joined.shape == (400, 2)
    assert np.array_equal(joined[:, 0], np.tile(ramp, 2))
    assert np.array_equal(joined[:, 0], joined[:, 1])  # mono file, stereo config
    assert source.loops == 1


# -- devices that are not there --------------------------------------------------------


def test_missing_camera_names_the_device() -> None:
    if os.path.exists("/dev/video9"):
        pytest.skip("this machine has a /dev/video9")
    with pytest.raises(CaptureError, match=r"capture\.video\.device: /dev/video9"):
        CameraSource("/dev/video9", 1280, 720, 30).open()
    with pytest.raises(CaptureError, match=r"capture\.video\.device: /dev/video9"):
        CameraSource("9", 1280, 720, 30).open()


def test_missing_microphone_names_the_config_field() -> None:
    source = PyAudioSource("no-such-microphone-xyz", 48000, 1, 20)
    with pytest.raises(CaptureError, match=r"capture\.audio\.device: .*no-such-microphone-xyz"):
        source.open()
    source.close()


def test_factories_construct_without_opening() -> None:
    camera = open_video_source(VideoConfig(source="camera", device="/dev/video9"))
    assert camera.description == "camera /dev/video9"
    assert isinstance(open_video_source(VideoConfig()), SyntheticVideoSource)
    mic = open_audio_source(AudioConfig(source="device", device="nothing-here"))
    assert isinstance(mic, PyAudioSource)
    wav = open_audio_source(AudioConfig(source="file", path=Path("/nonexistent.wav")))
    assert wav.description == "file /nonexistent.wav"
    assert isinstance(open_audio_source(AudioConfig()), SyntheticAudioSource)


def test_list_devices_reports_without_crashing() -> None:
    inventory = list_devices()
    assert isinstance(inventory, DeviceInventory)
    if not glob.glob("/dev/video*"):
        assert inventory.cameras == ()
        assert any("/dev/video" in problem for problem in inventory.problems)
    json.dumps(inventory.to_dict())
    text = inventory.describe()
    assert "cameras:" in text
    assert "microphones:" in text
