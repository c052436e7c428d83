"""Device discovery for ``classroom-agent devices``: what a technician can put in the config.

Quick and harmless by design: cameras are asked for their capabilities and a short list
of common modes (no frames are captured); microphones come from a fresh PyAudio scan.
Nothing here raises for missing hardware; problems are reported in the inventory.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pyaudio

from agent.capture._native import quiet_audio_libraries
from agent.capture.frames import VideoMode
from agent.capture.video import fourcc_text

log = logging.getLogger(__name__)

_VIDIOC_QUERYCAP = 0x80685600  # _IOR('V', 0, struct v4l2_capability), 104 bytes
_CAP_VIDEO_CAPTURE = 0x00000001
_CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
_CAP_DEVICE_CAPS = 0x80000000

COMMON_MODES: tuple[tuple[str, int, int], ...] = (
    ("MJPG", 1920, 1080),
    ("MJPG", 1280, 720),
    ("MJPG", 640, 480),
    ("YUYV", 1280, 720),
    ("YUYV", 640, 480),
)


@dataclass(frozen=True, slots=True)
class CameraInfo:
    path: str
    name: str
    capture: bool  # False for metadata and output nodes (a UVC camera has two /dev/video*)
    modes: tuple[VideoMode, ...] = ()  # the common modes the driver accepted as asked
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "capture": self.capture,
            "modes": [str(mode) for mode in self.modes],
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class MicrophoneInfo:
    index: int  # what capture.audio.device accepts, as does any part of the name
    name: str
    max_input_channels: int
    default_sample_rate: float
    host_api: str = ""
    is_default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeviceInventory:
    cameras: tuple[CameraInfo, ...] = ()
    microphones: tuple[MicrophoneInfo, ...] = ()
    problems: tuple[str, ...] = field(default=())  # why a whole class of devices is missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "cameras": [camera.to_dict() for camera in self.cameras],
            "microphones": [mic.to_dict() for mic in self.microphones],
            "problems": list(self.problems),
        }

    def describe(self) -> str:
        """A plain listing for a technician at a terminal."""
        lines = ["cameras:"]
        if not self.cameras:
            lines.append("  (none found)")
        for cam in self.cameras:
            kind = "" if cam.capture else "  [not a capture node]"
            lines.append(f"  {cam.path}  {cam.name}{kind}")
            if cam.modes:
                lines.append("    modes: " + ", ".join(str(mode) for mode in cam.modes))
            if cam.error:
                lines.append(f"    error: {cam.error}")
        lines.append("microphones:")
        if not self.microphones:
            lines.append("  (none found)")
        for mic in self.microphones:
            default = "  (default)" if mic.is_default else ""
            lines.append(
                f"  [{mic.index}] {mic.name}  {mic.max_input_channels} ch  "
                f"{mic.default_sample_rate:g} Hz  {mic.host_api}{default}"
            )
        for problem in self.problems:
            lines.append(f"note: {problem}")
        return "\n".join(lines)


def _node_number(path: str) -> int:
    match = re.search(r"(\d+)$", path)
    return int(match.group(1)) if match else 1 << 30


def _query_capabilities(path: str) -> tuple[str, bool]:
    """(card name, can capture) straight from the driver, without starting a stream."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        buffer = bytearray(104)
        fcntl.ioctl(fd, _VIDIOC_QUERYCAP, buffer)
    finally:
        os.close(fd)
    card = bytes(buffer[16:48]).split(b"\0", 1)[0].decode(errors="replace")
    capabilities, device_caps = struct.unpack_from("<II", buffer, 84)
    caps = device_caps if capabilities & _CAP_DEVICE_CAPS else capabilities
    return card, bool(caps & (_CAP_VIDEO_CAPTURE | _CAP_VIDEO_CAPTURE_MPLANE))


def _sysfs_name(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/sys/class/video4linux/{Path(path).name}/name").read_text().strip()
    return ""


def _probe_modes(path: str) -> tuple[tuple[VideoMode, ...], str | None]:
    cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
    try:
        if not cap.isOpened():
            return (), "OpenCV cannot open it (in use by another program?)"
        accepted = []
        for fourcc, width, height in COMMON_MODES:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*fourcc))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            got = (
                fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)),
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            )
            if got == (fourcc, width, height):
                fps = round(float(cap.get(cv2.CAP_PROP_FPS)), 2)
                accepted.append(VideoMode(width, height, fps, fourcc))
        return tuple(accepted), None
    finally:
        cap.release()


def list_cameras(*, probe_modes: bool = True, pattern: str = "/dev/video*") -> list[CameraInfo]:
    cameras = []
    for path in sorted(glob.glob(pattern), key=_node_number):
        try:
            card, capture = _query_capabilities(path)
        except OSError as exc:
            cameras.append(CameraInfo(path, _sysfs_name(path), False, error=str(exc)))
            continue
        name = card or _sysfs_name(path)
        modes: tuple[VideoMode, ...] = ()
        error = None
        if capture and probe_modes:
            try:
                modes, error = _probe_modes(path)
            except Exception as exc:  # OpenCV errors must not break the listing
                error = f"{type(exc).__name__}: {exc}"
        cameras.append(CameraInfo(path, name, capture, modes, error))
    return cameras


def list_microphones() -> tuple[list[MicrophoneInfo], str | None]:
    """PyAudio input devices, or why there are none to list."""
    quiet_audio_libraries()
    try:
        pa = pyaudio.PyAudio()
    except Exception as exc:
        return [], f"PortAudio did not start: {exc}"
    try:
        default = None
        with contextlib.suppress(OSError):
            default = int(pa.get_default_input_device_info()["index"])
        mics = []
        for index in range(pa.get_device_count()):
            try:
                info = pa.get_device_info_by_index(index)
                if int(info.get("maxInputChannels", 0)) <= 0:
                    continue
                host = str(pa.get_host_api_info_by_index(int(info["hostApi"]))["name"])
            except (OSError, KeyError, ValueError) as exc:
                log.debug("skipping audio device %d: %s", index, exc)
                continue
            mics.append(
                MicrophoneInfo(
                    index=index,
                    name=str(info["name"]),
                    max_input_channels=int(info["maxInputChannels"]),
                    default_sample_rate=float(info["defaultSampleRate"]),
                    host_api=host,
                    is_default=index == default,
                )
            )
        return mics, None
    finally:
        pa.terminate()


def list_devices(*, probe_modes: bool = True) -> DeviceInventory:
    """Cameras and microphones this machine offers; empty lists, never an exception."""
    problems = []
    try:
        cameras = list_cameras(probe_modes=probe_modes)
    except Exception as exc:
        cameras = []
        problems.append(f"camera scan failed: {type(exc).__name__}: {exc}")
    if not cameras and not problems:
        problems.append("no /dev/video* devices (no camera, or no V4L2 driver loaded)")
    microphones, problem = list_microphones()
    if problem:
        problems.append(problem)
    elif not microphones:
        problems.append("PyAudio sees no input devices (no sound card, or no permission)")
    return DeviceInventory(tuple(cameras), tuple(microphones), tuple(problems))
