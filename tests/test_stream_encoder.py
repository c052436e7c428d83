"""The encode-once encoder, its per-peer tracks, the keyframe hook, audio, ICE addresses.

Real capture hubs on the synthetic sources (small: 320x240@15) and real libx264; the
packets are decoded again with PyAV to prove what a receiver would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCSessionDescription
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket

from agent.capture import (
    AudioHub,
    Frame,
    FrameHub,
    Stamp,
    draw_stamp,
    open_audio_source,
    open_video_source,
    read_stamp,
)
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import (
    EncodedVideoTrack,
    EncoderSettings,
    HubAudioTrack,
    SharedH264Encoder,
    route_keyframe_requests,
)
from agent.stream.controls import MediaControls
from agent.stream.encoder import low_layer_size
from agent.stream.ice import gather, new_peer_connection
from agent.stream.peer import h264_preferences
from agent.stream.sinks import ProbeSink
from tests.brokers import eventually

SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)
# Twice the stamp's smallest block: the low layer (half size) still carries a readable one.
MEDIUM = CaptureConfig(
    video=VideoConfig(width=640, height=480, fps=15), audio=AudioConfig(frame_ms=20)
)
TWO_LAYERS = EncoderSettings(bitrate_kbps=800, low_bitrate_kbps=200, low_height=240)


def next_stamped_image(width: int, height: int) -> Any:
    """A grey picture with the capture stamp the synthetic camera draws."""
    image = np.full((height, width, 3), 128, np.uint8)
    draw_stamp(image, Stamp(frame=7, time_ns=123))
    return image


@contextlib.asynccontextmanager
async def tasks(*coros: Any) -> AsyncIterator[None]:
    running = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def take(track: EncodedVideoTrack, count: int, within: float = 20.0) -> list[Any]:
    async with asyncio.timeout(within):
        return [await track.recv() for _ in range(count)]


def decode(packets: list[Any]) -> list[Any]:
    """Decode packets with a fresh H.264 decoder, as a newly joined receiver would."""
    decoder = av.CodecContext.create("h264", "r")
    frames = []
    for packet in packets:
        frames += decoder.decode(av.Packet(bytes(packet)))
    return frames


def video_hub(config: CaptureConfig = SMALL) -> FrameHub:
    return FrameHub(open_video_source(config.video), config)


def pictures(packets: list[Any]) -> list[tuple[int, int, int | None]]:
    """(width, height, stamped frame number or None) of each decoded picture."""
    out = []
    for frame in decode(packets):
        stamp = read_stamp(frame.to_ndarray(format="gray"))
        out.append((frame.width, frame.height, None if stamp is None else stamp.frame))
    return out


@pytest.mark.slow
async def test_one_encode_per_frame_fans_out_to_every_track() -> None:
    hub = video_hub()
    encoder = SharedH264Encoder(hub, EncoderSettings(bitrate_kbps=400))
    async with tasks(hub.run(), encoder.run()):
        tracks = [encoder.track(f"peer{i}") for i in range(3)]
        received = await asyncio.gather(*(take(t, 20) for t in tracks))
        stats = encoder.stats()
        for track in tracks:
            track.stop()
    # One encode per frame, however many peers: each encode made one packet, and every
    # track got the very same packet objects.
    assert stats.frames_encoded == stats.packets
    assert stats.frames_encoded <= hub.stats().frames_read
    assert stats.frames_encoded < 2 * 20 + 10
    first = [r[0] for r in received]
    assert all(p.is_keyframe for p in first)
    common = (
        {id(p) for p in received[0]} & {id(p) for p in received[1]} & {id(p) for p in received[2]}
    )
    assert len(common) >= 15
    for packets in received:
        assert all(p.time_base == fractions.Fraction(1, 90_000) for p in packets)
        pts = [p.pts for p in packets]
        assert pts == sorted(pts)
        assert len(set(pts)) == len(pts)
        # 15 fps in 90 kHz: about 6000 ticks a frame (more where the encoder skipped).
        assert 4000 <= (pts[-1] - pts[0]) / (len(pts) - 1) <= 20_000
    frames = decode(received[0])
    stamps = [read_stamp(f.to_ndarray(format="gray")) for f in frames]
    numbers = [s.frame for s in stamps if s is not None]
    assert len(numbers) >= 15
    assert numbers == sorted(numbers)
    assert encoder.track_count == 0


@pytest.mark.slow
async def test_late_track_starts_at_a_forced_keyframe() -> None:
    hub = video_hub()
    # Natural keyframes only every 60 s: the late track can only start because joining
    # forces one.
    encoder = SharedH264Encoder(hub, EncoderSettings(bitrate_kbps=400, keyframe_interval_s=60))
    async with tasks(hub.run(), encoder.run()):
        early = encoder.track("early")
        await take(early, 20)
        forced_before = encoder.forced_keyframes
        late = encoder.track("late")
        drain = asyncio.create_task(take(early, 1000, within=60))
        try:
            packets = await take(late, 10, within=10)
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        early.stop()
        late.stop()
    assert packets[0].is_keyframe
    assert encoder.forced_keyframes == forced_before + 1
    frames = decode(packets)
    assert len(frames) == len(packets)  # every packet decodes, from the first one
    stamps = [read_stamp(f.to_ndarray(format="gray")) for f in frames]
    assert all(s is not None for s in stamps)
    numbers = [s.frame for s in stamps if s is not None]
    assert numbers == sorted(numbers)
    assert numbers[-1] > numbers[0]


@pytest.mark.slow
async def test_slow_track_drops_to_next_keyframe_and_never_stalls_others() -> None:
    hub = video_hub()
    encoder = SharedH264Encoder(
        hub, EncoderSettings(bitrate_kbps=400, keyframe_interval_s=1.0), track_queue=5
    )
    async with tasks(hub.run(), encoder.run()):
        fast = encoder.track("fast")
        slow = encoder.track("slow")  # never read until the end
        packets = await take(fast, 30)
        await eventually(lambda: slow.overflows >= 1, within=20, what="the slow track to overflow")
        assert fast.overflows == 0
        assert fast.dropped == 0
        # Once it reads again, the slow peer gets a clean start: a keyframe first.
        await eventually(lambda: slow.stats().queued > 0, within=20, what="a new keyframe")
        first = await slow.recv()
        fast.stop()
        slow.stop()
    assert first.is_keyframe
    assert slow.dropped > 0
    assert len(packets) == 30
    assert encoder.frames_encoded >= 30


async def test_pli_and_fir_from_a_receiver_reach_the_shared_encoder() -> None:
    """aiortc answers PLI/FIR through RTCRtpSender._send_keyframe; the wrapper in
    route_keyframe_requests must see both (this fails if an aiortc upgrade moves it)."""
    hub = video_hub()
    encoder = SharedH264Encoder(hub)
    pc = new_peer_connection([])
    try:
        track = encoder.track("peer")
        sender = pc.addTrack(track)
        route_keyframe_requests(sender, encoder.request_keyframe)
        requests = encoder.keyframe_requests
        for fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            await sender._handle_rtcp_packet(
                RtcpPsfbPacket(fmt=fmt, ssrc=1234, media_ssrc=sender._ssrc)
            )
        assert encoder.keyframe_requests == requests + 2
        track.stop()
    finally:
        await pc.close()


def test_keyframe_hook_refuses_a_sender_without_the_private_method() -> None:
    with pytest.raises(RuntimeError, match="_send_keyframe"):
        route_keyframe_requests(object(), lambda: None)


async def test_audio_track_gives_s16_frames_with_sample_accurate_pts() -> None:
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    async with tasks(hub.run()):
        track = HubAudioTrack(hub, "peer")
        async with asyncio.timeout(10):
            frames = [await track.recv() for _ in range(10)]
        track.stop()
    assert all(f.format.name == "s16" and f.sample_rate == 48_000 for f in frames)
    assert all(f.samples == 960 for f in frames)
    assert [f.pts for f in frames] == [frames[0].pts + 960 * i for i in range(10)]
    assert frames[0].time_base == fractions.Fraction(1, 48_000)


async def test_gather_offers_only_the_configured_host_addresses() -> None:
    pc = new_peer_connection([])
    try:
        pc.addTransceiver("audio", direction="recvonly")
        await gather(pc, await pc.createOffer(), ["127.0.0.1"])
        sdp = pc.localDescription.sdp
    finally:
        await pc.close()
    candidates = [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
    assert candidates
    assert all(" 127.0.0.1 " in c for c in candidates)
    assert "srflx" not in sdp  # no STUN server was contacted
    # Outside gather() aioice answers as before: never the loopback address.
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)


@pytest.mark.slow
async def test_encoder_peer_to_peer_on_loopback_decodes_stamped_frames() -> None:
    """Two real aiortc peers: the packet path through RTP/SRTP and aiortc's decoder."""
    hub = video_hub()
    encoder = SharedH264Encoder(hub, EncoderSettings(bitrate_kbps=400))
    probe = ProbeSink()
    receiver, sender = new_peer_connection([]), new_peer_connection([])
    sinks: list[asyncio.Task[None]] = []
    receiver.on(
        "track", lambda track: sinks.append(asyncio.create_task(probe.consume("main", track)))
    )
    try:
        async with tasks(hub.run(), encoder.run()):
            receiver.addTransceiver("video", direction="recvonly").setCodecPreferences(
                h264_preferences()
            )
            await gather(receiver, await receiver.createOffer(), ["127.0.0.1"])
            await sender.setRemoteDescription(receiver.localDescription)
            route_keyframe_requests(sender.addTrack(encoder.track("r")), encoder.request_keyframe)
            await gather(sender, await sender.createAnswer(), ["127.0.0.1"])
            answer = sender.localDescription
            await receiver.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
            stats = probe.stats("main")
            await eventually(lambda: stats.advanced >= 15, within=30, what="15 stamped frames")
    finally:
        await receiver.close()
        await sender.close()
        for task in sinks:
            task.cancel()
        await asyncio.gather(*sinks, return_exceptions=True)
    assert stats.backwards == 0
    assert stats.latency_ms(0.5) is not None


class FlakyEncoder(SharedH264Encoder):
    """Fails the 5th encode, as a corrupt frame or a driver hiccup would."""

    calls = 0

    def _encode(self, frame: Any, plan: Any) -> Any:
        self.calls += 1
        if self.calls == 5:
            raise av.error.InvalidDataError(1094995529, "bad frame")
        return super()._encode(frame, plan)


@pytest.mark.slow
async def test_one_failed_encode_reopens_the_encoder_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = video_hub()
    encoder = FlakyEncoder(hub, EncoderSettings(bitrate_kbps=400, keyframe_interval_s=60))
    async with tasks(hub.run(), encoder.run()):
        track = encoder.track("peer")
        packets = await take(track, 15)
        track.stop()
    assert "H.264 encode failed" in caplog.text
    assert encoder.resets == 2
    # The reopened encoder starts with a keyframe, so the stream stays decodable.
    assert sum(p.is_keyframe for p in packets) == 2
    assert len(decode(packets)) == len(packets)


def test_odd_frame_sizes_are_cropped_to_what_420_allows() -> None:
    encoder = SharedH264Encoder(video_hub(), EncoderSettings(low_height=120))
    image = np.zeros((241, 321, 3), np.uint8)
    packets = encoder._encode(Frame(image, 0, 0, 0), {"high": False, "low": False})
    frames = decode(packets["high"])
    assert (frames[0].width, frames[0].height) == (320, 240)
    # The low layer keeps the aspect with even sizes: 240 -> 120 lines, 320 -> 160 columns.
    low = decode(packets["low"])
    assert (low[0].width, low[0].height) == (160, 120)


def test_the_floor_layer_is_the_smallest_and_keeps_the_stamp() -> None:
    """stream.link.floor_layer: a third encoding below the low layer, for lines that
    cannot carry the low one; the receiving room still reads the capture stamp."""
    settings = EncoderSettings(
        low_height=360, floor_enabled=True, floor_height=180, floor_bitrate_kbps=150
    )
    encoder = SharedH264Encoder(video_hub(), settings)
    image = next_stamped_image(1280, 720)
    packets = encoder._encode(Frame(image, 7, 0, 0), {"floor": True})
    assert set(packets) == {"floor"}  # only what the plan asked for: no high, no low
    (floor,) = decode(packets["floor"])
    assert (floor.width, floor.height) == (320, 180)
    assert read_stamp(floor.to_ndarray(format="gray")) is not None
    assert settings.layer_kbps("floor") == 150


def test_low_layer_size_keeps_aspect_even_and_never_upscales() -> None:
    assert low_layer_size(1280, 720, 360) == (640, 360)
    assert low_layer_size(1920, 1080, 360) == (640, 360)
    assert low_layer_size(640, 480, 240) == (320, 240)
    assert low_layer_size(320, 240, 360) == (320, 240)  # already small: bitrate only
    assert low_layer_size(1280, 720, 241) == (426, 240)


# -- the low layer ---------------------------------------------------------------------


@pytest.mark.slow
async def test_low_layer_is_encoded_only_while_a_track_is_on_it() -> None:
    hub = video_hub(MEDIUM)
    encoder = SharedH264Encoder(hub, TWO_LAYERS)
    async with tasks(hub.run(), encoder.run()):
        high = encoder.track("high")
        await take(high, 10)
        assert encoder.wanted_layers() == {"high"}
        assert encoder._codecs["low"].frames == 0  # nobody on it: no CPU spent
        low = encoder.track("low", layer="low")
        drain = asyncio.create_task(take(high, 1000, within=60))
        try:
            low_packets = await take(low, 20)
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        assert encoder.wanted_layers() == {"high", "low"}
        low.stop()
        stopped_at = encoder._codecs["low"].frames
        more = await take(high, 15)
        stats = encoder.stats()
        high.stop()
    # At most the frame being encoded when the track left went to the low layer.
    assert encoder._codecs["low"].frames <= stopped_at + 1
    layers = {layer.name: layer for layer in stats.layers}
    assert (layers["high"].width, layers["high"].height) == (640, 480)
    assert (layers["low"].width, layers["low"].height) == (320, 240)
    assert not layers["low"].active
    assert low_packets[0].is_keyframe
    seen = pictures(low_packets)
    assert len(seen) == len(low_packets)
    assert {(w, h) for w, h, _ in seen} == {(320, 240)}
    # The stamp survives the halving: the receiving room can still measure latency.
    numbers = [n for _, _, n in seen if n is not None]
    assert len(numbers) >= 15
    assert numbers == sorted(numbers)
    assert len(more) == 15  # the high track never noticed


@pytest.mark.slow
async def test_a_track_switches_layer_at_a_keyframe_in_one_decodable_stream() -> None:
    hub = video_hub(MEDIUM)
    # No scheduled keyframe in the test's time: each switch must request its own.
    settings = EncoderSettings(
        bitrate_kbps=800, low_bitrate_kbps=200, low_height=240, keyframe_interval_s=60
    )
    encoder = SharedH264Encoder(hub, settings)
    async with tasks(hub.run(), encoder.run()):
        track = encoder.track("peer")
        packets = await take(track, 10)
        track.switch("low")
        assert track.target == "low"
        packets += await take(track, 15)
        assert track.layer == "low"
        assert encoder.wanted_layers() == {"low"}  # the high layer is idle again
        track.switch("high")
        packets += await take(track, 15)
        track.stop()
    assert track.switches == 2
    # One decoder for the whole track, as the receiver has: every packet decodes.
    seen = pictures(packets)
    assert len(seen) == len(packets)
    sizes = [(w, h) for w, h, _ in seen]
    assert sizes[0] == (640, 480)
    assert (320, 240) in sizes
    assert sizes[-1] == (640, 480)
    # The size changes exactly twice (at the two IDRs), and the pictures go on in order.
    assert sum(a != b for a, b in itertools.pairwise(sizes)) == 2
    changes = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    assert all(packets[i].is_keyframe for i in changes)
    numbers = [n for _, _, n in seen if n is not None]
    assert len(numbers) == len(seen)
    assert numbers == sorted(numbers)
    assert len(set(numbers)) == len(numbers)  # never two pictures of one frame
    pts = [p.pts for p in packets]
    assert pts == sorted(pts)
    assert len(set(pts)) == len(pts)


@pytest.mark.slow
async def test_paused_track_gets_nothing_and_resumes_at_a_keyframe() -> None:
    hub = video_hub(MEDIUM)
    encoder = SharedH264Encoder(hub, TWO_LAYERS)
    async with tasks(hub.run(), encoder.run()):
        track = encoder.track("peer")
        await take(track, 5)
        track.pause()
        assert track.state == "paused"
        assert encoder.wanted_layers() == frozenset()
        encoded = encoder.frames_encoded
        read = hub.stats().frames_read
        await eventually(lambda: hub.stats().frames_read >= read + 10, what="10 camera frames")
        assert encoder.frames_encoded <= encoded + 1  # nothing encoded for nobody
        assert track.stats().queued == 0
        track.resume("low")
        packets = await take(track, 10)
        track.stop()
    assert packets[0].is_keyframe
    assert {(w, h) for w, h, _ in pictures(packets)} == {(320, 240)}


# -- mute ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_muted_camera_sends_a_slate_at_a_low_rate_and_never_a_camera_frame() -> None:
    hub = video_hub()
    controls = MediaControls(camera_muted=True)
    encoder = SharedH264Encoder(
        hub, EncoderSettings(bitrate_kbps=400, keyframe_interval_s=60), controls=controls
    )
    async with tasks(hub.run(), encoder.run()):
        track = encoder.track("peer")
        muted = await take(track, 3)
        read = hub.stats().frames_read
        await eventually(lambda: hub.stats().frames_read >= read + 30, what="2 s of camera")
        assert encoder.slate_frames <= 3 + 2 * 3  # 2 fps, not the camera's 15
        assert encoder.frames_encoded == encoder.slate_frames
        while track.stats().queued:
            muted.append(await track.recv())
        controls.set(camera_muted=False)
        unmuted = await take(track, 12)
        controls.set(camera_muted=True)
        remuted = await take(track, 2)
        track.stop()
    slate = decode(muted)
    assert len(slate) == len(muted)
    for frame in slate:
        gray = frame.to_ndarray(format="gray")
        assert (frame.width, frame.height) == (320, 240)
        assert read_stamp(gray) is None
        assert gray.mean() < 60  # dark, with a little light text
        assert gray.max() > 150
    # One decoder over the whole track: the camera starts at a keyframe after the unmute
    # (a slate encode under way at that moment may come first), and the slate starts at
    # one after muting again, with no camera picture in between.
    packets = muted + unmuted + remuted
    stamped = [n is not None for _, _, n in pictures(packets)]
    assert len(stamped) == len(packets)
    first_camera = stamped.index(True)
    assert first_camera >= len(muted)
    assert packets[first_camera].is_keyframe
    last_camera = len(stamped) - 1 - stamped[::-1].index(True)
    assert all(stamped[first_camera : last_camera + 1])
    assert last_camera < len(packets) - 1
    assert packets[last_camera + 1].is_keyframe
    assert encoder.forced_keyframes >= 2


async def test_muted_microphone_sends_silence_with_continuous_pts() -> None:
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    controls = MediaControls()
    async with tasks(hub.run()):
        track = HubAudioTrack(hub, "peer", controls)
        async with asyncio.timeout(10):
            before = [await track.recv() for _ in range(5)]
            controls.set(microphone_muted=True)
            during = [await track.recv() for _ in range(5)]
            controls.set(microphone_muted=False)
            after = [await track.recv() for _ in range(5)]
        track.stop()
    frames = before + during + after
    assert all(np.any(f.to_ndarray()) for f in before + after)  # the synthetic tone
    assert all(not np.any(f.to_ndarray()) for f in during)
    assert all(f.samples == 960 for f in during)
    assert [f.pts for f in frames] == [frames[0].pts + 960 * i for i in range(15)]
    assert track.silenced == 5
