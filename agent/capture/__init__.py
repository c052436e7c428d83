"""Capture: cameras, microphones and their stand-ins, shared by many consumers.

One hub per device runs a reader thread and hands items to asyncio consumers: video
consumers take the latest frame (a slow one never slows a fast one), audio consumers
get every chunk. Hubs are supervisor services that watch their device (lost, degraded)
and reopen it with backoff. ``capture`` knows nothing of streaming or sensing.
"""

from agent.capture._native import quiet_audio_libraries
from agent.capture.audio import (
    AudioDeviceError,
    AudioSource,
    close_pyaudio,
    open_audio_source,
    start_pyaudio,
)
from agent.capture.devices import CameraInfo, DeviceInventory, MicrophoneInfo, list_devices
from agent.capture.errors import CaptureError
from agent.capture.frames import AudioChunk, AudioFormat, Frame, Image, VideoMode
from agent.capture.hub import (
    AudioConsumerStats,
    AudioHub,
    AudioStats,
    AudioSubscription,
    ConsumerStats,
    DeviceState,
    FrameHub,
    FrameSubscription,
    StateChange,
    VideoStats,
)
from agent.capture.processing import AudioProcessor, FarEndReference, ProcessingStats
from agent.capture.service import CaptureService
from agent.capture.stamp import Stamp, draw_stamp, read_stamp
from agent.capture.video import VideoSource, open_video_source

__all__ = [
    "AudioChunk",
    "AudioConsumerStats",
    "AudioDeviceError",
    "AudioFormat",
    "AudioHub",
    "AudioProcessor",
    "AudioSource",
    "AudioStats",
    "AudioSubscription",
    "CameraInfo",
    "CaptureError",
    "CaptureService",
    "ConsumerStats",
    "DeviceInventory",
    "DeviceState",
    "FarEndReference",
    "Frame",
    "FrameHub",
    "FrameSubscription",
    "Image",
    "MicrophoneInfo",
    "ProcessingStats",
    "Stamp",
    "StateChange",
    "VideoMode",
    "VideoSource",
    "VideoStats",
    "close_pyaudio",
    "draw_stamp",
    "list_devices",
    "open_audio_source",
    "open_video_source",
    "quiet_audio_libraries",
    "read_stamp",
    "start_pyaudio",
]
