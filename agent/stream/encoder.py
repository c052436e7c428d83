"""Encode once, send to many: one libx264 encoder feeding every peer's H.264 sender.

aiortc's normal path gives each peer its own encoder, so three receiving rooms cost
three encodes of the same picture (and sharing one ``bgr24`` frame between encoder
threads crashes, aiortc #767/#1206). Here one :class:`SharedH264Encoder` takes the
latest frame from its own FrameHub consumer, converts BGR to yuv420p once, encodes
once on a worker thread, and hands the resulting ``av.Packet`` to every
:class:`EncodedVideoTrack`. aiortc's sender sees a packet, not a frame, and only
packetises it (``H264Encoder.pack``), so the cost of a peer is RTP and SRTP, not x264.

Two things the sender normally does for us have to be done here instead:

* Keyframes. A receiver's PLI/FIR reaches aiortc as ``RTCRtpSender._send_keyframe()``,
  which only sets a flag its own encoder reads; with packets nobody reads it.
  :func:`route_keyframe_requests` is the one place that wraps that private hook so the
  request reaches the shared encoder. New tracks ask for a keyframe too, and drop
  everything until one arrives, so a room joining mid-lesson starts decodable.
* Back-pressure. Each track has a small bounded queue; a peer that falls behind
  loses its backlog and waits for the next keyframe instead of stalling the encoder
  or the other peers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import Frame, FrameHub

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
DEFAULT_TRACK_QUEUE = 30  # packets; about 2 s at 15 fps, 1 s at 30 fps
MIN_FORCED_KEYFRAME_GAP_S = 0.3  # a storm of PLIs must not turn the stream into all-I
MAX_CONSECUTIVE_FAILURES = 10


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """What the shared encoder makes; browsers decode every combination allowed here."""

    bitrate_kbps: int = 2500
    keyframe_interval_s: float = 2.0
    preset: str = "ultrafast"  # the cheapest; 2-core classroom PCs encode 720p30 with room
    codec: str = "libx264"
    threads: int = 0  # 0 = libx264 decides (sliced threads with zerolatency)


@dataclass(frozen=True, slots=True)
class TrackStats:
    name: str
    delivered: int  # packets handed to the sender
    dropped: int  # packets discarded: backlog overflow or waiting for a keyframe
    overflows: int  # times the backlog overflowed
    queued: int


@dataclass(frozen=True, slots=True)
class EncoderStats:
    frames_encoded: int  # encode() calls: one per frame, however many peers
    packets: int
    keyframes: int
    forced_keyframes: int
    keyframe_requests: int
    resets: int  # codec contexts opened (first frame, resolution change)
    encode_ms_avg: float | None
    tracks: tuple[TrackStats, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames_encoded": self.frames_encoded,
            "packets": self.packets,
            "keyframes": self.keyframes,
            "forced_keyframes": self.forced_keyframes,
            "keyframe_requests": self.keyframe_requests,
            "encode_ms_avg": None if self.encode_ms_avg is None else round(self.encode_ms_avg, 2),
            "tracks": {
                t.name: {"delivered": t.delivered, "dropped": t.dropped, "overflows": t.overflows}
                for t in self.tracks
            },
        }


def route_keyframe_requests(sender: Any, request: Callable[[], None]) -> None:
    """Make ``sender``'s PLI/FIR handling call ``request()`` as well.

    The agent's single use of aiortc's private sender API. In aiortc 1.16
    ``RTCRtpSender._handle_rtcp_packet`` answers a PLI or FIR with
    ``self._send_keyframe()``, which sets a flag that only aiortc's own encoder reads;
    a track that yields pre-encoded packets never sees it. We keep the original call
    (harmless, and right again if aiortc ever honours it for packets) and add ours.
    ``tests/test_stream_encoder.py`` feeds a real PLI through ``_handle_rtcp_packet`` so
    an aiortc upgrade that renames the hook fails a test instead of freezing pictures.
    """
    original = getattr(sender, "_send_keyframe", None)
    if not callable(original):
        raise RuntimeError(
            "aiortc's RTCRtpSender has no _send_keyframe(): keyframe requests cannot reach "
            "the shared encoder (check the aiortc version)"
        )

    def send_keyframe() -> None:
        original()
        request()

    sender._send_keyframe = send_keyframe


class EncodedVideoTrack(MediaStreamTrack):
    """One peer's view of the shared encoder: ``recv()`` returns H.264 ``av.Packet`` s.

    Starts at a keyframe; when its backlog overflows (the peer's sender is not keeping
    up) the backlog is dropped and the track waits for the next keyframe, so the peer
    sees a short freeze rather than a smeared picture, and nobody else notices.
    """

    kind = "video"

    def __init__(self, encoder: SharedH264Encoder, name: str, max_packets: int) -> None:
        super().__init__()
        self.name = name
        self._encoder = encoder
        self._queue: deque[av.Packet[Any]] = deque()
        self._max = max_packets
        self._event = asyncio.Event()
        self._need_keyframe = True
        self.delivered = 0
        self.dropped = 0
        self.overflows = 0

    def _push(self, packet: av.Packet[Any], keyframe: bool) -> None:
        if self.readyState != "live":
            return
        if self._need_keyframe and not keyframe:
            self.dropped += 1
            return
        if len(self._queue) >= self._max:
            self.dropped += len(self._queue) + (0 if keyframe else 1)
            self.overflows += 1
            self._queue.clear()
            if not keyframe:
                self._need_keyframe = True
                log.info("video track %s fell behind: waiting for the next keyframe", self.name)
                return
        self._need_keyframe = False
        self._queue.append(packet)
        self._event.set()

    async def recv(self) -> av.Packet[Any]:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._queue:
                self.delivered += 1
                return self._queue.popleft()
            self._event.clear()
            await self._event.wait()

    def stop(self) -> None:
        if self.readyState == "live":
            self._encoder._detach(self)
        super().stop()
        self._event.set()

    def stats(self) -> TrackStats:
        return TrackStats(self.name, self.delivered, self.dropped, self.overflows, len(self._queue))


class SharedH264Encoder:
    """The one H.264 encoder of a room's camera; a supervisor service.

    Idle (no consumer of the hub, no CPU) while no track is attached. The encode runs on
    a dedicated worker thread so the event loop, and with it every peer's audio, never
    waits on x264; while it works, newer frames replace older ones in the hub, so a slow
    encode lowers the frame rate instead of building latency.
    """

    name = "stream.encoder"

    def __init__(
        self,
        hub: FrameHub,
        settings: EncoderSettings | None = None,
        *,
        track_queue: int = DEFAULT_TRACK_QUEUE,
    ) -> None:
        self.hub = hub
        self.settings = settings or EncoderSettings()
        self._track_queue = track_queue
        self._tracks: list[EncodedVideoTrack] = []
        self._active = asyncio.Event()
        self._keyframe_pending = False
        self._last_forced = -1e9
        self._context: Any = None
        self._size: tuple[int, int] | None = None
        self._origin_ns: int | None = None
        self._last_pts = -1
        self._failures = 0
        self.frames_encoded = 0
        self.packets = 0
        self.keyframes = 0
        self.forced_keyframes = 0
        self.keyframe_requests = 0
        self.resets = 0
        self._encode_s = 0.0

    # -- tracks and keyframes --------------------------------------------------------------

    def track(self, name: str) -> EncodedVideoTrack:
        """A new per-peer track; it asks for a keyframe so its peer can start decoding."""
        track = EncodedVideoTrack(self, name, self._track_queue)
        self._tracks.append(track)
        self._active.set()
        self.request_keyframe()
        return track

    def _detach(self, track: EncodedVideoTrack) -> None:
        if track in self._tracks:
            self._tracks.remove(track)
        if not self._tracks:
            self._active.clear()

    @property
    def track_count(self) -> int:
        return len(self._tracks)

    def request_keyframe(self) -> None:
        """Make one of the next frames an IDR (coalesced, at most one per 0.3 s)."""
        self.keyframe_requests += 1
        self._keyframe_pending = True

    # -- the service -------------------------------------------------------------------

    async def run(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="h264-encode")
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._active.wait()
                with self.hub.subscribe(self.name) as frames:
                    while self._tracks:
                        frame = await frames.get()
                        if not self._tracks:
                            break
                        force = self._take_keyframe_request()
                        try:
                            packets = await loop.run_in_executor(
                                executor, self._encode, frame, force
                            )
                        except av.FFmpegError as exc:
                            self._encode_failed(exc)
                            continue
                        self._failures = 0
                        for packet in packets:
                            self._fan_out(packet)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _encode_failed(self, exc: Exception) -> None:
        """One bad frame must not end every room's lesson: reopen the encoder and go on;
        an encoder that keeps failing is a real fault for the supervisor."""
        self._failures += 1
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"H.264 encoder failed {self._failures} times in a row: {exc}")
        log.warning("H.264 encode failed (%s); reopening the encoder", exc)
        self._context = None
        self._keyframe_pending = True

    def _take_keyframe_request(self) -> bool:
        now = time.monotonic()
        if self._keyframe_pending and now - self._last_forced >= MIN_FORCED_KEYFRAME_GAP_S:
            self._keyframe_pending = False
            self._last_forced = now
            return True
        return False

    def _fan_out(self, packet: av.Packet[Any]) -> None:
        keyframe = bool(packet.is_keyframe)
        self.packets += 1
        if keyframe:
            self.keyframes += 1
        for track in list(self._tracks):
            track._push(packet, keyframe)

    # -- the worker thread -------------------------------------------------------------

    def _open(self, width: int, height: int) -> Any:
        cfg = self.settings
        fps = self.hub.mode.fps if self.hub.mode is not None else 30.0
        keyint = max(1, round(cfg.keyframe_interval_s * fps))
        kbps = cfg.bitrate_kbps
        ctx: Any = av.CodecContext.create(cfg.codec, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(fps).limit_denominator(1001)
        ctx.bit_rate = kbps * 1000
        ctx.gop_size = keyint
        ctx.max_b_frames = 0
        if cfg.threads:
            ctx.thread_count = cfg.threads
        # Baseline in libx264 is constrained baseline (42c0xx): every browser and
        # aiortc decode it. repeat-headers puts SPS/PPS before every IDR so a joiner
        # can start at any keyframe; forced-idr turns our I requests into IDRs.
        ctx.options = {
            "preset": cfg.preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",
            "x264-params": (
                f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0:"
                f"repeat-headers=1:vbv-maxrate={kbps}:vbv-bufsize={kbps}"
            ),
        }
        self.resets += 1
        log.info(
            "H.264 encoder %dx%d@%g, %d kbps, keyframe every %d frames, preset %s",
            width,
            height,
            fps,
            kbps,
            keyint,
            cfg.preset,
        )
        return ctx

    def _encode(self, frame: Frame, force_keyframe: bool) -> list[av.Packet[Any]]:
        started = time.perf_counter()
        image = frame.image
        if image.shape[0] % 2 or image.shape[1] % 2:  # 4:2:0 needs even sizes
            image = image[: image.shape[0] & ~1, : image.shape[1] & ~1]
        size = (int(image.shape[1]), int(image.shape[0]))
        if self._context is None or size != self._size:
            self._context = self._open(*size)
            self._size = size
            force_keyframe = True
        if self._origin_ns is None:
            self._origin_ns = frame.captured_ns
        # RTP time from capture time: the receiver's jitter buffer and lip sync see the
        # camera's real timing, including the frames this encoder skipped.
        pts = (frame.captured_ns - self._origin_ns) * VIDEO_CLOCK_HZ // 1_000_000_000
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        video = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        video.pts = pts
        video.time_base = VIDEO_TIME_BASE
        video.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        packets = list(self._context.encode(video))
        for packet in packets:
            packet.time_base = VIDEO_TIME_BASE
        self.frames_encoded += 1
        if force_keyframe:
            self.forced_keyframes += 1
        self._encode_s += time.perf_counter() - started
        return packets

    def stats(self) -> EncoderStats:
        avg = 1000 * self._encode_s / self.frames_encoded if self.frames_encoded else None
        return EncoderStats(
            frames_encoded=self.frames_encoded,
            packets=self.packets,
            keyframes=self.keyframes,
            forced_keyframes=self.forced_keyframes,
            keyframe_requests=self.keyframe_requests,
            resets=self.resets,
            encode_ms_avg=avg,
            tracks=tuple(t.stats() for t in self._tracks),
        )
