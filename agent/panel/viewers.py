"""Browsers as WebRTC viewers of this room: the panel's tiles, the kiosk, the watch page.

A page sends its offer (complete, non-trickle) to ``POST /api/view`` naming what it
wants to see, and gets the answer. Two kinds of picture exist:

* ``lesson`` at a main room is the shared encoder's own H.264 stream: a viewer costs
  packetisation only, like one more receiving room (and gets the microphone too, for
  the remote watch page);
* everything a room *received* (a receiving room's tile at the main room, the main
  room's picture on a receiving room's kiosk) is already decoded; a
  :class:`LatestFrameTrack` takes the newest decoded frame, scales it to the tile and
  lets aiortc's VP8 encoder send it.

A received picture that stops is never shown frozen: after ``stale_after_s`` the track
sends a slate saying why ("Reconnecting...", "Waiting for the lesson").
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import AudioHub
from agent.config import IceServerConfig
from agent.stream import (
    HubAudioTrack,
    SharedH264Encoder,
    finish,
    gather,
    h264_preferences,
    new_peer_connection,
    route_keyframe_requests,
)

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
MAX_VIEWERS = 12
SLATE_FPS = 2.0


class FrameBoard(Protocol):
    """The newest decoded frame per source room (``agent.stream.sinks.LatestFrames``)."""

    def latest(self, source: str) -> tuple[int, Any, float] | None: ...

    async def next_frame(
        self,
        source: str,
        after_seq: int,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Any] | None: ...


class ViewerRefused(Exception):
    """The request cannot be served (the text says why; HTTP status in ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def slate_image(width: int, height: int, text: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A dark picture with one centred line of text (what a room shows instead of a
    frozen frame)."""
    image = np.full((height, width, 3), (48, 36, 24), dtype=np.uint8)
    scale = max(0.4, width / 900)
    thickness = max(1, round(scale * 2))
    (text_w, text_h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    origin = (max(4, (width - text_w) // 2), (height + text_h) // 2)
    cv2.putText(
        image,
        text,
        origin,
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (235, 235, 235),
        thickness,
        cv2.LINE_AA,
    )
    return image


def fit(width: int, height: int, max_width: int) -> tuple[int, int]:
    """``(width, height)`` scaled down to ``max_width`` keeping the aspect, even sizes."""
    if width <= max_width:
        return width & ~1, height & ~1
    return max_width & ~1, max(2, round(height * max_width / width)) & ~1


class LatestFrameTrack(MediaStreamTrack):
    """The newest decoded frame of ``source()`` at most ``fps`` times a second, scaled to
    ``max_width``; a slate reading ``label()`` when the source is missing or stale."""

    kind = "video"

    def __init__(
        self,
        board: FrameBoard,
        source: Callable[[], str | None],
        label: Callable[[], str],
        *,
        max_width: int = 320,
        fps: float = 15.0,
        stale_after_s: float = 1.0,
    ) -> None:
        super().__init__()
        self._board = board
        self._source = source
        self._label = label
        self._max_width = max_width
        self._interval = 1.0 / fps
        self._stale_after = stale_after_s
        self._seq = -1
        self._started = time.monotonic()
        self._next_at = self._started
        self._last_pts = -1
        self._size: tuple[int, int] | None = None
        self._slate: tuple[str, tuple[int, int], av.VideoFrame] | None = None
        self.frames = 0
        self.slates = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        delay = self._next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        source = self._source()
        got = None
        if source is not None:
            got = await self._board.next_frame(source, self._seq, timeout=self._wait_s(source))
        if self.readyState != "live":
            raise MediaStreamError
        if got is not None:
            self._seq, decoded = got
            frame = self._scaled(decoded)
            self.frames += 1
            self._next_at = time.monotonic() + self._interval
        else:
            frame = self._slate_frame(self._label())
            self.slates += 1
            self._next_at = time.monotonic() + 1.0 / SLATE_FPS
        pts = int((time.monotonic() - self._started) * VIDEO_CLOCK_HZ)
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = TIME_BASE
        return frame

    def _wait_s(self, source: str) -> float:
        latest = self._board.latest(source)
        if latest is None or time.monotonic() - latest[2] > self._stale_after:
            return 1.0 / SLATE_FPS  # stale: keep the slate moving while we wait
        return self._stale_after

    def _scaled(self, decoded: Any) -> av.VideoFrame:
        size = fit(int(decoded.width), int(decoded.height), self._max_width)
        self._size = size
        frame: av.VideoFrame = decoded.reformat(width=size[0], height=size[1], format="yuv420p")
        if frame is decoded:
            # PyAV hands back the same object when nothing changes; the board's frame is
            # shared (other viewers, the recorder) and we are about to stamp its pts.
            frame = av.VideoFrame.from_ndarray(decoded.to_ndarray(), format="yuv420p")
        return frame

    def _slate_frame(self, text: str) -> av.VideoFrame:
        size = self._size or fit(640, 360, self._max_width)
        cached = self._slate
        if cached is None or cached[0] != text or cached[1] != size:
            image = slate_image(size[0], size[1], text)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
            cached = self._slate = (text, size, frame)
        # The same frame each time (PyAV's reformat to its own format would return it
        # anyway): only this track's sender reads it, one frame at a time, so
        # restamping its pts in recv() is safe.
        return cached[2]


@dataclass(frozen=True, slots=True)
class Picture:
    """What a viewer asked for, resolved by the panel: the shared encoder's stream, or
    received frames from ``source()``."""

    encoder: SharedH264Encoder | None = None
    audio: AudioHub | None = None
    board: FrameBoard | None = None
    source: Callable[[], str | None] = lambda: None
    label: Callable[[], str] = lambda: ""
    max_width: int = 320
    fps: float = 15.0


def _media_kinds(sdp: str) -> list[str]:
    """The kinds of the offer's m-lines, in order (``m=video 9 UDP/TLS/...``)."""
    return [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]


def _codecs(kind: str, mime: str) -> list[Any]:
    return [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.lower() == mime]


class Viewers:
    """The browser peer connections of one room; each is closed when its browser goes
    away (ICE consent fails within about 30 s of a closed tab) or by :meth:`close_all`."""

    def __init__(self, ice_servers: tuple[IceServerConfig, ...] = ()) -> None:
        self.ice_servers = ice_servers
        self._peers: dict[RTCPeerConnection, list[MediaStreamTrack]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.served = 0

    @property
    def count(self) -> int:
        return len(self._peers)

    async def answer(
        self, offer_sdp: str, picture: Picture, host_addresses: tuple[str, ...]
    ) -> str:
        """Apply a browser's offer and return the complete answer SDP."""
        if len(self._peers) >= MAX_VIEWERS:
            raise ViewerRefused(f"{MAX_VIEWERS} viewers already watch this room", status=503)
        pc = new_peer_connection(self.ice_servers)
        tracks: list[MediaStreamTrack] = []
        self._peers[pc] = tracks

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._close_soon(pc)

        try:
            # Our transceivers exist before the offer is applied: aiortc picks the codecs
            # while applying it, from the preferences of the transceiver it matches.
            self._attach(pc, picture, tracks, _media_kinds(offer_sdp))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await gather(pc, await pc.createAnswer(), host_addresses)
        except Exception as exc:
            await self._close(pc)
            if isinstance(exc, ViewerRefused):
                raise
            raise ViewerRefused(f"cannot use this offer: {exc or type(exc).__name__}") from exc
        self.served += 1
        return str(pc.localDescription.sdp)

    def _attach(
        self,
        pc: RTCPeerConnection,
        picture: Picture,
        tracks: list[MediaStreamTrack],
        kinds: list[str],
    ) -> None:
        if "video" not in kinds:
            raise ViewerRefused("the offer has no video to receive")
        name = f"viewer-{self.served}"
        video: MediaStreamTrack
        if picture.encoder is not None:
            video = picture.encoder.track(name)
            codecs = h264_preferences()
        elif picture.board is not None:
            video = LatestFrameTrack(
                picture.board,
                picture.source,
                picture.label,
                max_width=picture.max_width,
                fps=picture.fps,
            )
            codecs = _codecs("video", "video/vp8")
        else:
            raise ViewerRefused("nothing to show")
        tracks.append(video)
        transceiver = pc.addTransceiver(video, direction="sendonly")
        transceiver.setCodecPreferences(codecs)
        if picture.encoder is not None:
            route_keyframe_requests(transceiver.sender, picture.encoder.request_keyframe)
        if picture.audio is not None and "audio" in kinds:
            audio = HubAudioTrack(picture.audio, name)
            tracks.append(audio)
            pc.addTransceiver(audio, direction="sendonly")

    def _close_soon(self, pc: RTCPeerConnection) -> None:
        if pc not in self._peers:
            return
        task = asyncio.create_task(self._close(pc), name="panel-viewer-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, pc: RTCPeerConnection) -> None:
        tracks = self._peers.pop(pc, None)
        if tracks is None:
            return
        for track in tracks:
            track.stop()

        async def close() -> None:
            try:
                await pc.close()
            except Exception:
                log.debug("closing a viewer connection failed", exc_info=True)

        await finish(close())

    async def close_all(self) -> None:
        """Close every viewer and wait for the closing to finish."""
        for pc in list(self._peers):
            await self._close(pc)
        pending = list(self._closing)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
