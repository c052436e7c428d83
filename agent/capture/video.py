"""Video sources: a V4L2 camera, a looping file, a stamped synthetic pattern.

Every method except :meth:`VideoSource.interrupt` is called from the hub's reader
thread only, so sources need no locking and OpenCV objects stay on one thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.capture.errors import CaptureError
from agent.capture.frames import Image, VideoMode
from agent.capture.pacing import Pacer
from agent.capture.stamp import Stamp, draw_stamp, stamp_height
from agent.config import VideoConfig

log = logging.getLogger(__name__)


class VideoSource(ABC):
    """One camera-like thing. Subclass it for new sources, and for fake devices in tests."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Short human label for logs and health (``camera /dev/video0``)."""

    @abstractmethod
    def open(self) -> VideoMode:
        """Acquire the device; return the mode it really delivers. Raises CaptureError."""

    @abstractmethod
    def read(self) -> Image:
        """Block until the next image (a new array each call). Raises on any failure."""

    @abstractmethod
    def close(self) -> None:
        """Release the device; safe to call when not open."""

    def interrupt(self) -> None:  # noqa: B027  (optional: only waiting sources need it)
        """Wake a read() that is waiting, so the hub can stop promptly (any thread)."""


def fourcc_text(code: float) -> str:
    """Decode OpenCV's FOURCC property (a float holding four packed characters)."""
    value = int(code)
    text = "".join(chr((value >> (8 * i)) & 0xFF) for i in range(4))
    return text if text.isprintable() and text.strip() else "?"


def camera_target(device: str) -> tuple[int | str, str]:
    """OpenCV argument and device path for ``capture.video.device`` (``/dev/video0`` or ``0``)."""
    text = device.strip()
    if text.isdigit():
        return int(text), f"/dev/video{int(text)}"
    return text, text


class CameraSource(VideoSource):
    """A V4L2 camera through OpenCV, with format negotiation.

    Drivers silently substitute the nearest mode they support, so after asking for
    FOURCC, size and rate the source reads back what it got and reports that; a camera
    that falls back to 5 fps YUYV at 1080p is a common classroom surprise.
    """

    def __init__(
        self,
        device: str,
        width: int,
        height: int,
        fps: float,
        fourcc: str = "MJPG",
        *,
        read_timeout_s: float = 2.0,
    ) -> None:
        self._target, self._path = camera_target(device)
        self._asked = VideoMode(width, height, fps, fourcc)
        self._read_timeout_ms = int(read_timeout_s * 1000)
        self._cap: Any = None
        self._mode: VideoMode | None = None

    @property
    def description(self) -> str:
        return f"camera {self._path}"

    def open(self) -> VideoMode:
        if not os.path.exists(self._path):
            raise CaptureError(f"capture.video.device: {self._path} does not exist")
        cap = cv2.VideoCapture(self._target, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise CaptureError(f"capture.video.device: cannot open {self._path} with V4L2")
        asked = self._asked
        if asked.fourcc != "any":
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*asked.fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, asked.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, asked.height)
        cap.set(cv2.CAP_PROP_FPS, asked.fps)
        # Without a read timeout a camera that stops streaming blocks read() for OpenCV's
        # default 10 s, longer than the hub's stall detection promises.
        if hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC"):
            cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._read_timeout_ms)
        got = VideoMode(
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            round(float(cap.get(cv2.CAP_PROP_FPS)), 2),
            fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)),
        )
        if (got.width, got.height, got.fps) != (asked.width, asked.height, asked.fps) or (
            asked.fourcc not in ("any", got.fourcc)
        ):
            log.warning(
                "camera %s negotiated %s instead of %s",
                self._path,
                got,
                asked,
                extra={"fields": {"device": self._path, "asked": str(asked), "got": str(got)}},
            )
        else:
            log.info("camera %s negotiated %s", self._path, got)
        self._cap = cap
        self._mode = got
        return got

    def read(self) -> Image:
        if self._cap is None:
            raise CaptureError(f"{self.description} is not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            raise CaptureError(f"{self.description}: no frame (unplugged or stopped streaming)")
        if self._mode is not None and image.shape[:2] != (self._mode.height, self._mode.width):
            # Some drivers report one size and deliver another; trust the pixels.
            self._mode = VideoMode(
                image.shape[1], image.shape[0], self._mode.fps, self._mode.fourcc
            )
            log.warning("camera %s delivers %s", self._path, self._mode)
        result: Image = image
        return result

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FileVideoSource(VideoSource):
    """A video file played in a loop at its own frame rate, scaled to the configured size.

    Paced here because nothing downstream should have to: OpenCV decodes as fast as it
    can, and an unthrottled loop would flood every consumer and burn a core.
    """

    def __init__(self, path: Path, width: int, height: int, fallback_fps: float) -> None:
        self._path = path
        self._size = (width, height)
        self._fallback_fps = fallback_fps
        self._cap: Any = None
        self._pacer = Pacer(fallback_fps)
        self._interrupt = threading.Event()
        self._pending: Image | None = None
        self.loops = 0

    @property
    def description(self) -> str:
        return f"file {self._path}"

    def _capture(self) -> Any:
        cap = cv2.VideoCapture(str(self._path))
        if not cap.isOpened():
            cap.release()
            raise CaptureError(f"capture.video.path: cannot decode {self._path}")
        return cap

    def open(self) -> VideoMode:
        if not self._path.is_file():
            raise CaptureError(f"capture.video.path: {self._path} is not a file")
        cap = self._capture()
        ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            raise CaptureError(f"capture.video.path: {self._path} has no decodable frames")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        if not 1.0 <= fps <= 240.0:
            fps = self._fallback_fps
        native = f"{first.shape[1]}x{first.shape[0]}"
        self._cap = cap
        self._pending = self._fit(first)
        self._pacer = Pacer(fps)
        self._interrupt.clear()
        mode = VideoMode(self._size[0], self._size[1], round(fps, 2), "file")
        log.info("playing %s (%s, scaled to %s) in a loop", self._path, native, mode)
        return mode

    def _fit(self, image: Image) -> Image:
        if (image.shape[1], image.shape[0]) == self._size:
            return image
        return np.asarray(cv2.resize(image, self._size, interpolation=cv2.INTER_AREA), np.uint8)

    def read(self) -> Image:
        if self._cap is None:
            raise CaptureError(f"{self.description} is not open")
        image = self._pending
        self._pending = None
        if image is None:
            ok, raw = self._cap.read()
            if not ok or raw is None:
                # Reopening is more reliable than seeking to frame 0 across containers.
                self._cap.release()
                self._cap = self._capture()
                self.loops += 1
                ok, raw = self._cap.read()
                if not ok or raw is None:
                    raise CaptureError(f"capture.video.path: {self._path} stopped decoding")
            image = self._fit(raw)
        self._pacer.wait(self._interrupt)
        return image

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._pending = None

    def interrupt(self) -> None:
        self._interrupt.set()


_BARS = [
    (192, 192, 192),
    (0, 192, 192),
    (192, 192, 0),
    (0, 192, 0),
    (192, 0, 192),
    (0, 0, 192),
    (192, 0, 0),
]  # BGR colour bars


class SyntheticVideoSource(VideoSource):
    """A test pattern that carries its frame number and capture time (see ``stamp``).

    The background is rendered once per open; each frame copies it and draws only what
    moves (the stamp, a sliding box, one line of text), so 720p30 costs a few percent of
    one core. The moving box also keeps frozen-frame detection honest.
    """

    def __init__(self, width: int, height: int, fps: float) -> None:
        self._width = width
        self._height = height
        self._fps = fps
        self._pacer = Pacer(fps)
        self._interrupt = threading.Event()
        self._background: Image | None = None
        self._count = 0

    @property
    def description(self) -> str:
        return f"synthetic {self._width}x{self._height}@{self._fps:g}"

    def open(self) -> VideoMode:
        self._background = self._render_background()
        self._pacer.reset()
        self._interrupt.clear()
        return VideoMode(self._width, self._height, self._fps, "synthetic")

    def _render_background(self) -> Image:
        w, h = self._width, self._height
        image = np.zeros((h, w, 3), dtype=np.uint8)
        top = stamp_height(w)
        bars_bottom = top + (h - top) * 2 // 3
        edges = np.linspace(0, w, len(_BARS) + 1).astype(int)
        for colour, left, right in zip(_BARS, edges[:-1], edges[1:], strict=True):
            image[top:bars_bottom, left:right] = colour
        ramp = np.linspace(0, 255, w).astype(np.uint8)
        image[bars_bottom:, :] = ramp[None, :, None]
        scale = max(0.4, h / 720)
        cv2.putText(
            image,
            "classroom-agent synthetic source",
            (w // 20, bars_bottom - int(20 * scale)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
        return image

    def read(self) -> Image:
        if self._background is None:
            raise CaptureError(f"{self.description} is not open")
        self._pacer.wait(self._interrupt)
        image = self._background.copy()
        w, h = self._width, self._height
        top = stamp_height(w)
        # A box that slides across the bars once every four seconds.
        side = max(8, (h - top) // 6)
        travel = max(1, w - side)
        x = int((self._count * travel / (4 * self._fps)) % travel)
        y = top + (h - top) // 3 - side // 2
        image[y : y + side, x : x + side] = 255
        now_ns = time.time_ns()
        draw_stamp(image, Stamp(self._count & 0xFFFFFFFF, now_ns))
        scale = max(0.4, h / 720)
        clock = time.strftime("%H:%M:%S", time.localtime(now_ns / 1e9))
        label = f"frame {self._count:08d}  {clock}.{(now_ns // 1_000_000) % 1000:03d}"
        band = int(44 * scale)
        image[top : top + band, :] = 0
        cv2.putText(
            image,
            label,
            (int(8 * scale), top + int(32 * scale)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            max(1, int(2 * scale)),
        )
        self._count += 1
        return image

    def close(self) -> None:
        self._background = None

    def interrupt(self) -> None:
        self._interrupt.set()


def open_video_source(cfg: VideoConfig, *, read_timeout_s: float = 2.0) -> VideoSource:
    """Build the source ``cfg`` describes; nothing is opened until the hub's thread starts."""
    if cfg.source == "camera":
        return CameraSource(
            cfg.device, cfg.width, cfg.height, cfg.fps, cfg.fourcc, read_timeout_s=read_timeout_s
        )
    if cfg.source == "file":
        if cfg.path is None:  # the config model already refuses this
            raise CaptureError("capture.video.path: required when capture.video.source is 'file'")
        return FileVideoSource(cfg.path, cfg.width, cfg.height, cfg.fps)
    return SyntheticVideoSource(cfg.width, cfg.height, cfg.fps)
