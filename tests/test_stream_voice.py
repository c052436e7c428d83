"""Speech Opus and RED (agent/stream/voice.py): the payload format, the decoder's
repair, real aiortc peers negotiating it (or declining it, as a browser offering plain
Opus first does), and Debian's Chromium getting plain speech Opus and decoding it."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import AudioHub, open_audio_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import LinkTuning
from agent.stream.ice import gather
from agent.stream.peer import IceSettings, PeerSession
from agent.stream.voice import (
    FRAME_SAMPLES,
    OPUS_TIME_BASE,
    RedDecoder,
    RedPacker,
    VoiceEncoder,
    VoiceSettings,
    decline_red,
    pack_red,
    parse_red,
    sent_audio_codec,
)
from agent.testkit.impair import LinkImpairment, impaired
from tests.brokers import eventually

SMALL = CaptureConfig(
    video=VideoConfig(width=160, height=120, fps=10), audio=AudioConfig(source="synthetic")
)
ICE = IceSettings(host_addresses=("127.0.0.1",))


def tone(index: int, samples: int = FRAME_SAMPLES) -> av.AudioFrame:
    """20 ms of a 440 Hz tone at 48 kHz, mono, with the pts of frame ``index``."""
    t = (np.arange(samples) + index * samples) / 48_000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    frame.pts = index * samples
    frame.time_base = fractions.Fraction(1, 48_000)
    return frame


def encode(count: int, settings: VoiceSettings | None = None) -> list[av.Packet]:
    encoder = VoiceEncoder(settings or VoiceSettings())
    packets: list[av.Packet] = []
    for i in range(count):
        packets += encoder.encode(tone(i))
    return packets


# -- the encoder and the payload format --------------------------------------------------------


def test_voice_encoder_sends_mono_speech_opus_at_its_bitrate() -> None:
    packets = encode(100)  # 2 s
    assert len(packets) >= 98
    kbps = sum(p.size for p in packets[5:]) * 8 / 1000 / ((len(packets) - 5) * 0.02)
    assert 20 <= kbps <= 40, kbps  # 32 kbit/s asked; aiortc's default is 96
    toc = bytes(packets[10])[0]
    assert not toc & 0x04, hex(toc)  # the TOC byte's stereo flag: mono (RFC 6716 3.1)
    # One packet per 20 ms frame, stamped with the frame it came from.
    assert [p.pts for p in packets[:5]] == [i * FRAME_SAMPLES for i in range(5)]


def test_voice_encoder_keeps_the_tracks_gaps() -> None:
    encoder = VoiceEncoder(VoiceSettings())
    pts: list[int] = []
    for i in [*range(5), *range(8, 12)]:  # frames 5-7 never reached the track
        pts += [int(p.pts) for p in encoder.encode(tone(i))]
    assert 8 * FRAME_SAMPLES in pts
    assert all(b > a for a, b in itertools.pairwise(pts))


def test_red_payload_round_trips() -> None:
    payload = pack_red(b"primary", 3 * 960, [(960, b"one"), (1920, b"two")], 96)
    blocks = parse_red(payload)
    assert [(b.offset, b.payload_type, b.data) for b in blocks] == [
        (1920, 96, b"one"),
        (960, 96, b"two"),
        (0, 96, b"primary"),
    ]
    # No history: one header byte, then the primary.
    assert pack_red(b"x", 0, [], 96) == bytes([96]) + b"x"


def test_red_leaves_out_what_its_header_cannot_say() -> None:
    too_old = (0, b"old")  # 20000 samples back: more than 14 bits
    too_big = (19_040, b"b" * 1100)  # longer than 10 bits
    blocks = parse_red(pack_red(b"p", 20_000, [too_old, too_big, (19_040, b"ok")], 96))
    assert [b.data for b in blocks] == [b"ok", b"p"]


@pytest.mark.parametrize(
    "payload",
    [b"", bytes([0x80 | 96, 0, 0]), bytes([0x80 | 96, 0x00, 0x3C, 0x0A]) + b"short"],
)
def test_malformed_red_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="RED"):
        parse_red(payload)


def red_frames(count: int) -> list[tuple[int, bytes]]:
    """``count`` RED payloads of a tone as our sender makes them: (timestamp, payload)."""
    packer = RedPacker()
    out: list[tuple[int, bytes]] = []
    for packet in encode(count):
        payloads, timestamp = packer.pack(packet)
        out.append((timestamp, payloads[0]))
    return out


def test_red_decoder_rebuilds_lost_packets_from_the_next_ones() -> None:
    stream = red_frames(30)
    lost = {10, 20, 21}  # one loss, then two in a row (RED carries two earlier frames)
    decoder = RedDecoder()
    pts: list[int] = []
    for index, (timestamp, payload) in enumerate(stream):
        if index in lost:
            continue
        for frame in decoder.decode(JitterFrame(data=payload, timestamp=timestamp)):
            pts.append(int(frame.pts))
    assert decoder.recovered == 3
    assert pts == [ts for ts, _ in stream]  # every frame, in order, none twice
    # A payload that is not RED is counted and skipped, not a crash of the decoder thread.
    assert decoder.decode(JitterFrame(data=b"", timestamp=99_999)) == []
    assert decoder.malformed == 1


def test_sent_audio_codec_reads_the_answer() -> None:
    sdp = (
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 H264/90000\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=rtpmap:111 opus/48000/2\r\n"
        "a=rtpmap:63 red/48000/2\r\n"
    )
    assert sent_audio_codec(sdp) == "opus"
    assert sent_audio_codec(sdp, ["red", "opus"]) == "red"
    assert sent_audio_codec("v=0\r\nm=video 9 RTP 97\r\n") is None


def test_red_is_declined_unless_it_is_ours() -> None:
    ours = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 63 96\r\na=rtpmap:63 red/48000/2\r\n"
        "a=fmtp:63 96/96\r\na=rtpmap:96 opus/48000/2\r\nm=video 9 RTP 97\r\n"
    )
    assert decline_red(ours, accept=True) == ours
    declined = decline_red(ours, accept=False)
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\n" in declined
    assert "red" not in declined
    assert "a=fmtp:63" not in declined
    assert declined.endswith("m=video 9 RTP 97\r\n")
    browser = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\na=rtpmap:63 red/48000/2\r\n"
        "a=fmtp:63 111/111\r\na=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\n"
    )
    assert sent_audio_codec(decline_red(browser, accept=True)) == "opus"
    plain = "v=0\r\nm=audio 9 RTP 96\r\na=rtpmap:96 opus/48000/2\r\n"
    assert decline_red(plain, accept=True) == plain


# -- real peers ---------------------------------------------------------------------------------


@dataclass
class AudioProbe:
    """Received audio: pts jumps are lost audio."""

    frames: int = 0
    missing_ms: float = 0.0
    measuring: bool = False
    last_pts: int | None = None
    arrivals: list[float] = field(default_factory=list)

    async def consume(self, source: str, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame: Any = await track.recv()
                if track.kind != "audio":
                    continue
                if self.measuring and self.last_pts is not None:
                    self.frames += 1
                    jump = frame.pts - self.last_pts
                    if jump > 1.5 * frame.samples:
                        self.missing_ms += 1000 * (jump - frame.samples) / frame.sample_rate
                self.last_pts = frame.pts
        except MediaStreamError:
            return


async def _lesson_audio(
    tuning: LinkTuning, loss: float, frames: int
) -> tuple[PeerSession, AudioProbe, int]:
    """A receiving room (offerer, ``tuning``) hearing a main room (answerer, defaults)
    through an in-process lossy link; returns the main room's session (closed), the
    probe and the datagrams the link dropped while measuring."""
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    hub_task = asyncio.create_task(hub.run(), name="test-audio-hub")
    probe = AudioProbe()
    receiver = PeerSession("main.room", "lesson-1", ICE, probe, tuning=tuning)
    sender = PeerSession("rural.room", "lesson-1", ICE, None)
    try:
        with impaired(LinkImpairment(delay_ms=40, loss=loss, seed=5)) as link:
            offer = await receiver.make_offer(None, None)
            answer = await sender.make_answer(offer, None, hub)
            await receiver.accept_answer(answer)
            assert await receiver.wait_connected(timeout=30)
            await eventually(lambda: probe.last_pts is not None, within=30, what="audio")
            probe.measuring = True
            lost_before = link.counters.dropped_loss
            await eventually(lambda: probe.frames >= frames, within=60, what="audio frames")
            probe.measuring = False
            dropped = link.counters.dropped_loss - lost_before
    finally:
        await receiver.close()
        await sender.close()
        hub_task.cancel()
        await asyncio.gather(hub_task, return_exceptions=True)
    return sender, probe, dropped


async def test_red_is_negotiated_between_our_rooms_and_repairs_loss() -> None:
    """Each datagram crosses the shim twice (both peers in this process): ~10 % loss on
    the audio. With RED, missing audio is a small part of what the network lost."""
    sender, probe, dropped = await _lesson_audio(LinkTuning(), 0.05, 300)
    assert sender.audio_codec == "red"
    assert sender.describe()["audio_codec"] == "red"
    assert dropped > 10, dropped  # the link really lost packets while we listened
    lost_audio_ms = probe.missing_ms
    # Without repair every lost audio packet is 20 ms missing (test_stream_jitter); two
    # frames of redundancy leave only runs of three or more losses.
    assert lost_audio_ms < 0.25 * dropped * 20, (lost_audio_ms, dropped)


async def test_without_red_the_room_gets_plain_opus_and_loses_what_the_link_loses() -> None:
    sender, probe, dropped = await _lesson_audio(LinkTuning(VoiceSettings(red=False)), 0.05, 300)
    assert sender.audio_codec == "opus"
    assert dropped > 10
    assert probe.missing_ms > 0  # nothing repairs it: the control for the test above


async def test_an_offer_without_red_first_gets_plain_opus() -> None:
    """What a browser does (Chromium lists Opus before RED, Firefox has no RED): the main
    room answers with plain speech Opus, which the browser-like aiortc peer decodes."""
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    hub_task = asyncio.create_task(hub.run(), name="test-audio-hub")
    browser = RTCPeerConnection()
    sender = PeerSession("viewer", "lesson-1", ICE, None)
    frames: list[Any] = []

    async def listen(track: MediaStreamTrack) -> None:
        try:
            while True:
                frames.append(await track.recv())
        except MediaStreamError:
            return

    tasks: list[asyncio.Task[None]] = []
    browser.on("track", lambda track: tasks.append(asyncio.create_task(listen(track))))
    try:
        audio = browser.addTransceiver("audio", direction="recvonly")
        codecs = RTCRtpSender.getCapabilities("audio").codecs
        opus_first = sorted(codecs, key=lambda c: c.mimeType.lower() != "audio/opus")
        audio.setCodecPreferences(opus_first)  # RED offered, but after Opus
        await gather(browser, await browser.createOffer(), ["127.0.0.1"])
        assert "red/48000" in browser.localDescription.sdp
        answer = await sender.make_answer(browser.localDescription.sdp, None, hub)
        assert sender.audio_codec == "opus"
        await browser.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await eventually(lambda: len(frames) >= 20, within=30, what="decoded audio")
    finally:
        await browser.close()
        await sender.close()
        for task in tasks:
            task.cancel()
        hub_task.cancel()
        await asyncio.gather(hub_task, *tasks, return_exceptions=True)
    assert frames[-1].sample_rate == 48_000
    assert frames[-1].time_base == OPUS_TIME_BASE


async def test_baseline_rooms_offer_no_red() -> None:
    session = PeerSession("main.room", "lesson-1", ICE, None, tuning=LinkTuning.baseline())
    try:
        offer = await session.make_offer(None, None)
    finally:
        await session.close()
    assert "red/48000" not in offer
    assert "opus/48000" in offer


# -- Chromium ----------------------------------------------------------------------------------

CHROMIUM_LISTENS = """async (redFirst) => {
  const pc = new RTCPeerConnection();
  window.pc = pc;
  pc.ontrack = (event) => {  // played, so Chromium decodes what arrives
    const element = new Audio();
    element.srcObject = new MediaStream([event.track]);
    element.play();
    window.player = element;
  };
  const audio = pc.addTransceiver('audio', {direction: 'recvonly'});
  if (redFirst) {
    const codecs = RTCRtpReceiver.getCapabilities('audio').codecs;
    audio.setCodecPreferences([
      ...codecs.filter((c) => c.mimeType.toLowerCase() === 'audio/red'),
      ...codecs.filter((c) => c.mimeType.toLowerCase() !== 'audio/red'),
    ]);
  }
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === 'complete') return done();
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') done();
    });
  });
  return pc.localDescription.sdp;
}"""

CHROMIUM_HEARS = """async () => {
  const stats = await window.pc.getStats();
  let heard = null;
  stats.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio' && s.packetsReceived > 50) {
      const codec = stats.get(s.codecId);
      heard = {packets: s.packetsReceived, samples: s.totalSamplesReceived,
               codec: codec ? codec.mimeType : null};
    }
  });
  return heard;
}"""


@pytest.mark.slow
@pytest.mark.parametrize("red_first", [False, True], ids=["chromium-offer", "red-first"])
async def test_chromium_gets_plain_opus_and_plays_it(red_first: bool) -> None:
    """Chromium offers Opus before RED: the main room sends it plain speech Opus, which
    it decodes. A page that puts RED first is declined too (our RED blocks name aiortc's
    Opus payload type, not the browser's): RED is for our rooms only."""
    from tests.browsers import CHROMIUM, chromium

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium")
    hub = AudioHub(open_audio_source(SMALL.audio), SMALL)
    hub_task = asyncio.create_task(hub.run(), name="test-audio-hub")
    main = PeerSession("viewer", "lesson-1", ICE, None)
    try:
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto("about:blank")
            offer = await page.evaluate(CHROMIUM_LISTENS, red_first)
            assert "red/48000" in offer
            answer = await main.make_answer(offer, None, hub)
            assert main.audio_codec == "opus"
            assert "red/48000" not in answer.split("m=audio", 1)[1]
            await page.evaluate(
                "(sdp) => window.pc.setRemoteDescription({type: 'answer', sdp: sdp})", answer
            )
            heard: dict[str, Any] | None = None
            deadline = time.monotonic() + 30
            while heard is None and time.monotonic() < deadline:
                heard = await page.evaluate(CHROMIUM_HEARS)
                if heard is None:
                    await asyncio.sleep(0.1)
            await page.evaluate("window.pc.close()")
    finally:
        await main.close()
        hub_task.cancel()
        await asyncio.gather(hub_task, return_exceptions=True)
    assert heard is not None, "Chromium received no audio"
    assert heard["codec"] == "audio/opus"
    assert heard["samples"] > 0  # decoded, not only received
