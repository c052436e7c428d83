"""Lesson audio that survives a lossy rural line: speech Opus and RED (RFC 2198).

aiortc sends Opus at 96 kbit/s stereo with no redundancy, so a receiving room loses
exactly the audio the network loses, and on a 1 Mbit/s line the audio alone takes a
tenth of it. A lesson is one voice at a time, so:

* **Speech Opus** (:class:`VoiceEncoder`): mono, ``bitrate_kbps`` (32 by default),
  ``application=voip``, in-band FEC on with libopus told to expect
  ``expected_loss_percent``. Encoded by :class:`~agent.stream.audio.HubAudioTrack` on a
  worker thread (one encoder per peer, as aiortc does: Opus is cheap), which then hands
  aiortc packets instead of frames.
* **RED** (``audio/red``, RFC 2198, what Chromium calls Opus redundancy): every packet
  also carries the previous ``red_distance`` frames, so a receiver that lost one or two
  packets rebuilds them from the next one. A receiver asks for it by putting
  ``audio/red`` first in its offer (our rooms do when ``stream.link.red`` is on); an
  offer without it (or with plain Opus first, as Chromium's) gets plain Opus, so a
  browser never sees RED it did not ask for.

PyAV's libopus decoder cannot decode the FEC copy carried in the *next* packet (it has
no ``decode_fec`` call), so the loss repair our receivers do is RED: :class:`RedDecoder`
(aiortc's decoder interface) takes each RED payload in sequence order and decodes first
the redundant frames whose timestamps it has not decoded yet (the holes left by lost
packets), then the primary one. In-band FEC still helps a browser receiver, whose
libopus does use it.

aiortc knows neither the RED codec nor our encoder: :func:`agent.stream.hooks.install_red`
adds ``audio/red`` to its codec table and makes its senders and receivers use
:class:`RedPacker` / :class:`RedDecoder` for it (private API, kept in hooks.py).
"""

from __future__ import annotations

import fractions
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
from aiortc import RTCRtpSender

from agent.stream import hooks

if TYPE_CHECKING:
    from agent.config import LinkConfig

log = logging.getLogger(__name__)

OPUS_CLOCK_HZ = 48_000
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_CLOCK_HZ)
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: one Opus frame, one RTP packet
OPUS_PAYLOAD_TYPE = 96  # aiortc's Opus payload type: what our RED blocks name
RED_DISTANCE = 2  # earlier frames carried in each packet: two losses in a row are rebuilt
MAX_TS_OFFSET = (1 << 14) - 1  # RFC 2198: 14-bit timestamp offset
MAX_BLOCK_BYTES = (1 << 10) - 1  # RFC 2198: 10-bit block length


@dataclass(frozen=True, slots=True)
class VoiceSettings:
    """How a room sends its microphone. ``voice``: speech Opus (mono, ``bitrate_kbps``,
    in-band FEC) instead of aiortc's 96 kbit/s stereo; ``red``: ask for RED, each packet
    carrying the :data:`RED_DISTANCE` frames before it."""

    voice: bool = True
    bitrate_kbps: int = 32
    fec: bool = True
    expected_loss_percent: int = 10
    red: bool = True

    def __post_init__(self) -> None:
        if not 6 <= self.bitrate_kbps <= 128:
            raise ValueError(f"bitrate_kbps must be 6..128, got {self.bitrate_kbps}")
        if not 0 <= self.expected_loss_percent <= 100:
            raise ValueError(
                f"expected_loss_percent must be 0..100, got {self.expected_loss_percent}"
            )

    @classmethod
    def baseline(cls) -> VoiceSettings:
        """aiortc's own audio (the "before" of the rural benchmark)."""
        return cls(voice=False, red=False)


class VoiceEncoder:
    """Speech Opus for one peer: ``s16`` frames in, 20 ms Opus packets out (``pts`` in
    48 kHz samples, the input frames' own, so gaps the track left show). Blocking: call
    it on a worker thread."""

    def __init__(self, settings: VoiceSettings) -> None:
        self.settings = settings
        codec: Any = av.CodecContext.create("libopus", "w")
        codec.bit_rate = settings.bitrate_kbps * 1000
        codec.format = "s16"
        codec.layout = "mono"
        codec.sample_rate = OPUS_CLOCK_HZ
        codec.time_base = OPUS_TIME_BASE
        codec.options = {
            "application": "voip",
            "frame_duration": "20",
            "fec": "1" if settings.fec else "0",
            "packet_loss": str(settings.expected_loss_percent if settings.fec else 0),
        }
        self._codec = codec
        self._resampler = av.AudioResampler(
            format="s16", layout="mono", rate=OPUS_CLOCK_HZ, frame_size=FRAME_SAMPLES
        )
        self._pending: deque[int] = deque()  # input pts of frames still inside libopus
        self.packets = 0
        self.bytes = 0

    def encode(self, frame: av.AudioFrame) -> list[av.Packet[Any]]:
        out: list[av.Packet[Any]] = []
        for chunk in self._resampler.resample(frame):
            if chunk.pts is not None:
                self._pending.append(
                    int(chunk.pts * (chunk.time_base or OPUS_TIME_BASE) * OPUS_CLOCK_HZ)
                )
            for packet in self._codec.encode(chunk):
                # libopus's own pts lead by its look-ahead and lose the gaps: give each
                # packet the timestamp of the frame it was made from, in order.
                pts = self._pending.popleft() if self._pending else None
                if pts is None:
                    continue
                packet.pts = pts
                packet.time_base = OPUS_TIME_BASE
                self.packets += 1
                self.bytes += packet.size
                out.append(packet)
        return out


# -- RED, RFC 2198 ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedBlock:
    """One encoding in a RED payload: ``offset`` samples before the packet's timestamp
    (0: the primary), its payload type and its bytes."""

    offset: int
    payload_type: int
    data: bytes


def pack_red(
    primary: bytes, timestamp: int, history: Sequence[tuple[int, bytes]], payload_type: int
) -> bytes:
    """A RED payload: the ``history`` frames (timestamp, bytes; oldest first) that still
    fit the header's fields, then ``primary`` (RFC 2198 section 3)."""
    headers = bytearray()
    blocks = bytearray()
    for ts, data in history:
        offset = (timestamp - ts) & 0xFFFFFFFF
        if not 0 < offset <= MAX_TS_OFFSET or not 0 < len(data) <= MAX_BLOCK_BYTES:
            continue
        # F=1 and the block's payload type, then a 14-bit offset and a 10-bit length.
        headers.append(0x80 | (payload_type & 0x7F))
        headers += ((offset << 10) | len(data)).to_bytes(3, "big")
        blocks += data
    headers.append(payload_type & 0x7F)
    return bytes(headers + blocks + primary)


def parse_red(payload: bytes) -> list[RedBlock]:
    """The blocks of a RED payload, redundant ones first, the primary last; raises
    ValueError for a payload that is not RED (a truncated header or block)."""
    headers: list[tuple[int, int, int]] = []  # offset, pt, length (-1: primary)
    pos = 0
    while True:
        if pos >= len(payload):
            raise ValueError("RED payload ends inside its headers")
        first = payload[pos]
        if not first & 0x80:
            headers.append((0, first & 0x7F, -1))
            pos += 1
            break
        if pos + 4 > len(payload):
            raise ValueError("RED block header truncated")
        word = int.from_bytes(payload[pos + 1 : pos + 4], "big")
        headers.append((word >> 10, first & 0x7F, word & 0x3FF))
        pos += 4
    blocks: list[RedBlock] = []
    for offset, pt, length in headers:
        if length < 0:
            blocks.append(RedBlock(0, pt, payload[pos:]))
            break
        if pos + length > len(payload):
            raise ValueError("RED block longer than the payload")
        blocks.append(RedBlock(offset, pt, payload[pos : pos + length]))
        pos += length
    return blocks


class RedPacker(hooks.Encoder):
    """aiortc's sender-side codec for ``audio/red``: wraps each Opus packet with the
    previous ``distance`` ones (about 2 x 80 bytes more per packet at 32 kbit/s).
    Packets come from :class:`VoiceEncoder` (the track); a track that yields frames
    (speech Opus off) is encoded by aiortc's Opus first."""

    def __init__(self, distance: int = RED_DISTANCE, payload_type: int = OPUS_PAYLOAD_TYPE) -> None:
        self.distance = distance
        self.payload_type = payload_type
        self._history: deque[tuple[int, bytes]] = deque(maxlen=distance)
        self._fallback: Any = None

    def _wrap(self, data: bytes, timestamp: int) -> bytes:
        payload = pack_red(data, timestamp, list(self._history), self.payload_type)
        self._history.append((timestamp, data))
        return payload

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if self._fallback is None:
            self._fallback = hooks.OpusEncoder()
        payloads, timestamp = self._fallback.encode(frame, force_keyframe)
        return [self._wrap(p, timestamp) for p in payloads], timestamp

    def pack(self, packet: Any) -> tuple[list[bytes], int]:
        timestamp = int(packet.pts * packet.time_base * OPUS_CLOCK_HZ)
        return [self._wrap(bytes(packet), timestamp)], timestamp


class RedDecoder(hooks.Decoder):
    """aiortc's receiver-side codec for ``audio/red``: decodes the redundant frames that
    fill holes (timestamps after the last one decoded), then the primary.

    Runs on aiortc's decoder thread, fed in sequence order by our audio jitter buffer
    (late packets never reach it). ``recovered``: frames rebuilt from redundancy."""

    def __init__(self) -> None:
        codec: Any = av.CodecContext.create("libopus", "r")
        codec.format = "s16"
        codec.layout = "stereo"
        codec.sample_rate = OPUS_CLOCK_HZ
        self._codec = codec
        self._last: int | None = None  # timestamp of the newest frame decoded
        self.recovered = 0
        self.malformed = 0

    def _decode(self, data: bytes, timestamp: int) -> list[Any]:
        packet = av.Packet(data)
        packet.pts = timestamp
        packet.time_base = OPUS_TIME_BASE
        frames: list[Any] = self._codec.decode(packet)
        return frames

    def decode(self, encoded_frame: Any) -> list[Any]:
        timestamp = int(encoded_frame.timestamp)
        try:
            blocks = parse_red(bytes(encoded_frame.data))
        except ValueError:
            self.malformed += 1
            return []
        frames: list[Any] = []
        last = self._last
        for block in blocks[:-1]:
            ts = timestamp - block.offset
            if last is not None and ts <= last:
                continue  # already decoded (it arrived as its own primary)
            if last is None:
                continue  # nothing to repair before the first packet
            frames += self._decode(block.data, ts)
            self.recovered += 1
            last = ts
        primary = blocks[-1]
        if primary.data:
            frames += self._decode(primary.data, timestamp)
        self._last = timestamp
        return frames


@dataclass(frozen=True, slots=True)
class LinkTuning:
    """What ``stream.link`` asks of a lesson's peers: the audio they send
    (:class:`VoiceSettings`), the least gap between one room's keyframe requests, and
    whether received video gives up on lost packets in time
    (:class:`~agent.stream.jitter.VideoJitterBuffer`), and whether a room's video starts
    on the low layer (climbing after ``first_up_after_s`` of good link)."""

    voice: VoiceSettings = VoiceSettings()
    keyframe_request_gap_s: float = 1.0
    give_up_lost_video: bool = True
    start_low: bool = True
    first_up_after_s: float = 4.0

    @classmethod
    def from_config(cls, config: LinkConfig) -> LinkTuning:
        return cls(
            VoiceSettings(
                voice=config.voice_opus, bitrate_kbps=config.voice_bitrate_kbps, red=config.red
            ),
            keyframe_request_gap_s=config.keyframe_request_gap_s,
            give_up_lost_video=config.give_up_lost_video,
            start_low=config.start_low,
            first_up_after_s=config.first_up_after_s,
        )

    @classmethod
    def baseline(cls) -> LinkTuning:
        """Everything issue 13 added, off: the "before" of the rural benchmark."""
        return cls(
            VoiceSettings.baseline(),
            keyframe_request_gap_s=0.0,
            give_up_lost_video=False,
            start_low=False,
        )


def install() -> None:
    """Make aiortc speak RED with our packer and decoder (once per process)."""
    hooks.install_red(RedPacker, RedDecoder)


def audio_preferences(red: bool) -> list[Any]:
    """Our audio codec preferences for an offer: RED first when asked for (the answerer
    then sends it, as aiortc and Chromium answer in the offer's order), then Opus and
    the rest; without RED, RED is left out."""
    install()
    codecs = list(RTCRtpSender.getCapabilities("audio").codecs)
    reds = [c for c in codecs if c.mimeType.lower() == hooks.RED_MIME]
    rest = [c for c in codecs if c.mimeType.lower() != hooks.RED_MIME]
    return reds + rest if red else rest


def sent_audio_codec(sdp: str, preferred: Sequence[str] | None = None) -> str | None:
    """The audio codec a sender uses after negotiating ``sdp`` (the answer): the first of
    ``preferred`` (lower-case MIME subtypes, the offerer's order) the answer has, else the
    answer's first audio codec. None: no audio in it."""
    names: list[str] = []
    audio = False
    formats: list[str] = []
    rtpmap: dict[str, str] = {}
    for line in sdp.splitlines():
        if line.startswith("m="):
            if audio:
                break
            audio = line.startswith("m=audio")
            if audio:
                formats = line.split()[3:]
        elif audio and line.startswith("a=rtpmap:"):
            pt, _, encoding = line[len("a=rtpmap:") :].partition(" ")
            rtpmap[pt] = encoding.split("/")[0].lower()
    names = [rtpmap[f] for f in formats if f in rtpmap]
    if not names:
        return None
    for name in preferred or ():
        if name in names:
            return name
    return names[0]


def decline_red(offer_sdp: str, *, accept: bool) -> str:
    """The offer with ``audio/red`` removed from its audio section unless we ``accept``
    it and it is RED as our rooms offer it (over Opus at aiortc's payload type 96, which
    our RED blocks name). aiortc answers in the offer's order and sends the first codec,
    so a browser that put RED first would otherwise get RED blocks naming a payload type
    it does not use; it gets plain Opus instead. Offers without RED are returned as is."""
    lines = offer_sdp.split("\r\n") if "\r\n" in offer_sdp else offer_sdp.split("\n")
    sep = "\r\n" if "\r\n" in offer_sdp else "\n"
    start = next((i for i, line in enumerate(lines) if line.startswith("m=audio")), None)
    if start is None:
        return offer_sdp
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    section = lines[start:end]
    rtpmap = {}
    fmtp = {}
    for line in section:
        if line.startswith("a=rtpmap:"):
            pt, _, encoding = line[len("a=rtpmap:") :].partition(" ")
            rtpmap[pt] = encoding.split("/")[0].lower()
        elif line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:") :].partition(" ")
            fmtp[pt] = params.strip()
    reds = [pt for pt, name in rtpmap.items() if name == "red"]
    if not reds:
        return offer_sdp
    opus = str(OPUS_PAYLOAD_TYPE)
    ours = f"{opus}/{opus}"
    drop = {
        pt
        for pt in reds
        if not accept
        or rtpmap.get(opus) != "opus"
        or fmtp.get(pt, "").split("/")[:2] != ours.split("/")
    }
    if not drop:
        return offer_sdp
    head = section[0].split(" ")
    kept = [*head[:3], *(f for f in head[3:] if f not in drop)]
    body = [
        line
        for line in section[1:]
        if not any(
            line.startswith(f"a={attr}:{pt} ") or line == f"a={attr}:{pt}"
            for pt in drop
            for attr in ("rtpmap", "fmtp", "rtcp-fb")
        )
    ]
    return sep.join([*lines[:start], " ".join(kept), *body, *lines[end:]])
