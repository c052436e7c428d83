"""Encode once, send to many: one libx264 encoder feeding every peer's H.264 sender.

aiortc's normal path gives each peer its own encoder, so three receiving rooms cost
three encodes of the same picture (and sharing one ``bgr24`` frame between encoder
threads crashes, aiortc #767/#1206). Here one :class:`SharedH264Encoder` takes the
latest frame from its own FrameHub consumer, converts BGR to yuv420p once, encodes
once on a worker thread, and hands the resulting ``av.Packet`` to every
:class:`EncodedVideoTrack`. aiortc's sender sees a packet, not a frame, and only
packetises it (``H264Encoder.pack``), so the cost of a peer is RTP and SRTP, not x264.

Two layers. Rooms on a poor link get a second, *low* layer: the same frame scaled once
(from the yuv420p picture) to ``low_height`` and encoded by a second libx264 context at
``low_bitrate_kbps``. It is encoded only while some track is on it, so a lesson where
every link is good costs one encode per frame. Each track is on one layer and switches
at the next keyframe of the other (one is requested), so its receiver sees one
continuous H.264 stream (same SSRC, same timestamps; the resolution changes at an IDR
that carries its SPS, which browsers and aiortc's decoder follow). A track can also be
*paused*: it sends nothing, so a link too poor even for the low layer keeps its Opus
audio (see ``agent/stream/layers.py`` for who decides).

Keyframes come from this module, not from x264's own ``keyint``: one schedule
(``keyframe_interval_s``, by capture time) forces an IDR on every layer being encoded at
the same frame, so both layers' GOPs line up and a switch often finds a keyframe due.
Requests (a joiner, a PLI, a switch) go to one layer only.

Two things the sender normally does for us have to be done here instead:

* Keyframes. A receiver's PLI/FIR reaches aiortc as ``RTCRtpSender._send_keyframe()``,
  which only sets a flag its own encoder reads; with packets nobody reads it.
  :func:`agent.stream.hooks.route_keyframe_requests` wraps that private hook so the
  request reaches the shared encoder. New tracks ask for a keyframe too, and drop
  everything until one arrives, so a room joining mid-lesson starts decodable.
* Back-pressure. Each track has a small bounded queue; a peer that falls behind
  loses its backlog and waits for the next keyframe instead of stalling the encoder
  or the other peers.

Camera mute (:class:`~agent.stream.controls.MediaControls`): while muted the encoder
never encodes a camera frame; it encodes a dark "Camera off" slate at ``slate_fps``
instead, and a camera frame whose encode was under way when the mute came is thrown
away, so no camera pixel leaves the room after the button is pressed. Both edges
force a keyframe on every layer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fractions
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import Frame, FrameHub

if TYPE_CHECKING:
    from agent.capture import FrameSubscription, Image
    from agent.config import StreamConfig
    from agent.stream.controls import MediaControls

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
DEFAULT_TRACK_QUEUE = 30  # packets; about 2 s at 15 fps, 1 s at 30 fps
MIN_FORCED_KEYFRAME_GAP_S = 0.3  # a storm of PLIs must not turn the stream into all-I
MAX_CONSECUTIVE_FAILURES = 10
RATE_WINDOW_S = 3.0  # a layer's measured bitrate: bytes over this window
CAMERA_WAIT_S = 1.0  # a dead camera must not keep the encoder from noticing a mute
SLATE_TEXT = "Camera off"

VideoLayer = Literal["high", "low", "floor"]
"""The two encodings of the room's camera: full size, and the low layer for poor links."""
LayerState = Literal["high", "low", "floor", "paused"]
"""What one track sends: a layer, or nothing (``paused``: the link cannot take video)."""
LAYERS: tuple[VideoLayer, ...] = ("high", "low", "floor")


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """What the shared encoder makes; browsers decode every combination allowed here."""

    bitrate_kbps: int = 2500
    keyframe_interval_s: float = 2.0
    preset: str = "ultrafast"  # the cheapest; 2-core classroom PCs encode 720p30 with room
    codec: str = "libx264"
    threads: int = 0  # 0 = libx264 decides (sliced threads with zerolatency)
    low_bitrate_kbps: int = 500
    low_height: int = 360  # never above the camera's height; width keeps the aspect
    slate_fps: float = 2.0  # "Camera off" slate rate while the camera is muted
    # The largest burst (a keyframe) each layer may send, in seconds of its bitrate (the
    # x264 VBV buffer). A rural line queues ~200 ms before it drops: a low-layer keyframe
    # bigger than that loses its tail, is asked for again, and the room's link fills with
    # keyframes (stream.link.low_layer_burst_ms).
    vbv_buffer_s: float = 1.0
    low_vbv_buffer_s: float = 1.0  # the low and floor layers'
    # The floor: a third, smallest layer for lines that cannot carry the low one, before
    # a room's video pauses (stream.link.floor_layer). Off: two layers, as before.
    floor_enabled: bool = False
    floor_bitrate_kbps: int = 200
    floor_height: int = 180

    @classmethod
    def from_config(cls, config: StreamConfig) -> EncoderSettings:
        """The settings ``stream:`` in the agent's config asks for."""
        return cls(
            bitrate_kbps=config.video_bitrate_kbps,
            keyframe_interval_s=config.keyframe_interval_s,
            preset=config.x264_preset,
            low_bitrate_kbps=config.low_bitrate_kbps,
            low_height=config.low_layer_height,
            low_vbv_buffer_s=config.link.low_layer_burst_ms / 1000,
            floor_enabled=config.link.floor_layer,
            floor_bitrate_kbps=config.link.floor_bitrate_kbps,
            floor_height=config.link.floor_height,
        )

    def layer_kbps(self, layer: VideoLayer) -> int:
        if layer == "high":
            return self.bitrate_kbps
        return self.low_bitrate_kbps if layer == "low" else self.floor_bitrate_kbps

    def layer_height(self, layer: VideoLayer) -> int | None:
        """The height ``layer`` is scaled to (None: the camera's own)."""
        if layer == "high":
            return None
        return self.low_height if layer == "low" else self.floor_height


def low_layer_size(width: int, height: int, low_height: int) -> tuple[int, int]:
    """The low layer's size for a ``width`` x ``height`` picture: ``low_height`` high (at
    most the picture's), the same aspect, both even (4:2:0)."""
    target = max(2, min(low_height, height) & ~1)
    return max(2, round(width * target / height / 2) * 2), target


@dataclass(frozen=True, slots=True)
class TrackStats:
    name: str
    delivered: int  # packets handed to the sender
    dropped: int  # packets discarded: backlog overflow or waiting for a keyframe
    overflows: int  # times the backlog overflowed
    queued: int
    layer: LayerState = "high"
    switches: int = 0  # layer changes that took effect (at a keyframe), pauses included
    keyframe_requests: int = 0  # its peer's PLI/FIR
    keyframe_requests_deferred: int = 0  # ... that had to wait for keyframe_gap_s


@dataclass(frozen=True, slots=True)
class LayerStats:
    name: VideoLayer
    active: bool  # encoded for the latest frame
    width: int | None
    height: int | None
    frames: int
    packets: int
    keyframes: int
    forced_keyframes: int
    bitrate_kbps: float | None  # measured over the last few seconds
    encode_ms_avg: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "size": None if self.width is None else f"{self.width}x{self.height}",
            "frames": self.frames,
            "packets": self.packets,
            "keyframes": self.keyframes,
            "forced_keyframes": self.forced_keyframes,
            "bitrate_kbps": None if self.bitrate_kbps is None else round(self.bitrate_kbps, 1),
            "encode_ms_avg": None if self.encode_ms_avg is None else round(self.encode_ms_avg, 2),
        }


@dataclass(frozen=True, slots=True)
class EncoderStats:
    frames_encoded: int  # frames that went through x264 (once per frame, however many peers)
    packets: int  # all layers
    keyframes: int
    forced_keyframes: int  # on request (joiners, PLI, switches, mute), not the schedule
    keyframe_requests: int
    resets: int  # codec contexts opened (first frame, resolution change, failure)
    encode_ms_avg: float | None  # per frame, every layer together
    tracks: tuple[TrackStats, ...]
    layers: tuple[LayerStats, ...] = ()
    slate_frames: int = 0  # "Camera off" frames encoded while muted
    camera_muted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames_encoded": self.frames_encoded,
            "packets": self.packets,
            "keyframes": self.keyframes,
            "forced_keyframes": self.forced_keyframes,
            "keyframe_requests": self.keyframe_requests,
            "encode_ms_avg": None if self.encode_ms_avg is None else round(self.encode_ms_avg, 2),
            "slate_frames": self.slate_frames,
            "camera_muted": self.camera_muted,
            "layers": {layer.name: layer.to_dict() for layer in self.layers},
            "tracks": {
                t.name: {
                    "delivered": t.delivered,
                    "dropped": t.dropped,
                    "overflows": t.overflows,
                    "layer": t.layer,
                    "switches": t.switches,
                    "keyframe_requests": t.keyframe_requests,
                    "keyframe_requests_deferred": t.keyframe_requests_deferred,
                }
                for t in self.tracks
            },
        }


Encoded = Mapping[VideoLayer, list["av.Packet[Any]"]]
"""One frame's packets, per layer encoded for it."""


class EncodedVideoTrack(MediaStreamTrack):
    """One peer's view of the shared encoder: ``recv()`` returns H.264 ``av.Packet`` s.

    Starts at a keyframe; when its backlog overflows (the peer's sender is not keeping
    up) the backlog is dropped and the track waits for the next keyframe, so the peer
    sees a short freeze rather than a smeared picture, and nobody else notices.

    :meth:`switch` moves it to the other layer at that layer's next keyframe (the old
    layer keeps flowing until then, so the picture never breaks); :meth:`pause` stops
    its video altogether and :meth:`resume` restarts it at a keyframe.
    """

    kind = "video"

    def __init__(
        self,
        encoder: SharedH264Encoder,
        name: str,
        max_packets: int,
        layer: VideoLayer = "high",
    ) -> None:
        super().__init__()
        self.name = name
        self._encoder = encoder
        self._queue: deque[av.Packet[Any]] = deque()
        self._max = max_packets
        self._event = asyncio.Event()
        self._need_keyframe = True
        self._layer: VideoLayer = layer
        self._target: VideoLayer = layer
        self._paused = False
        self.delivered = 0
        self.dropped = 0
        self.overflows = 0
        self.switches = 0
        # Its peer's keyframe requests, at most one per keyframe_gap_s (0: no limit); one
        # that comes sooner waits for the gap instead of being lost.
        self.keyframe_gap_s = 0.0
        self.keyframe_requests = 0
        self.keyframe_requests_deferred = 0
        self.clock = time.monotonic  # tests replace it
        self._last_request = -1e9
        self._deferred = False

    # -- layers ----------------------------------------------------------------------------

    @property
    def layer(self) -> VideoLayer:
        """The layer whose packets this track delivers now."""
        return self._layer

    @property
    def target(self) -> VideoLayer:
        """The layer it is on or switching to."""
        return self._target

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def state(self) -> LayerState:
        return "paused" if self._paused else self._layer

    def switch(self, layer: VideoLayer) -> None:
        """Move to ``layer`` at its next keyframe (requested now); while paused, only
        choose the layer :meth:`resume` starts on."""
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if layer == self._target:
            return
        self._target = layer
        if self._paused:
            return
        if self._need_keyframe:  # waiting for a keyframe anyway: wait for the new layer's
            self._layer = layer
        if layer != self._layer:
            log.info("video track %s: switching %s -> %s", self.name, self._layer, layer)
        self._encoder._request(layer)

    def pause(self) -> None:
        """Send no video until :meth:`resume` (the backlog is dropped: it would be late)."""
        if self._paused or self.readyState != "live":
            return
        log.info("video track %s: paused (from the %s layer)", self.name, self._layer)
        self._paused = True
        self.switches += 1
        self.dropped += len(self._queue)
        self._queue.clear()
        self._need_keyframe = True

    def resume(self, layer: VideoLayer | None = None) -> None:
        """Send video again, starting at a keyframe of ``layer`` (default: the target)."""
        if not self._paused:
            if layer is not None:
                self.switch(layer)
            return
        if layer is not None:
            self._target = layer
        self._paused = False
        self._layer = self._target
        self._need_keyframe = True
        self.switches += 1
        log.info("video track %s: resumed on the %s layer", self.name, self._layer)
        self._encoder._request(self._layer)

    def set_state(self, state: LayerState) -> None:
        """:meth:`pause`, :meth:`resume` or :meth:`switch`, whichever reaches ``state``."""
        if state == "paused":
            self.pause()
        elif self._paused:
            self.resume(state)
        else:
            self.switch(state)

    def request_keyframe(self) -> None:
        """A keyframe of the layer this track is on (or going to): its peer's PLI/FIR.

        Every room on a layer gets the keyframe one room asks for (encode once), so a
        lossy room's requests are limited to one per :attr:`keyframe_gap_s`; a request
        inside the gap is kept and sent when the gap ends."""
        if self._paused:
            return
        self.keyframe_requests += 1
        now = self.clock()
        if now - self._last_request < self.keyframe_gap_s:
            if not self._deferred:
                self.keyframe_requests_deferred += 1
            self._deferred = True
            return
        self._send_request(now)

    def _send_request(self, now: float) -> None:
        self._last_request = now
        self._deferred = False
        self._encoder._request(self._target)

    def wants(self) -> tuple[VideoLayer, ...]:
        """The layers the encoder must make for this track (none while paused)."""
        if self._paused or self.readyState != "live":
            return ()
        if self._target == self._layer:
            return (self._layer,)
        return (self._layer, self._target)

    # -- packets ---------------------------------------------------------------------------

    def _offer(self, encoded: Encoded) -> None:
        """One frame's packets from every layer: take the ones of this track's layer, or
        the target layer's once it starts with a keyframe (never both for one frame:
        two pictures with one RTP timestamp would merge in the receiver)."""
        if self.readyState != "live" or self._paused:
            return
        if self._deferred:
            now = self.clock()
            if now - self._last_request >= self.keyframe_gap_s:
                self._send_request(now)
        if self._target != self._layer:
            target = encoded.get(self._target)
            if target and target[0].is_keyframe:
                log.info(
                    "video track %s: now on the %s layer (was %s)",
                    self.name,
                    self._target,
                    self._layer,
                )
                self._layer = self._target
                self.switches += 1
        for packet in encoded.get(self._layer, ()):
            self._push(packet, bool(packet.is_keyframe))

    def _push(self, packet: av.Packet[Any], keyframe: bool) -> None:
        if self._need_keyframe and not keyframe:
            self.dropped += 1
            return
        if len(self._queue) >= self._max:
            self.dropped += len(self._queue) + (0 if keyframe else 1)
            self.overflows += 1
            self._queue.clear()
            if not keyframe:
                self._need_keyframe = True
                self._layer = self._target
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
        return TrackStats(
            self.name,
            self.delivered,
            self.dropped,
            self.overflows,
            len(self._queue),
            self.state,
            self.switches,
            self.keyframe_requests,
            self.keyframe_requests_deferred,
        )


@dataclass(eq=False)
class _Codec:
    """One layer's libx264 context and counters (context, size: worker thread only)."""

    name: VideoLayer
    kbps: int
    context: Any = None
    size: tuple[int, int] | None = None
    active: bool = False  # encoded for the previous frame (else its next frame is an IDR)
    keyframe_pending: bool = False
    last_forced: float = -1e9
    frames: int = 0
    packets: int = 0
    keyframes: int = 0
    forced: int = 0
    encode_s: float = 0.0
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, bytes)

    def kbps_measured(self, now: float) -> float | None:
        while self.window and self.window[0][0] < now - RATE_WINDOW_S:
            self.window.popleft()
        if not self.active or len(self.window) < 2:
            return None
        span = max(now - self.window[0][0], 1e-3)
        return sum(size for _, size in self.window) * 8 / 1000 / span


class SharedH264Encoder:
    """The one H.264 encoder of a room's camera; a supervisor service.

    Idle (no consumer of the hub, no CPU) while no track is attached, and each layer is
    encoded only while some unpaused track is on it. The encodes run on one dedicated
    worker thread so the event loop, and with it every peer's audio, never waits on x264;
    while it works, newer frames replace older ones in the hub, so a slow encode lowers
    the frame rate instead of building latency.
    """

    name = "stream.encoder"

    def __init__(
        self,
        hub: FrameHub,
        settings: EncoderSettings | None = None,
        *,
        track_queue: int = DEFAULT_TRACK_QUEUE,
        controls: MediaControls | None = None,
    ) -> None:
        self.hub = hub
        self.settings = settings or EncoderSettings()
        self.controls = controls
        self._track_queue = track_queue
        self._tracks: list[EncodedVideoTrack] = []
        self._active = asyncio.Event()
        self._codecs: dict[VideoLayer, _Codec] = {
            layer: _Codec(layer, self.settings.layer_kbps(layer)) for layer in LAYERS
        }
        self._origin_ns: int | None = None
        self._last_pts = -1
        self._next_scheduled_ns: int | None = None
        self._failures = 0
        self._was_muted = False
        self._next_slate = 0.0
        self._slate_waits = 0
        self._slates: dict[tuple[int, int], Image] = {}
        self.frames_encoded = 0
        self.slate_frames = 0
        self.keyframe_requests = 0
        self.resets = 0
        self._encode_s = 0.0

    # -- tracks and keyframes --------------------------------------------------------------

    def track(self, name: str, layer: VideoLayer = "high") -> EncodedVideoTrack:
        """A new per-peer track on ``layer``; it asks for a keyframe so its peer can start
        decoding."""
        track = EncodedVideoTrack(self, name, self._track_queue, layer)
        self._tracks.append(track)
        self._active.set()
        self.request_keyframe(layer)
        return track

    def _detach(self, track: EncodedVideoTrack) -> None:
        if track in self._tracks:
            self._tracks.remove(track)
        if not self._tracks:
            self._active.clear()

    @property
    def track_count(self) -> int:
        return len(self._tracks)

    def wanted_layers(self) -> frozenset[VideoLayer]:
        """The layers some unpaused track is on or switching to: what the next frame costs."""
        return frozenset(layer for track in self._tracks for layer in track.wants())

    def request_keyframe(self, layer: VideoLayer | None = None) -> None:
        """Make one of the next frames of ``layer`` (None: every layer) an IDR (coalesced,
        at most one per 0.3 s and layer)."""
        self.keyframe_requests += 1
        for name in LAYERS if layer is None else (layer,):
            self._codecs[name].keyframe_pending = True

    def _request(self, layer: VideoLayer) -> None:
        self.request_keyframe(layer)

    def layer_kbps(self, layer: VideoLayer) -> float | None:
        """``layer``'s measured bitrate over the last few seconds (None: not encoded)."""
        return self._codecs[layer].kbps_measured(time.monotonic())

    def camera_muted(self) -> bool:
        return self.controls is not None and self.controls.camera_muted

    # -- the service -------------------------------------------------------------------

    async def run(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="h264-encode")
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._active.wait()
                with self.hub.subscribe(self.name) as frames:
                    while self._tracks:
                        frame = await self._next_frame(frames)
                        if frame is None or not self._tracks:
                            continue
                        slate = frame.index < 0
                        plan = self._plan(frame)
                        if not plan:
                            continue  # every track is paused
                        try:
                            encoded = await loop.run_in_executor(
                                executor, self._encode, frame, plan
                            )
                        except av.FFmpegError as exc:
                            self._encode_failed(exc)
                            continue
                        self._failures = 0
                        if not slate and self.camera_muted():
                            continue  # muted during the encode: this picture stays here
                        self._fan_out(encoded)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    async def _next_frame(self, frames: FrameSubscription) -> Frame | None:
        """The next camera frame, or while muted the next slate frame (index -1); None
        when there is nothing to encode yet (call again)."""
        muted = self.camera_muted()
        if muted != self._was_muted:
            self._was_muted = muted
            self._next_slate = 0.0
            log.info("camera %s: forcing a keyframe", "muted" if muted else "unmuted")
            for codec in self._codecs.values():
                codec.keyframe_pending = True
                codec.last_forced = -1e9  # the edge must not wait for the PLI gap
        if not muted:
            try:
                async with asyncio.timeout(CAMERA_WAIT_S):
                    frame = await frames.get()
            except TimeoutError:
                return None
            return None if self.camera_muted() else frame
        wait = self._next_slate - time.monotonic()
        if wait <= 0 and self._slate_size() is None:
            # Muted from the start: learn the camera's size (not its pixels) first.
            self._slate_waits += 1
            wait = CAMERA_WAIT_S
        if wait > 0:
            # Camera frames only tick the loop, so an unmute shows within one frame.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, CAMERA_WAIT_S)):
                    await frames.get()
            return None
        self._next_slate = time.monotonic() + 1.0 / self.settings.slate_fps
        now_ns = time.monotonic_ns()
        return Frame(self._slate(*(self._slate_size() or (1280, 720))), -1, now_ns, time.time_ns())

    def _plan(self, frame: Frame) -> dict[VideoLayer, bool]:
        """Which layers to encode for ``frame`` and whether each must be an IDR."""
        wanted = self.wanted_layers()
        now = time.monotonic()
        scheduled = False
        interval_ns = int(self.settings.keyframe_interval_s * 1e9)
        if wanted and (
            self._next_scheduled_ns is None or frame.captured_ns >= self._next_scheduled_ns
        ):
            scheduled = self._next_scheduled_ns is not None
            self._next_scheduled_ns = frame.captured_ns + interval_ns
        plan: dict[VideoLayer, bool] = {}
        for name, codec in self._codecs.items():
            if name not in wanted:
                codec.active = False
                continue
            force = scheduled or not codec.active
            if codec.keyframe_pending and now - codec.last_forced >= MIN_FORCED_KEYFRAME_GAP_S:
                codec.keyframe_pending = False
                codec.last_forced = now
                if not force:
                    codec.forced += 1
                force = True
            elif not codec.active:
                codec.keyframe_pending = False
            codec.active = True
            plan[name] = force
        return plan

    def _encode_failed(self, exc: Exception) -> None:
        """One bad frame must not end every room's lesson: reopen the encoders and go on;
        an encoder that keeps failing is a real fault for the supervisor."""
        self._failures += 1
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"H.264 encoder failed {self._failures} times in a row: {exc}")
        log.warning("H.264 encode failed (%s); reopening the encoder", exc)
        for codec in self._codecs.values():
            codec.context = None
            codec.keyframe_pending = True

    def _fan_out(self, encoded: Encoded) -> None:
        now = time.monotonic()
        for name, packets in encoded.items():
            codec = self._codecs[name]
            for packet in packets:
                codec.packets += 1
                codec.keyframes += bool(packet.is_keyframe)
                codec.window.append((now, packet.size))
        for track in list(self._tracks):
            track._offer(encoded)

    # -- the slate ---------------------------------------------------------------------

    def _slate_size(self) -> tuple[int, int] | None:
        """The camera picture's size (None: not known yet, and worth waiting for)."""
        high = self._codecs["high"].size
        if high is not None:
            return high
        mode = self.hub.mode
        if mode is not None:
            return mode.width & ~1, mode.height & ~1
        return None if self._slate_waits < 3 else (1280, 720)  # no camera: any size

    def _slate(self, width: int, height: int) -> Image:
        """A dark picture that says "Camera off" (cached per size; never a camera pixel)."""
        image = self._slates.get((width, height))
        if image is None:
            image = np.full((height, width, 3), 32, np.uint8)
            font = cv2.FONT_HERSHEY_SIMPLEX
            scale = max(0.5, width / 400)
            thickness = max(1, round(width / 320))
            (text_w, text_h), _ = cv2.getTextSize(SLATE_TEXT, font, scale, thickness)
            origin = ((width - text_w) // 2, (height + text_h) // 2)
            cv2.putText(image, SLATE_TEXT, origin, font, scale, (200, 200, 200), thickness)
            image.setflags(write=False)
            self._slates = {(width, height): image}
        return image

    # -- the worker thread -------------------------------------------------------------

    def _open(self, codec: _Codec, width: int, height: int) -> Any:
        cfg = self.settings
        fps = self.hub.mode.fps if self.hub.mode is not None else 30.0
        kbps = codec.kbps
        buffer_s = cfg.vbv_buffer_s if codec.name == "high" else cfg.low_vbv_buffer_s
        bufsize = max(1, round(kbps * buffer_s))
        ctx: Any = av.CodecContext.create(cfg.codec, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(fps).limit_denominator(1001)
        ctx.bit_rate = kbps * 1000
        ctx.max_b_frames = 0
        if cfg.threads:
            ctx.thread_count = cfg.threads
        # Baseline in libx264 is constrained baseline (42c0xx): every browser and
        # aiortc decode it. repeat-headers puts SPS/PPS before every IDR so a joiner
        # can start at any keyframe; forced-idr turns our I requests into IDRs. x264
        # places no keyframe of its own (keyint=infinite): _plan schedules them for
        # every layer at the same frame.
        ctx.options = {
            "preset": cfg.preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",
            "x264-params": (
                f"keyint=infinite:scenecut=0:bframes=0:"
                f"repeat-headers=1:vbv-maxrate={kbps}:vbv-bufsize={bufsize}"
            ),
        }
        self.resets += 1
        log.info(
            "H.264 encoder (%s layer) %dx%d@%g, %d kbps, keyframe every %g s, preset %s",
            codec.name,
            width,
            height,
            fps,
            kbps,
            cfg.keyframe_interval_s,
            cfg.preset,
        )
        return ctx

    def _encode(
        self, frame: Frame, plan: Mapping[VideoLayer, bool]
    ) -> dict[VideoLayer, list[av.Packet[Any]]]:
        """Encode ``frame`` for each layer of ``plan`` (layer -> force an IDR); runs on the
        worker thread. One BGR -> yuv420p conversion; the low layer scales that."""
        started = time.perf_counter()
        image = frame.image
        if image.shape[0] % 2 or image.shape[1] % 2:  # 4:2:0 needs even sizes
            image = image[: image.shape[0] & ~1, : image.shape[1] & ~1]
        width, height = int(image.shape[1]), int(image.shape[0])
        if self._origin_ns is None:
            self._origin_ns = frame.captured_ns
        # RTP time from capture time: the receiver's jitter buffer and lip sync see the
        # camera's real timing, including the frames this encoder skipped. Both layers
        # share it, so a switch keeps the track's timestamps continuous.
        pts = (frame.captured_ns - self._origin_ns) * VIDEO_CLOCK_HZ // 1_000_000_000
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        picture = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        result: dict[VideoLayer, list[av.Packet[Any]]] = {}
        for name in LAYERS:
            if name not in plan:
                continue
            layer_started = time.perf_counter()
            codec = self._codecs[name]
            size = (width, height)
            video = picture
            target_height = self.settings.layer_height(name)
            if target_height is not None:
                size = low_layer_size(width, height, target_height)
                if size != (width, height):
                    video = picture.reformat(width=size[0], height=size[1], format="yuv420p")
            force = plan[name]
            if codec.context is None or size != codec.size:
                codec.context = self._open(codec, *size)
                codec.size = size
                force = True
            video.pts = pts
            video.time_base = VIDEO_TIME_BASE
            video.pict_type = (
                av.video.frame.PictureType.I if force else av.video.frame.PictureType.NONE
            )
            packets = list(codec.context.encode(video))
            for packet in packets:
                packet.time_base = VIDEO_TIME_BASE
            codec.frames += 1
            codec.encode_s += time.perf_counter() - layer_started
            result[name] = packets
        self.frames_encoded += 1
        if frame.index < 0:
            self.slate_frames += 1
        self._encode_s += time.perf_counter() - started
        return result

    # -- figures -----------------------------------------------------------------------

    @property
    def packets(self) -> int:
        return sum(c.packets for c in self._codecs.values())

    @property
    def keyframes(self) -> int:
        return sum(c.keyframes for c in self._codecs.values())

    @property
    def forced_keyframes(self) -> int:
        return sum(c.forced for c in self._codecs.values())

    def stats(self) -> EncoderStats:
        avg = 1000 * self._encode_s / self.frames_encoded if self.frames_encoded else None
        now = time.monotonic()
        layers = tuple(
            LayerStats(
                name=c.name,
                active=c.active,
                width=None if c.size is None else c.size[0],
                height=None if c.size is None else c.size[1],
                frames=c.frames,
                packets=c.packets,
                keyframes=c.keyframes,
                forced_keyframes=c.forced,
                bitrate_kbps=c.kbps_measured(now),
                encode_ms_avg=1000 * c.encode_s / c.frames if c.frames else None,
            )
            for c in self._codecs.values()
        )
        return EncoderStats(
            frames_encoded=self.frames_encoded,
            packets=self.packets,
            keyframes=self.keyframes,
            forced_keyframes=self.forced_keyframes,
            keyframe_requests=self.keyframe_requests,
            resets=self.resets,
            encode_ms_avg=avg,
            tracks=tuple(t.stats() for t in self._tracks),
            layers=layers,
            slate_frames=self.slate_frames,
            camera_muted=self.camera_muted(),
        )
