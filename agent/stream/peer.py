"""One WebRTC peer connection with another room: its tracks, its sinks, its ending.

Both sides of a lesson use :class:`PeerSession`; the lesson code decides who offers.
A session owns everything it starts (the RTCPeerConnection, the local tracks, one sink
task per remote track) and :meth:`PeerSession.close` finishes all of it, so a lesson
that ends or a room that reconnects leaves no task, thread or socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.aio import wait_first
from agent.capture import AudioHub
from agent.config import IceServerConfig
from agent.stream.audio import HubAudioTrack
from agent.stream.controls import MediaControls
from agent.stream.encoder import EncodedVideoTrack, SharedH264Encoder
from agent.stream.hooks import route_bitrate_estimates, route_keyframe_requests
from agent.stream.ice import check_host_addresses, gather, new_peer_connection
from agent.stream.jitter import (
    AudioJitterBuffer,
    VideoJitterBuffer,
    tune_audio_receiver,
    tune_video_receiver,
)
from agent.stream.layers import LayerControl, LayerPolicy, LayerPolicySettings
from agent.stream.sinks import MediaSink
from agent.stream.stats import (
    Direction,
    Figures,
    StatsSnapshot,
    figures,
    remote_loss_percent,
    snapshot,
)
from agent.stream.voice import LinkTuning, audio_preferences, decline_red, sent_audio_codec
from agent.stream.voice import install as install_voice

log = logging.getLogger(__name__)

# Google Congestion Control's loss-based rule: up to this much loss the rate holds.
GCC_LOSS_HOLD_PERCENT = 10.0
AUDIO_ONLY_AFTER_S = 2.0  # no new picture this long while sound arrives: audio only
AUDIO_FLOWING_S = 1.0
UP_ESTIMATE_RATIO = 1.3  # a climb needs the receiver's estimate this far above the layer
# A receiver report covers about the second before it and the poller reads one every 2 s:
# after stepping down, the first reports still describe the layer we left.
SETTLE_AFTER_DOWN_S = 3.0

# Constrained baseline first: what browsers offer and what our libx264 produces.
_H264_PROFILES = ("42e01f", "42001f")


@dataclass(frozen=True, slots=True)
class IceSettings:
    """``servers``: STUN/TURN (empty: host candidates only, nothing public is contacted).
    ``host_addresses``: the only addresses host candidates use (empty: aioice's choice,
    every interface but loopback; tests use ``("127.0.0.1",)``)."""

    servers: tuple[IceServerConfig, ...] = ()
    host_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_host_addresses(self.host_addresses)

    @classmethod
    def of(
        cls, servers: Sequence[IceServerConfig] = (), host_addresses: Sequence[str] = ()
    ) -> IceSettings:
        return cls(tuple(servers), tuple(host_addresses))


def h264_preferences() -> list[Any]:
    """aiortc's H.264 codec capabilities (and RTX), constrained baseline first."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    h264 = [c for c in codecs if c.mimeType.lower() == "video/h264"]
    h264.sort(
        key=lambda c: (
            _H264_PROFILES.index(c.parameters.get("profile-level-id", ""))
            if c.parameters.get("profile-level-id", "") in _H264_PROFILES
            else len(_H264_PROFILES)
        )
    )
    rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx"]
    return h264 + rtx


class _WatchedTrack(MediaStreamTrack):
    """Passes a remote track through, noting when media last arrived."""

    def __init__(self, inner: MediaStreamTrack, session: PeerSession) -> None:
        super().__init__()
        self.kind = inner.kind
        self._inner = inner
        self._session = session

    async def recv(self) -> Any:
        item = await self._inner.recv()
        now = time.monotonic()
        self._session.last_media = now
        if self.kind == "video":
            self._session.video_frames = (self._session.video_frames or 0) + 1
            self._session.last_video = now
        else:
            self._session.last_audio = now
        return item


class PeerSession:
    """A peer connection to ``remote`` for lesson ``lesson_id``.

    ``ended`` is set (once, with ``end_reason``) when the connection fails or closes or
    when the lesson code calls :meth:`end`; ``connected`` when ICE and DTLS are up.
    While connected, a poller reads ``getStats()`` every :attr:`stats_interval_s` and
    keeps the latest RTP figures for :meth:`describe` and feeds the video layer policy
    (:attr:`layers`, see ``agent/stream/layers.py``), which also hears the peer's
    bandwidth estimates. ``controls``: the room's mute switches, for the audio track
    (the shared encoder has its own reference for the camera).
    """

    stats_interval_s: float = 2.0

    def __init__(
        self,
        remote: str,
        lesson_id: str,
        ice: IceSettings,
        sink: MediaSink | None,
        *,
        controls: MediaControls | None = None,
        layer_policy: LayerPolicySettings | None = None,
        tuning: LinkTuning | None = None,
    ) -> None:
        install_voice()  # aiortc learns RED before the first offer or answer
        self.remote = remote
        self.tuning = tuning or LinkTuning()
        self.audio_codec: str | None = None  # what we send: "red", "opus" (None: no audio)
        self.lesson_id = lesson_id
        self.ice = ice
        self.pc: RTCPeerConnection = new_peer_connection(ice.servers)
        self.connected = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.last_media: float | None = None
        self.last_video: float | None = None  # a received video frame
        self.last_audio: float | None = None
        self.video_frames: int | None = None  # decoded video frames received (None: no track)
        self.figures = Figures()
        # The offerer is a receiving room (its rate: what it receives); the answerer the
        # main room (its rate: the video it sends).
        self.bitrate_of: Direction = "received"
        self._last_snapshot: StatsSnapshot | None = None
        self.controls = controls
        self.layer_policy = layer_policy  # None: the encoder's layers, default thresholds
        self.layers: LayerControl | None = None  # set by add_video
        # Received audio's jitter buffer (agent/stream/jitter.py); set at negotiation.
        self.audio_jitter: AudioJitterBuffer | None = None
        # Received video's (with stream.link.give_up_lost_video); set at negotiation.
        self.video_jitter: VideoJitterBuffer | None = None
        self._sends_audio = False
        self._sink = sink
        self._tracks: list[MediaStreamTrack] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("track", self._on_track)

    @property
    def state(self) -> str:
        return str(self.pc.connectionState)

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.debug("peer %s (lesson %s): %s", self.remote, self.lesson_id, state)
        if state == "connected" and not self.connected.is_set():
            self.connected_at = time.monotonic()
            self.connected.set()
            self._start(self._poll_stats(), f"stream-stats-{self.remote}")
        elif state in ("failed", "closed"):
            self.end(f"connection {state}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if self._closed:
            return
        sink = self._sink
        watched = _WatchedTrack(track, self)
        if track.kind == "video" and self.video_frames is None:
            self.video_frames = 0
        coro = _drain(watched) if sink is None else sink.consume(self.remote, watched)
        self._start(
            _guard(coro, f"sink for {track.kind} from {self.remote}"),
            f"stream-sink-{self.remote}-{track.kind}",
        )

    def _start(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task owned by the session: cancelled and awaited by :meth:`close`."""
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- statistics ----------------------------------------------------------------------

    async def sample_stats(self) -> Figures:
        """Read ``getStats()`` once and update :attr:`figures` (rates over the interval
        since the previous sample)."""
        report = await self.pc.getStats()
        current = snapshot(report, time.monotonic(), self.video_frames)
        self.figures = figures(self._last_snapshot, current, self.bitrate_of)
        self._last_snapshot = current
        if self.video_jitter is not None and current.rtt_s is not None:
            self.video_jitter.set_rtt(current.rtt_s)
        if self.layers is not None:
            # Only how the peer receives *our* video decides its layer.
            self.layers.on_link(
                loss_percent=remote_loss_percent(current),
                rtt_ms=None if current.rtt_s is None else current.rtt_s * 1000,
            )
        return self.figures

    async def _poll_stats(self) -> None:
        while not self.ended.is_set():
            try:
                await self.sample_stats()
            except asyncio.CancelledError:
                raise
            except Exception:  # statistics never end a lesson
                log.debug("getStats() for %s failed", self.remote, exc_info=True)
            await wait_first(self.ended, timeout=self.stats_interval_s)

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    # -- outgoing media ----------------------------------------------------------------

    def add_video(self, encoder: SharedH264Encoder, transceiver: Any | None = None) -> None:
        """Send the shared encoder's stream under a layer policy; the peer's PLI/FIR reach
        that encoder (for the layer this peer is on), its REMB the policy.

        Add audio first where there is any: a session without audio never pauses its
        video (see ``agent/stream/layers.py``)."""
        track = encoder.track(f"{self.remote}/{self.lesson_id}")
        track.keyframe_gap_s = self.tuning.keyframe_request_gap_s
        self._tracks.append(track)
        if transceiver is None:
            sender = self.pc.addTrack(track)
        else:
            transceiver.sender.replaceTrack(track)
            sender = transceiver.sender
        route_keyframe_requests(sender, track.request_keyframe)
        settings = self.layer_policy or LayerPolicySettings.for_encoder(encoder.settings)
        if not self._sends_audio:
            settings = dataclasses.replace(settings, allow_pause=False)
        if self.tuning.start_low and self.layer_policy is None:
            # A thin line is not flooded with the high layer before the first report says
            # it cannot take it; a good one climbs after first_up_after_s.
            settings = dataclasses.replace(
                settings,
                start="low",
                first_up_after_s=self.tuning.first_up_after_s,
                corroborate_loss_percent=GCC_LOSS_HOLD_PERCENT,
                up_estimate_ratio=UP_ESTIMATE_RATIO,
                settle_after_down_s=SETTLE_AFTER_DOWN_S,
            )
        policy = LayerPolicy(settings, now=time.monotonic(), state=settings.start)
        self.layers = LayerControl(track, policy, encoder.layer_kbps)
        route_bitrate_estimates(sender, self.layers.on_estimate)

    def add_audio(self, hub: AudioHub, transceiver: Any | None = None) -> None:
        track = HubAudioTrack(
            hub, f"{self.remote}/{self.lesson_id}", self.controls, self.tuning.voice
        )
        self._sends_audio = True
        if self.layers is not None and not self.layers.policy.settings.allow_pause:
            self.layers.policy.settings = dataclasses.replace(
                self.layers.policy.settings, allow_pause=True
            )
        self._tracks.append(track)
        if transceiver is None:
            self.pc.addTrack(track)
        else:
            transceiver.sender.replaceTrack(track)

    # -- negotiation ---------------------------------------------------------------------

    async def make_offer(self, encoder: SharedH264Encoder | None, audio: AudioHub | None) -> str:
        """The complete offer SDP: video (H.264 only) and audio, sent if we have them."""
        video_tx = self.pc.addTransceiver("video", direction="sendrecv" if encoder else "recvonly")
        video_tx.setCodecPreferences(h264_preferences())
        if encoder is not None:
            self.add_video(encoder, video_tx)
        audio_tx = self.pc.addTransceiver("audio", direction="sendrecv" if audio else "recvonly")
        audio_tx.setCodecPreferences(audio_preferences(self.tuning.voice.red))
        self._tune_audio()
        if audio is not None:
            self.add_audio(audio, audio_tx)
        await gather(self.pc, await self.pc.createOffer(), self.ice.host_addresses)
        return str(self.pc.localDescription.sdp)

    def _tune_audio(self) -> None:
        """Received audio skips a lost packet at once instead of stalling, received video
        gives up on a lost one in time (see agent/stream/jitter.py); before media flows,
        so no buffered frame is lost."""
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio":
                buffer = tune_audio_receiver(transceiver.receiver)
                if buffer is not None:
                    self.audio_jitter = buffer
            elif transceiver.kind == "video" and self.tuning.give_up_lost_video:
                video = tune_video_receiver(transceiver.receiver)
                if video is not None:
                    self.video_jitter = video

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        # aiortc sends the first of our preferences the answer kept.
        preferred = ["red", "opus"] if self.tuning.voice.red else ["opus"]
        self._note_audio_codec(sent_audio_codec(sdp, preferred))

    def _note_audio_codec(self, codec: str | None) -> None:
        if self._sends_audio and codec is not None:
            self.audio_codec = codec
            log.info("audio to %s: %s", self.remote, codec)

    async def make_answer(
        self, offer_sdp: str, encoder: SharedH264Encoder | None, audio: AudioHub | None
    ) -> str:
        """Apply a remote offer and return the complete answer SDP (raises ValueError and
        aiortc's errors for an offer we cannot use)."""
        offer_sdp = decline_red(offer_sdp, accept=self.tuning.voice.red)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        self._tune_audio()
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(h264_preferences())
                if encoder is not None and transceiver.sender.track is None:
                    self.add_video(encoder, transceiver)
                    transceiver.direction = "sendrecv"
            elif transceiver.kind == "audio" and audio and transceiver.sender.track is None:
                self.add_audio(audio, transceiver)
                transceiver.direction = "sendrecv"
        await gather(self.pc, await self.pc.createAnswer(), self.ice.host_addresses)
        sdp = str(self.pc.localDescription.sdp)
        if encoder is not None and "H264" not in sdp:
            raise ValueError("the offer has no H.264 video this room can send")
        self.bitrate_of = "sent"
        # An answer keeps the offer's order and aiortc sends its first codec: RED only
        # to a room that put it first (ours, when stream.link.red is on), never to a
        # browser offering Opus first.
        self._note_audio_codec(sent_audio_codec(sdp))
        return sdp

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once connected; False if the session ended or ``timeout`` passed first."""
        return await wait_first(self.connected, self.ended, timeout=timeout) is self.connected

    # -- teardown ------------------------------------------------------------------------

    async def close(self, reason: str = "closed") -> None:
        """Close the connection and finish every task the session started (idempotent)."""
        self.end(reason)
        if self._closed:
            return
        self._closed = True
        await finish(self._teardown())

    async def _teardown(self) -> None:
        for track in self._tracks:
            track.stop()
        try:
            await self.pc.close()
        except Exception:
            log.exception("closing the peer connection to %s failed", self.remote)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _describe_layers(self) -> dict[str, Any]:
        if self.layers is None:
            return {"layer": None, "layer_switches": None, "layer_cause": None}
        described = self.layers.describe()
        keys = ("layer", "layer_switches", "layer_reason", "layer_cause", "estimate_kbps")
        return {key: described.get(key) for key in keys}

    def receiving_audio_only(self, now: float | None = None) -> bool:
        """Whether the peer's sound arrives but its picture stopped (the main room paused
        this room's video: the line cannot carry it), so a kiosk can say so instead of
        showing a frozen frame. False before any video came (nothing froze)."""
        now = time.monotonic() if now is None else now
        return (
            self.last_video is not None
            and self.last_audio is not None
            and now - self.last_audio < AUDIO_FLOWING_S
            and now - self.last_video > AUDIO_ONLY_AFTER_S
        )

    def _describe_video_jitter(self) -> dict[str, Any]:
        jitter = self.video_jitter
        if jitter is None:
            return {"video_holes_skipped": None, "video_frames_dropped": None}
        return {
            "video_holes_skipped": jitter.counters.holes_skipped,
            "video_frames_dropped": jitter.counters.frames_dropped,
        }

    def _describe_audio(self) -> dict[str, Any]:
        jitter = self.audio_jitter
        if jitter is None:
            return {"audio_gaps": None, "audio_missing": None, "audio_late_dropped": None}
        counters = jitter.counters
        return {
            "audio_gaps": counters.gaps,
            "audio_missing": counters.missing,
            "audio_late_dropped": counters.late_dropped,
        }

    def _frames_dropped(self) -> int | None:
        """Video frames this room did not get from the shared encoder (its sender fell
        behind, or it waited for a keyframe); None where we send no video."""
        tracks = [t for t in self._tracks if isinstance(t, EncodedVideoTrack)]
        return sum(t.dropped for t in tracks) if tracks else None

    def _keyframe_requests(self) -> dict[str, int | None]:
        tracks = [t for t in self._tracks if isinstance(t, EncodedVideoTrack)]
        if not tracks:
            return {"keyframe_requests": None, "keyframe_requests_deferred": None}
        return {
            "keyframe_requests": sum(t.keyframe_requests for t in tracks),
            "keyframe_requests_deferred": sum(t.keyframe_requests_deferred for t in tracks),
        }

    def describe(self) -> dict[str, Any]:
        """This peer in the health topic's ``stream.peers`` shape (contracts v1); the
        RTP figures are the poller's latest (null until known, see agent.stream.stats)."""
        now = time.monotonic()
        return {
            "state": self.state,
            **self.figures.as_dict(),
            **self._describe_layers(),
            **self._describe_audio(),
            **self._describe_video_jitter(),
            "frames_dropped": self._frames_dropped(),
            "audio_codec": self.audio_codec,
            **self._keyframe_requests(),
            "lesson": self.lesson_id,
            "connected_for_s": None
            if self.connected_at is None
            else round(now - self.connected_at, 1),
            "media_age_s": None if self.last_media is None else round(now - self.last_media, 1),
            "audio_only": self.receiving_audio_only(now),
        }


async def finish(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile, then pass the
    cancellation on. Teardown must not stop halfway: aiortc shares one future between
    concurrent ``close()`` calls, and cancelling a waiter on it breaks the other
    (``InvalidStateError`` in aiortc's own close task)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            log.error("teardown failed while cancelled", exc_info=task.exception())
        raise asyncio.CancelledError
    task.result()


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


async def _guard(coro: Any, what: str) -> None:
    """Run a sink: its failure is logged and ends only that sink, never the lesson."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except MediaStreamError:
        pass
    except Exception:
        log.exception("%s failed", what)


def describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
