"""The audio jitter buffer: a lost Opus packet costs one frame, never a stall.

Unit tests feed real ``aiortc.rtp.RtpPacket`` s (loss, reordering, duplicates, the 16-bit
wrap, a restarted sender). The integration test runs real aiortc peers (two
``PeerSession`` s on loopback) carrying the synthetic microphone through the user-space
lossy link and measures the received audio the way ``bench/lesson.py`` does, from the
decoded frames' ``pts``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket

from agent.capture import AudioHub, open_audio_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import LinkTuning
from agent.stream.jitter import (
    MAX_DROPOUT,
    MAX_MISORDER,
    AudioJitterBuffer,
    JitterCounters,
    VideoJitterBuffer,
    tune_audio_receiver,
    tune_video_receiver,
)
from agent.stream.peer import IceSettings, PeerSession
from agent.testkit.impair import LinkImpairment, impaired
from tests.brokers import eventually

SAMPLES = 960  # one 20 ms Opus frame at 48 kHz
SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)


def packet(sequence: int, timestamp: int | None = None) -> RtpPacket:
    """An Opus packet as the receiver hands it over (``_data`` set by depayloading)."""
    ts = sequence * SAMPLES if timestamp is None else timestamp
    p = RtpPacket(payload_type=111, sequence_number=sequence & 0xFFFF, timestamp=ts & 0xFFFFFFFF)
    p.payload = bytes([sequence & 0xFF, 1, 2])
    p._data = p.payload  # type: ignore[attr-defined]
    return p


def feed(buffer: AudioJitterBuffer, sequences: list[int]) -> list[int]:
    """The sequence numbers that came out, in order (every add returns at once)."""
    out: list[int] = []
    for seq in sequences:
        pli, frame = buffer.add(packet(seq))
        assert pli is False
        if frame is not None:
            assert frame.data == bytes([seq & 0xFF, 1, 2])
            out.append((frame.timestamp // SAMPLES) & 0xFFFF)
    return out


# -- the buffer --------------------------------------------------------------------------------


def test_in_order_packets_come_out_at_once_with_data_and_timestamp() -> None:
    buffer = AudioJitterBuffer()
    p = packet(7, timestamp=123_456)
    pli, frame = buffer.add(p)
    assert pli is False
    assert frame is not None
    assert (frame.data, frame.timestamp) == (p.payload, 123_456)
    assert feed(buffer, [8, 9, 10]) == [8, 9, 10]
    assert buffer.counters == JitterCounters(emitted=4)
    assert buffer.capacity == 16


def test_a_lost_packet_is_skipped_at_once_and_costs_one_frame() -> None:
    buffer = AudioJitterBuffer()
    assert feed(buffer, [1, 2, 4, 5, 9, 10]) == [1, 2, 4, 5, 9, 10]
    assert buffer.counters == JitterCounters(emitted=6, gaps=2, missing=4)


def test_late_reordered_and_duplicate_packets_are_dropped_and_counted() -> None:
    buffer = AudioJitterBuffer()
    # 3 arrives after 4 (reordered: too late, 4 was already played), 4 twice, 2 very late.
    assert feed(buffer, [1, 2, 4, 3, 4, 5, 2, 6]) == [1, 2, 4, 5, 6]
    assert buffer.counters == JitterCounters(emitted=5, late_dropped=3, gaps=1, missing=1)


def test_sequence_numbers_wrap_at_65535() -> None:
    buffer = AudioJitterBuffer()
    out = feed(buffer, [65533, 65534, 65535, 0, 2, 65535, 1, 3])
    assert out == [65533, 65534, 65535, 0, 2, 3]
    assert buffer.counters == JitterCounters(emitted=6, late_dropped=2, gaps=1, missing=1)


def test_a_gap_across_the_wrap_is_counted_once() -> None:
    buffer = AudioJitterBuffer()
    assert feed(buffer, [65534, 1]) == [65534, 1]
    assert buffer.counters == JitterCounters(emitted=2, gaps=1, missing=2)


@pytest.mark.parametrize("jump", [MAX_DROPOUT + 1, 30_000, 0x10000 - MAX_MISORDER - 1])
def test_a_big_jump_is_a_new_origin_not_loss(jump: int) -> None:
    buffer = AudioJitterBuffer()
    start = 40_000
    restart = (start + 1 + jump) & 0xFFFF
    out = feed(buffer, [start, start + 1, restart, restart + 1, restart + 3])
    assert out == [start, start + 1, restart, (restart + 1) & 0xFFFF, (restart + 3) & 0xFFFF]
    assert buffer.counters == JitterCounters(emitted=5, gaps=1, missing=1, restarts=1)


def test_the_edges_of_loss_and_lateness() -> None:
    buffer = AudioJitterBuffer()
    assert feed(buffer, [1000, 1000 + MAX_DROPOUT]) == [1000, 1000 + MAX_DROPOUT]
    assert buffer.counters.missing == MAX_DROPOUT - 1
    last = 1000 + MAX_DROPOUT
    assert feed(buffer, [last - MAX_MISORDER]) == []
    assert buffer.counters.late_dropped == 1
    assert buffer.counters.restarts == 0


def test_a_lossy_stream_never_falls_behind() -> None:
    """What aiortc's buffer did wrong: after a loss every later packet must still come
    out on its own add, so latency never grows and no good frame is thrown away."""
    buffer = AudioJitterBuffer()
    sent = [s for s in range(60_000, 60_000 + 2000) if s % 50 != 7]  # 2 % loss, wraps
    assert feed(buffer, sent) == [s & 0xFFFF for s in sent]
    assert buffer.counters == JitterCounters(emitted=len(sent), gaps=40, missing=40)
    # aiortc's own buffer, for contrast: it holds frames back and discards good ones.
    theirs = JitterBuffer(capacity=16, prefetch=4)
    emitted = 0
    for seq in sent:
        _, frame = theirs.add(packet(seq))
        emitted += frame is not None
    assert emitted <= len(sent) - 3 * 40  # 1786 of 1960: ~4 good frames lost per loss


# -- the hook ---------------------------------------------------------------------------------


async def test_tune_replaces_the_audio_receivers_buffer_only() -> None:
    pc = RTCPeerConnection()
    try:
        video = pc.addTransceiver("video", direction="recvonly")
        audio = pc.addTransceiver("audio", direction="recvonly")
        assert tune_audio_receiver(video.receiver) is None
        assert isinstance(video.receiver._RTCRtpReceiver__jitter_buffer, JitterBuffer)  # type: ignore[attr-defined]
        buffer = tune_audio_receiver(audio.receiver)
        assert isinstance(buffer, AudioJitterBuffer)
        assert audio.receiver._RTCRtpReceiver__jitter_buffer is buffer  # type: ignore[attr-defined]
        assert tune_audio_receiver(audio.receiver) is buffer  # idempotent
    finally:
        await pc.close()


async def test_tune_fails_loudly_when_aiortc_renames_the_attribute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        monkeypatch.delattr(receiver, "_RTCRtpReceiver__jitter_buffer")
        with pytest.raises(RuntimeError, match="aiortc version"):
            tune_audio_receiver(receiver)
        monkeypatch.setattr(receiver, "_RTCRtpReceiver__jitter_buffer", object(), raising=False)
        with pytest.raises(RuntimeError, match="not a JitterBuffer"):
            tune_audio_receiver(receiver)
    finally:
        await pc.close()


# -- real peers on a lossy link -----------------------------------------------------------------


@dataclass
class AudioProbe:
    """The receiving room's loudspeaker as the bench reads it: pts jumps are lost audio,
    arrival gaps are stalls."""

    frames: int = 0
    missing_ms: float = 0.0
    gaps: int = 0
    longest_stall_ms: float = 0.0
    measuring: bool = False
    arrivals: list[float] = field(default_factory=list)

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        last_pts: int | None = None
        last_arrival: float | None = None
        try:
            while True:
                frame: Any = await track.recv()
                now = time.monotonic()
                if track.kind != "audio":
                    continue
                if self.measuring and last_pts is not None and last_arrival is not None:
                    self.frames += 1
                    jump = frame.pts - last_pts
                    if jump > 1.5 * frame.samples:
                        self.gaps += 1
                        self.missing_ms += 1000 * (jump - frame.samples) / frame.sample_rate
                    self.longest_stall_ms = max(self.longest_stall_ms, 1000 * (now - last_arrival))
                last_pts, last_arrival = frame.pts, now
        except MediaStreamError:
            return


@pytest.mark.slow
async def test_lossy_link_loses_only_the_lost_packets_and_never_stalls() -> None:
    """Both peers are in this process, so each datagram crosses the shim twice (out of
    the sender, into the receiver): the audio sees about 2 x 2 % loss and the link's
    ``dropped_loss`` counts every loss, both directions, RTCP and STUN included (an upper
    bound on lost audio packets). aiortc's own buffer stalls ~320 ms per loss here."""
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    hub_task = asyncio.create_task(hub.run(), name="test-audio-hub")
    ice = IceSettings(host_addresses=("127.0.0.1",))
    probe = AudioProbe()
    # aiortc's plain Opus: RED (test_stream_voice.py) would repair what this counts.
    receiver = PeerSession("main.room", "lesson-1", ice, probe, tuning=LinkTuning.baseline())
    sender = PeerSession("rural.room", "lesson-1", ice, None)
    try:
        with impaired(LinkImpairment(delay_ms=60, loss=0.02, seed=11)) as link:
            offer = await receiver.make_offer(None, None)
            answer = await sender.make_answer(offer, None, hub)
            await receiver.accept_answer(answer)
            jitter = receiver.audio_jitter
            assert isinstance(jitter, AudioJitterBuffer)
            assert sender.audio_jitter is not None  # the answerer's receiver is tuned too
            assert await receiver.wait_connected(timeout=30)
            await eventually(lambda: jitter.counters.emitted >= 25, within=30, what="audio")
            probe.measuring = True
            lost_before = link.counters.dropped_loss
            missing_before = jitter.counters.missing
            await eventually(lambda: probe.frames >= 400, within=60, what="8 s of audio")
            probe.measuring = False
            dropped = link.counters.dropped_loss - lost_before
            skipped = jitter.counters.missing - missing_before
            described = receiver.describe()
    finally:
        await receiver.close()
        await sender.close()
        hub_task.cancel()
        await asyncio.gather(hub_task, return_exceptions=True)
    assert dropped > 0, dropped
    assert probe.gaps > 0, probe
    # Lost audio is the lost packets' 20 ms each, nothing more.
    assert probe.missing_ms < 2.5 * dropped * 20, (probe.missing_ms, dropped)
    assert probe.missing_ms <= (skipped + 3) * 20, (probe.missing_ms, skipped)
    assert probe.longest_stall_ms < 200, probe.longest_stall_ms
    # The receiver really used AudioJitterBuffer, and the session reports it.
    assert jitter.counters.gaps > 0
    assert jitter.counters.missing >= skipped > 0
    assert described["audio_gaps"] == jitter.counters.gaps
    assert described["audio_missing"] == jitter.counters.missing
    assert described["audio_late_dropped"] == jitter.counters.late_dropped


# -- video: a hole given up on in time -------------------------------------------------------

IDR = b"\x00\x00\x00\x01\x65"  # an IDR slice's NAL header (type 5)
SLICE = b"\x00\x00\x00\x01\x41"  # a non-IDR slice (type 1)


def video_packets(frames: int, per_frame: int = 3, keyframe_every: int = 10) -> list[RtpPacket]:
    """``frames`` H.264 frames of ``per_frame`` packets each, as aiortc's receiver hands
    them to its buffer (depayloaded Annex B in ``_data``); frame 0, 10, 20... are IDRs."""
    packets = []
    seq = 65_000  # wraps past 65535 on the way
    for index in range(frames):
        for part in range(per_frame):
            packet = RtpPacket(
                payload_type=97, sequence_number=seq & 0xFFFF, timestamp=index * 3000
            )
            head = (IDR if index % keyframe_every == 0 else SLICE) if part == 0 else b""
            packet._data = head + bytes([index % 256, part])  # type: ignore[attr-defined]
            packets.append(packet)
            seq += 1
    return packets


def feed_video(buffer: Any, packets: list[RtpPacket], clock: list[float]) -> tuple[list[int], int]:
    """The frames (by timestamp) the buffer hands over, 10 ms per packet; PLIs asked."""
    out: list[int] = []
    plis = 0
    for packet in packets:
        clock[0] += 0.01
        pli, frame = buffer.add(packet)
        plis += pli
        if frame is not None:
            out.append(frame.timestamp // 3000)
    return out, plis


def test_video_frames_pass_in_order_and_a_late_retransmission_is_waited_for() -> None:
    clock = [0.0]
    buffer = VideoJitterBuffer(hole_wait_s=0.3, clock=lambda: clock[0])
    packets = video_packets(30)
    retransmitted = packets[:]
    lost = retransmitted.pop(16)  # frame 5's second packet...
    retransmitted.insert(16 + 10, lost)  # ...arrives 100 ms late (a NACK's round trip)
    frames, plis = feed_video(buffer, retransmitted, clock)
    assert frames == list(range(29))  # each frame once its successor starts; none lost
    assert plis == 0
    assert buffer.counters.holes_skipped == 0
    assert buffer.counters.emitted == 29


def test_a_video_packet_lost_for_good_costs_a_short_freeze_not_seconds() -> None:
    clock = [0.0]
    buffer = VideoJitterBuffer(hole_wait_s=0.3, clock=lambda: clock[0])
    packets = video_packets(60)
    del packets[3 * 12 + 1]  # frame 12 never completes
    frames, plis = feed_video(buffer, packets, clock)
    assert buffer.counters.holes_skipped == 1
    assert plis >= 1  # a keyframe was asked for
    # Frames up to 11 as usual; 12 to 19 (no reference) dropped; from the IDR at 20 on.
    assert frames == [*range(12), *range(20, 59)], frames
    assert buffer.counters.frames_dropped > 0
    # aiortc's own buffer hands nothing over after the hole for all 47 frames that follow
    # (it waits until 512 packets have come: seconds of a frozen picture, then a burst).
    clock = [0.0]
    frames_aiortc, _ = feed_video(JitterBuffer(capacity=512, is_video=True), packets, clock)
    assert frames_aiortc == list(range(12))


def test_the_hole_wait_follows_the_round_trip() -> None:
    buffer = VideoJitterBuffer()
    buffer.set_rtt(0.15)
    assert buffer.hole_wait_s == pytest.approx(0.275)
    buffer.set_rtt(0.01)
    assert buffer.hole_wait_s == 0.25
    buffer.set_rtt(3.0)
    assert buffer.hole_wait_s == 1.2


async def test_video_receivers_get_the_video_buffer_and_audio_ones_do_not() -> None:
    pc = RTCPeerConnection()
    try:
        video = pc.addTransceiver("video", direction="recvonly")
        audio = pc.addTransceiver("audio", direction="recvonly")
        buffer = tune_video_receiver(video.receiver)
        assert isinstance(buffer, VideoJitterBuffer)
        assert video.receiver._RTCRtpReceiver__jitter_buffer is buffer  # type: ignore[attr-defined]
        assert tune_video_receiver(video.receiver) is buffer
        assert tune_video_receiver(audio.receiver) is None
    finally:
        await pc.close()


def test_after_a_skip_the_backlog_is_jumped_to_its_newest_keyframe() -> None:
    """With a long wait (a satellite's round trip), frames pile up behind the hole; the
    older keyframe among them is seconds late by the time the hole is given up on, so
    the buffer jumps to the newest one instead of trickling the backlog out."""
    clock = [0.0]
    buffer = VideoJitterBuffer(hole_wait_s=0.6, clock=lambda: clock[0])
    packets = video_packets(60)
    del packets[3 * 12 + 1]
    frames, _ = feed_video(buffer, packets, clock)
    assert frames == [*range(12), *range(30, 59)], frames
    assert buffer.counters.frames_dropped >= 17  # 13 to 29, never decoded
