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
from dataclasses import asdict, dataclass

from aiortc import RTCRtpReceiver

from agent.stream import hooks
from agent.stream.hooks import JitterFrame, RtpPacket

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
