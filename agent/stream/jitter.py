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
:func:`tune_audio_receiver` replaces the name-mangled ``_RTCRtpReceiver__jitter_buffer``
(and reads ``_RTCRtpReceiver__kind``) of aiortc 1.16. It raises ``RuntimeError`` if
either is missing rather than silently leaving the old buffer in place, and
``tests/test_stream_jitter.py`` runs real audio through a tuned receiver and checks the
buffer's counters move, so an aiortc upgrade that renames or bypasses the attribute
fails a test instead of bringing the audio stalls back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)

MAX_DROPOUT = 3000  # packets ahead that are loss; further is a new origin (RFC 3550 A.1)
MAX_MISORDER = 100  # packets behind that are late; further back is a new origin (as aiortc)
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
_KIND = "_RTCRtpReceiver__kind"


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
            delta = uint16_add(sequence, -self._last)
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
        data: bytes = getattr(packet, "_data", packet.payload)  # set by the receiver
        return False, JitterFrame(data=data, timestamp=packet.timestamp)

    def describe(self) -> dict[str, int]:
        return asdict(self.counters)


def tune_audio_receiver(receiver: RTCRtpReceiver) -> AudioJitterBuffer | None:
    """Give an audio ``receiver`` an :class:`AudioJitterBuffer` (returned; the one it
    already has if called twice). Video receivers are left alone (None): their
    buffer reassembles multi-packet frames and asks for keyframes.

    Call it before media flows (after ``addTransceiver`` or ``setRemoteDescription``):
    a buffer swapped mid-stream would drop what aiortc's was holding."""
    private: Any = receiver
    kind = getattr(private, _KIND, None)
    current = getattr(private, _ATTRIBUTE, None)
    if kind is None or current is None:
        missing = _KIND if kind is None else _ATTRIBUTE
        raise RuntimeError(
            f"aiortc's RTCRtpReceiver has no {missing}: the audio jitter buffer cannot be "
            "replaced (agent/stream/jitter.py expects aiortc 1.16's private attributes; "
            "check the aiortc version)"
        )
    if kind != "audio":
        return None
    if isinstance(current, AudioJitterBuffer):
        return current
    if not isinstance(current, JitterBuffer):
        raise RuntimeError(
            f"aiortc's audio receiver has a {type(current).__name__}, not a JitterBuffer: "
            "agent/stream/jitter.py expects aiortc 1.16 (check the aiortc version)"
        )
    buffer = AudioJitterBuffer(current.capacity)
    setattr(private, _ATTRIBUTE, buffer)
    return buffer
