"""The low layer's policy, the REMB hook, and layer switches over real aiortc peers.

The policy is pure (samples and a clock), so its rules are tested with made-up links;
the REMB hook with a real RTCP packet through a real sender; the switch itself with two
real peers on 127.0.0.1 whose receiver decodes the stamped synthetic camera.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket, pack_remb_fci

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source, read_stamp
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import EncoderSettings, IceSettings, PeerSession, SharedH264Encoder
from agent.stream.hooks import route_bitrate_estimates
from agent.stream.ice import new_peer_connection
from agent.stream.layers import LayerControl, LayerPolicy, LayerPolicySettings
from tests.brokers import eventually

SETTINGS = LayerPolicySettings(high_kbps=2500, low_kbps=500)


def policy(state: Any = "high", **changes: Any) -> LayerPolicy:
    settings = LayerPolicySettings(**{"high_kbps": 2500, "low_kbps": 500, **changes})
    return LayerPolicy(settings, now=0.0, state=state)


def good_link(p: LayerPolicy, start: float, end: float, step: float = 2.0) -> None:
    """Stats-poller samples of a clean link from ``start`` to ``end`` (decide after each)."""
    t = start
    while t <= end:
        p.observe_link(t, loss_percent=0.0, rtt_ms=20.0)
        p.decide(t)
        t += step


# -- the policy ------------------------------------------------------------------------


def test_a_fallen_estimate_below_the_high_layer_steps_down_once_sustained() -> None:
    p = policy()
    p.observe_estimate(3_800_000, 0.0)
    assert p.decide(0.0) == "high"
    p.observe_estimate(1_200_000, 1.0)  # the receiver saw queues grow
    assert p.decide(1.0) == "high"  # not yet sustained
    p.observe_estimate(1_210_000, 2.5)
    assert p.decide(2.5) == "high"
    p.observe_estimate(1_220_000, 3.0)
    assert p.decide(3.0) == "low"
    assert p.switches == p.downs == 1
    assert "estimate" in p.reason


def test_a_low_estimate_that_never_fell_is_the_ramp_not_the_link() -> None:
    """aiortc's estimate starts near the incoming rate and climbs ~8 %/s: no down-switch."""
    p = policy()
    for t in range(20):
        p.observe_estimate(800_000 + 60_000 * t, float(t))
        assert p.decide(float(t)) == "high"


def test_the_estimate_is_compared_with_what_the_layer_really_sends() -> None:
    p = policy()
    p.observe_rates(high_kbps=600.0, low_kbps=None)  # a still picture: far below 2500
    p.observe_estimate(1_500_000, 0.0)
    p.observe_estimate(900_000, 1.0)
    assert p.decide(1.0) == "high"
    assert p.decide(5.0) == "high"  # 900 kbps fits 600 + 64
    assert p.need_kbps("high") == 600.0
    assert p.need_kbps("low") == 500.0


def test_sustained_loss_steps_down_and_a_single_bad_report_does_not() -> None:
    p = policy()
    p.observe_link(0.0, loss_percent=12.0, rtt_ms=30.0)
    assert p.decide(0.0) == "high"
    p.observe_link(2.0, loss_percent=0.5, rtt_ms=30.0)  # a blip
    assert p.decide(2.0) == "high"
    p.observe_link(4.0, loss_percent=9.0, rtt_ms=30.0)
    assert p.decide(4.0) == "high"
    p.observe_link(6.0, loss_percent=8.0, rtt_ms=30.0)
    assert p.decide(6.0) == "low"
    assert "loss" in p.reason
    # On the low layer the same loss is tolerated (pausing needs more).
    p.observe_link(8.0, loss_percent=8.0, rtt_ms=30.0)
    p.observe_link(10.0, loss_percent=8.0, rtt_ms=30.0)
    assert p.decide(10.0) == "low"


def test_growing_rtt_means_queues_and_steps_down() -> None:
    p = policy()
    p.observe_link(0.0, loss_percent=0.0, rtt_ms=40.0)
    p.decide(0.0)
    p.observe_link(2.0, loss_percent=0.0, rtt_ms=400.0)
    p.decide(2.0)
    p.observe_link(4.0, loss_percent=0.0, rtt_ms=420.0)
    assert p.decide(4.0) == "low"
    assert "RTT" in p.reason


def test_step_up_only_after_the_link_was_good_for_the_hysteresis() -> None:
    p = policy("low")
    good_link(p, 0.0, 8.0)
    assert p.decide(9.9) == "low"
    p.observe_link(10.0, loss_percent=0.0, rtt_ms=20.0)
    assert p.decide(10.0) == "high"
    assert p.ups == 1


def test_moderate_loss_or_a_recent_estimate_fall_blocks_the_step_up() -> None:
    p = policy("low")
    for t in range(0, 40, 2):
        p.observe_link(float(t), loss_percent=3.0, rtt_ms=20.0)  # not bad, not good
        assert p.decide(float(t)) == "low"
    q = policy("low")
    q.observe_estimate(900_000, 0.0)
    good_link(q, 0.0, 4.0)
    q.observe_estimate(700_000, 5.0)  # fell, but 700 still fits the low layer
    good_link(q, 6.0, 14.0)
    assert q.state == "low"  # the fall at 5 s restarted the clock
    good_link(q, 16.0, 16.0)
    assert q.state == "high"


def test_a_step_up_that_fails_at_once_doubles_the_hold() -> None:
    p = policy("low")
    good_link(p, 0.0, 10.0)
    assert p.state == "high"
    p.observe_link(12.0, loss_percent=20.0, rtt_ms=20.0)
    p.decide(12.0)
    p.observe_link(14.0, loss_percent=20.0, rtt_ms=20.0)
    assert p.decide(14.0) == "low"
    assert p.failed_ups == 1
    assert p.up_after_s() == 20.0
    good_link(p, 16.0, 34.0)
    assert p.state == "low"  # 18 s of good link: not enough any more
    good_link(p, 36.0, 36.0)
    assert p.state == "high"
    good_link(p, 38.0, 80.0)  # stays up this time: the next failure starts over
    p.observe_link(82.0, loss_percent=20.0, rtt_ms=20.0)
    p.decide(82.0)
    p.observe_link(84.0, loss_percent=20.0, rtt_ms=20.0)
    assert p.decide(84.0) == "low"
    assert p.failed_ups == 0
    assert p.up_after_s() == 10.0


def test_video_pauses_when_even_the_low_layer_does_not_fit_and_resumes_later() -> None:
    p = policy("low")
    p.observe_estimate(700_000, 1.0)
    p.observe_estimate(300_000, 2.0)  # 300 < 500 + 64: audio first...
    p.decide(2.0)
    assert p.decide(4.0) == "low"  # ... once the link agrees (one fall: maybe a burst)
    p.observe_link(4.2, loss_percent=3.0, rtt_ms=20.0)  # a rural line's usual loss...
    p.decide(4.2)
    assert p.decide(6.5) == "low"  # ...is no reason to stop the video
    p.observe_estimate(290_000, 6.6)
    p.observe_link(6.6, loss_percent=8.0, rtt_ms=20.0)  # real loss agrees with the estimate
    p.decide(6.6)
    assert p.decide(9.0) == "paused"
    assert "estimate" in p.reason
    # Paused: no video, so no estimate; the way back is a timed probe on a clean link.
    good_link(p, 8.0, 16.0)
    assert p.state == "paused"
    good_link(p, 18.0, 18.0)
    assert p.state == "low"
    assert p.ups == 1
    # The 300 kbps estimate of the paused time does not push the probe back down.
    p.observe_link(20.0, loss_percent=0.0, rtt_ms=20.0)
    assert p.decide(22.0) == "low"


def test_heavy_loss_on_the_low_layer_pauses_and_no_audio_means_no_pause() -> None:
    p = policy("low")
    for t in (0.0, 2.0, 4.0):
        p.observe_link(t, loss_percent=30.0, rtt_ms=20.0)
        p.decide(t)
    assert p.state == "paused"
    q = policy("low", allow_pause=False)
    for t in (0.0, 2.0, 4.0):
        q.observe_link(t, loss_percent=30.0, rtt_ms=20.0)
        q.decide(t)
        q.observe_estimate(100_000 - int(t) * 1000, t)
    assert q.state == "low"


def test_settings_follow_the_encoder() -> None:
    settings = LayerPolicySettings.for_encoder(
        EncoderSettings(bitrate_kbps=1800, low_bitrate_kbps=300), up_after_s=5.0
    )
    assert (settings.high_kbps, settings.low_kbps, settings.up_after_s) == (1800, 300, 5.0)


# -- the control and the REMB hook -------------------------------------------------------


def video_hub(width: int = 320, height: int = 240) -> FrameHub:
    config = CaptureConfig(
        video=VideoConfig(width=width, height=height, fps=15), audio=AudioConfig(frame_ms=20)
    )
    return FrameHub(open_video_source(config.video), config)


def test_control_moves_the_track_and_a_pin_overrides_the_policy() -> None:
    encoder = SharedH264Encoder(video_hub())
    track = encoder.track("peer")
    clock = [0.0]
    control = LayerControl(track, policy(down_after_s=0.0), encoder.layer_kbps, lambda: clock[0])
    control.on_estimate(3_000_000)
    clock[0] = 1.0
    control.on_estimate(1_000_000)
    assert control.state == "low"
    assert track.target == "low"  # at the low layer's next keyframe
    assert encoder.wanted_layers() == {"low"}  # waiting for its first keyframe anyway
    control.pin("paused")
    assert track.state == "paused"
    assert encoder.wanted_layers() == frozenset()
    control.pin(None)
    assert track.state == "low"
    assert control.describe()["layer"] == "low"
    track.stop()


def remb(bps: int, ssrcs: list[int]) -> RtcpPsfbPacket:
    return RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=4321, media_ssrc=0, fci=pack_remb_fci(bps, ssrcs))


async def test_a_receivers_remb_reaches_the_layer_policy() -> None:
    """aiortc reads REMB only for its own encoder's target bitrate; route_bitrate_estimates
    must see it (this fails if an aiortc upgrade moves _handle_rtcp_packet)."""
    encoder = SharedH264Encoder(video_hub())
    pc = new_peer_connection([])
    seen: list[int] = []
    try:
        track = encoder.track("peer")
        sender = pc.addTrack(track)
        route_bitrate_estimates(sender, seen.append)
        await sender._handle_rtcp_packet(remb(750_000, [sender._ssrc]))
        await sender._handle_rtcp_packet(remb(2_000_000, [sender._ssrc + 1]))  # not ours
        await sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=4321, media_ssrc=sender._ssrc)
        )
        await sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=4321, media_ssrc=0, fci=b"nope")
        )
        assert seen == [750_000]
        track.stop()
    finally:
        await pc.close()


def test_remb_hook_refuses_a_sender_without_the_private_method() -> None:
    with pytest.raises(RuntimeError, match="_handle_rtcp_packet"):
        route_bitrate_estimates(object(), lambda bps: None)


# -- real peers ------------------------------------------------------------------------


@dataclass
class Pictures:
    """What the receiving peer decoded: (width, height, stamp or None), audio frames."""

    video: list[tuple[int, int, int | None]] = field(default_factory=list)
    audio: int = 0

    def since(self, index: int) -> list[tuple[int, int, int | None]]:
        return self.video[index:]

    def count(self, size: tuple[int, int], after: int = 0) -> int:
        return sum(1 for w, h, n in self.since(after) if (w, h) == size and n is not None)


class RecordingSink:
    def __init__(self) -> None:
        self.pictures = Pictures()

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame: Any = await track.recv()
                if track.kind == "audio":
                    self.pictures.audio += 1
                    continue
                stamp = read_stamp(frame.to_ndarray(format="gray"))
                self.pictures.video.append(
                    (frame.width, frame.height, None if stamp is None else stamp.frame)
                )


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
async def test_a_peer_switches_layers_mid_stream_and_keeps_decoding() -> None:
    """Offerer receiving, answerer sending encode-once video and audio, on 127.0.0.1."""
    config = CaptureConfig(
        video=VideoConfig(width=640, height=480, fps=15), audio=AudioConfig(frame_ms=20)
    )
    video = FrameHub(open_video_source(config.video), config)
    audio = AudioHub(open_audio_source(config.audio), config)
    encoder = SharedH264Encoder(
        video, EncoderSettings(bitrate_kbps=800, low_bitrate_kbps=200, low_height=240)
    )
    ice = IceSettings(host_addresses=("127.0.0.1",))
    sink = RecordingSink()
    seen = sink.pictures
    receiver = PeerSession("school1.room1", "L1", ice, sink)
    sender = PeerSession(
        "school1.room2",
        "L1",
        ice,
        None,
        layer_policy=LayerPolicySettings(
            high_kbps=800, low_kbps=200, down_after_s=0.0, up_after_s=600.0
        ),
    )
    high, low = (640, 480), (320, 240)
    try:
        async with running(video.run(), audio.run(), encoder.run()):
            offer = await receiver.make_offer(None, None)
            await receiver.accept_answer(await sender.make_answer(offer, encoder, audio))
            control = sender.layers
            assert control is not None
            assert control.policy.settings.allow_pause  # it sends audio
            await eventually(lambda: seen.count(high) >= 10, within=30, what="high pictures")
            assert sender.describe()["layer"] == "high"

            # The receiver's estimate falls below the high layer: the policy steps down.
            rtp = sender.pc.getSenders()[0]
            assert rtp.track is control.track
            await rtp._handle_rtcp_packet(remb(3_000_000, [rtp._ssrc]))
            await rtp._handle_rtcp_packet(remb(400_000, [rtp._ssrc]))
            assert control.policy.state == "low"
            control.pin("low")  # from here on the test decides, not the live estimates
            mark = len(seen.video)
            await eventually(lambda: seen.count(low, mark) >= 10, within=30, what="low pictures")
            described = sender.describe()
            assert described["layer"] == "low"
            assert described["layer_switches"] >= 1

            # Paused: no pictures, while the audio keeps flowing.
            control.pin("paused")
            await eventually(lambda: encoder.wanted_layers() == frozenset(), what="idle layers")
            mark, audio_mark = len(seen.video), seen.audio
            read = video.stats().frames_read
            await eventually(lambda: video.stats().frames_read >= read + 15, what="1 s of camera")
            await eventually(lambda: seen.audio >= audio_mark + 25, within=20, what="audio")
            assert len(seen.video) <= mark + 3  # only what was in flight
            assert sender.describe()["layer"] == "paused"
            assert sender.describe()["layer_cause"] == "pinned"
            # Both ends say "audio only": the teacher's tile (layer paused) and the room,
            # whose sound still arrives while its picture stopped.
            await eventually(
                lambda: receiver.describe()["audio_only"], within=20, what="audio only"
            )

            # Back to the high layer, at a keyframe: the same decoder goes on.
            control.pin("high")
            mark = len(seen.video)
            await eventually(lambda: seen.count(high, mark) >= 10, within=30, what="high again")
            assert not receiver.describe()["audio_only"]
            # aiortc's receiver sends real REMB once its estimate has settled (~3 s).
            await eventually(
                lambda: control.policy.describe()["estimate_kbps"] is not None,
                within=30,
                what="a real REMB from the receiver",
            )
    finally:
        await receiver.close()
        await sender.close()
    stamps = [n for _, _, n in seen.video if n is not None]
    sizes = [(w, h) for w, h, _ in seen.video]
    assert high in sizes
    assert low in sizes
    assert sizes.index(low) > sizes.index(high)
    # Every picture decoded and read (the stamp survives the low layer), in order.
    assert len(stamps) == len(seen.video)
    assert stamps == sorted(stamps)
    switch = sizes.index(low)
    assert stamps[switch] > stamps[switch - 1]
