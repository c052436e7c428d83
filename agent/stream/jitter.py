"""Audio that never waits for a lost packet: a zero-prefetch jitter buffer for Opus.

aiortc 1.16 gives every audio ``RTCRtpReceiver`` a ``JitterBuffer(capacity=16,
prefetch=4)``. It holds frames until four complete ones follow, and a lost packet is
only given up once sixteen newer ones have arrived. On a rural link (2 % loss) every
loss stalls the audio for about 320 ms, after which the buffer stays about 14 packets
(280 ms) behind, and every later loss makes it throw away about four good frames to
make room: 2 % loss became 6-11 % missing audio plus 280 ms of extra latency.

Opus sends one RTP packet per frame, so there is nothing to reassemble and nothing to
wait for. :class:`AudioJitterBuffer` hands each packet to the decoder as soon as it
arrives, in sequence order: a hole is skipped at once (a lost packet costs exactly its
own 20 ms and never adds latency), a packet at or behind the last one handed over
(late, reordered, duplicated) is dropped and counted, and a jump too big to be loss is
a new stream origin (a restarted sender) and is followed at once. The decoder's own
packet-loss handling sees the timestamp jump, as it did before.

Private API: aiortc has no way to choose a receiver's jitter buffer, so
:func:`tune_audio_receiver` swaps it through
:func:`agent.stream.hooks.replace_audio_jitter_buffer` (aiortc's name-mangled receiver
attributes), which raises ``RuntimeError`` rather than silently leaving the old buffer
in place; ``tests/test_stream_jitter.py`` runs real audio through a tuned receiver and
checks the buffer's counters move, so an aiortc upgrade that renames or bypasses the
attribute fails a test instead of bringing the audio stalls back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from aiortc import RTCRtpReceiver

from agent.stream import hooks
from agent.stream.hooks import JitterBuffer, JitterFrame, RtpPacket

log = logging.getLogger(__name__)

MAX_DROPOUT = 3000  # packets ahead that are loss; further is a new origin (RFC 3550 A.1)
MAX_MISORDER = 100  # packets behind that are late; further back is a new origin (as aiortc)


@dataclass(slots=True)
class JitterCounters:
    """What the buffer did. ``emitted``: frames handed to the decoder; ``late_dropped``:
    packets at or behind the last emitted one (late, reordered, duplicate); ``gaps``:
    sequence holes skipped; ``missing``: packets in those holes; ``restarts``: jumps
    taken as a new stream origin (not counted as missing)."""

    emitted: int = 0
    late_dropped: int = 0
    gaps: int = 0
    missing: int = 0
    restarts: int = 0


class AudioJitterBuffer:
    """A drop-in for aiortc's ``JitterBuffer`` on an audio receiver: one packet in, at
    most one frame out, at once. ``capacity`` is only reported (aiortc's interface); the
    buffer keeps nothing but the last sequence number."""

    def __init__(self, capacity: int = 16) -> None:
        self._capacity = capacity
        self._last: int | None = None
        self.counters = JitterCounters()

    @property
    def capacity(self) -> int:
        return self._capacity

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """The frame for ``packet`` if it is the newest yet, else None; never asks for a
        keyframe (the bool is aiortc's PLI flag, video only)."""
        sequence = packet.sequence_number
        counters = self.counters
        if self._last is not None:
            delta = (sequence - self._last) & 0xFFFF  # modulo 2**16, as aiortc's uint16_add
            if delta == 0 or delta >= 0x10000 - MAX_MISORDER:
                counters.late_dropped += 1
                return False, None
            if delta <= MAX_DROPOUT:
                if delta > 1:
                    counters.gaps += 1
                    counters.missing += delta - 1
            else:
                counters.restarts += 1
                log.debug("audio RTP sequence jumped %d -> %d: new origin", self._last, sequence)
        self._last = sequence
        counters.emitted += 1
        return False, hooks.jitter_frame(packet)

    def describe(self) -> dict[str, int]:
        return asdict(self.counters)


def tune_audio_receiver(receiver: RTCRtpReceiver) -> AudioJitterBuffer | None:
    """Give an audio ``receiver`` an :class:`AudioJitterBuffer` (returned; the one it
    already has if called twice). Video receivers are left alone (None): their
    buffer reassembles multi-packet frames and asks for keyframes.

    Call it before media flows (after ``addTransceiver`` or ``setRemoteDescription``):
    a buffer swapped mid-stream would drop what aiortc's was holding."""
    return hooks.replace_audio_jitter_buffer(receiver, AudioJitterBuffer, AudioJitterBuffer)


# -- video ------------------------------------------------------------------------------

VIDEO_CAPACITY = 512  # packets, as aiortc's own video buffer
HOLE_WAIT_MIN_S = 0.25  # at least one retransmission's worth on a short link
HOLE_WAIT_MAX_S = 1.2
_START_CODE = b"\x00\x00\x00\x01"
_NAL_IDR = 5
_NAL_SPS = 7


def is_keyframe(annex_b: bytes) -> bool:
    """Whether an H.264 access unit (Annex B, as aiortc's depayloader joins it) holds
    an IDR slice, so decoding can start from it."""
    pos = annex_b.find(_START_CODE)
    while pos >= 0 and pos + 4 < len(annex_b):
        if annex_b[pos + 4] & 0x1F == _NAL_IDR:
            return True
        pos = annex_b.find(_START_CODE, pos + 4)
    return False


def starts_keyframe(annex_b: bytes) -> bool:
    """Whether a packet's payload (depayloaded, Annex B) opens a keyframe: an IDR slice
    or the sequence parameter set our encoder repeats before every IDR."""
    pos = annex_b.find(_START_CODE)
    while pos >= 0 and pos + 4 < len(annex_b):
        if annex_b[pos + 4] & 0x1F in (_NAL_IDR, _NAL_SPS):
            return True
        pos = annex_b.find(_START_CODE, pos + 4)
    return False


@dataclass(slots=True)
class VideoJitterCounters:
    """``emitted``: frames handed to the decoder; ``holes_skipped``: holes given up on
    after :attr:`VideoJitterBuffer.hole_wait_s`; ``frames_dropped``: frames thrown away
    after a skip while waiting for a keyframe."""

    emitted: int = 0
    holes_skipped: int = 0
    frames_dropped: int = 0


class VideoJitterBuffer(JitterBuffer):
    """aiortc's video buffer, but a hole it cannot fill is given up on in time.

    aiortc 1.16 gives video a 512-packet buffer that hands frames over in order and
    waits for a missing packet until 512 newer ones have arrived: 5-9 s of video at
    the low layer's rate. On a lossy line a packet whose retransmission is lost too
    (or comes after the sender's 128-packet history) freezes the picture that long and
    then plays the backlog in a burst, every frame seconds late (the "before" of issue
    13: glass-to-glass p95 of 4.8 s). Here, when newer packets wait behind a hole for
    :attr:`hole_wait_s` (about 1.5 RTT, set from the session's RTT: enough for a NACK
    and its retransmission), the incomplete frame is dropped, a keyframe is asked for
    (PLI) and frames are dropped until one arrives, so the decoder never sees a broken
    reference: a short freeze instead of a smear or a multi-second stall.
    """

    def __init__(
        self,
        capacity: int = VIDEO_CAPACITY,
        *,
        hole_wait_s: float = 0.4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(capacity, is_video=True)
        self.hole_wait_s = hole_wait_s
        self.counters = VideoJitterCounters()
        self._clock = clock
        self._blocked_since: float | None = None
        self._need_keyframe = False
        self._newest: int | None = None

    def set_rtt(self, rtt_s: float) -> None:
        """Wait about one and a half round trips for a retransmission."""
        self.hole_wait_s = min(HOLE_WAIT_MAX_S, max(HOLE_WAIT_MIN_S, 1.5 * rtt_s + 0.05))

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli, frame = super().add(packet)
        if self._newest is None or (packet.sequence_number - self._newest) & 0xFFFF < 0x8000:
            self._newest = packet.sequence_number
        if frame is not None:
            self._blocked_since = None
            return pli, self._gate(frame)
        head = self._head_hole()
        if head is None:
            self._blocked_since = None
            return pli, None
        now = self._clock()
        if self._blocked_since is None:
            self._blocked_since = now
            return pli, None
        if now - self._blocked_since < self.hole_wait_s:
            return pli, None
        self._skip(head)
        self._skip_backlog()
        self._blocked_since = None
        self.counters.holes_skipped += 1
        self._need_keyframe = True
        frame = self._next_frame()
        return True, None if frame is None else self._gate(frame)

    def _gate(self, frame: JitterFrame) -> JitterFrame | None:
        if self._need_keyframe:
            if not is_keyframe(frame.data):
                self.counters.frames_dropped += 1
                return None
            self._need_keyframe = False
        self.counters.emitted += 1
        return frame

    def _head_hole(self) -> int | None:
        """Packets from the origin to the first missing one, if newer packets wait
        behind that hole (None: nothing is blocked)."""
        origin = self._origin
        if origin is None or self._newest is None:
            return None
        newest = (self._newest - origin) & 0xFFFF
        if newest >= self._capacity:
            return None
        for count in range(newest + 1):
            if self._packets[(origin + count) % self._capacity] is None:
                return count if count < newest else None
        return None

    def _skip(self, hole: int) -> None:
        """Drop the packets before the hole, the hole, and the rest of the frame it is
        in (the packets after it with the same timestamp as the ones before it)."""
        origin = self._origin
        assert origin is not None
        before = self._packets[(origin + hole - 1) % self._capacity] if hole else None
        timestamp = None if before is None else before.timestamp
        count = hole
        while count < self._capacity:
            packet = self._packets[(origin + count) % self._capacity]
            if packet is not None and packet.timestamp != timestamp:
                break
            count += 1
        self.remove(count)

    def _skip_backlog(self) -> None:
        """After a skip, jump to the newest keyframe waiting in the buffer (or, with none,
        to the newest frame): the complete frames that queued up behind the hole are
        seconds old by now, cannot be decoded without the lost one, and aiortc's buffer
        hands over only one frame per arriving packet, so they would trickle out late."""
        origin = self._origin
        if origin is None or self._newest is None:
            return
        newest = (self._newest - origin) & 0xFFFF
        if newest >= self._capacity:
            return
        target = None
        last_timestamp = None
        newest_start = None
        for count in range(newest + 1):
            packet = self._packets[(origin + count) % self._capacity]
            if packet is None:
                continue
            if packet.timestamp != last_timestamp:
                newest_start = count
                if starts_keyframe(getattr(packet, "_data", b"")):
                    target = count
            last_timestamp = packet.timestamp
        jump = target if target is not None else newest_start
        if jump:
            dropped = len(
                {
                    p.timestamp
                    for c in range(jump)
                    if (p := self._packets[(origin + c) % self._capacity]) is not None
                }
            )
            self.counters.frames_dropped += dropped
            self.remove(jump)

    def _next_frame(self) -> JitterFrame | None:
        """A frame now complete at the head (the skip may have uncovered one)."""
        if self._newest is None:
            return None
        return self._remove_frame(self._newest)

    def describe(self) -> dict[str, int]:
        return asdict(self.counters)


def tune_video_receiver(receiver: RTCRtpReceiver) -> VideoJitterBuffer | None:
    """Give a video ``receiver`` a :class:`VideoJitterBuffer` (returned; the one it
    already has if called twice); audio receivers: None. Call it before media flows."""
    return hooks.replace_jitter_buffer(receiver, "video", VideoJitterBuffer, VideoJitterBuffer)
