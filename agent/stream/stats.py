"""RTP statistics for one peer: aiortc's ``getStats()`` report -> the health figures.

Pure functions, no network: :func:`snapshot` reads one :class:`aiortc.RTCStatsReport`
(any mapping of stats objects) into a :class:`StatsSnapshot`, and :func:`figures` turns
two consecutive snapshots into the ``rtt_ms``/``loss_percent``/``jitter_ms``/
``bitrate_kbps``/``fps`` of the health topic's ``stream.peers`` entries.

Units as aiortc 1.16 reports them (read from its source, not from the W3C spec):

* ``roundTripTime`` (remote-inbound-rtp): seconds, a smoothed estimate from the SR/RR
  exchange, ``None`` until the first RR that echoes one of our SRs. aiortc's receiver
  computes no RTT, so only a peer we *send* to has one.
* ``fractionLost`` (remote-inbound-rtp): RTCP's 8-bit fixed point, 0..255 = lost/256 over
  the interval since the peer's previous report (not the spec's 0..1 float).
* ``jitter`` (inbound-rtp and remote-inbound-rtp): RTP timestamp units (RFC 3550
  interarrival jitter), an integer; H.264 video's RTP clock is 90 kHz (RFC 6184).
* inbound-rtp has no ``bytesReceived``: the bytes received come from the transport
  stats (all media on the bundled transport, audio and RTCP included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

VIDEO_CLOCK_HZ = 90_000
"""RTP clock of video payloads (H.264: RFC 6184), for jitter in timestamp units."""

Direction = Literal["sent", "received"]


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """The counters that matter, at monotonic time ``at`` (seconds)."""

    at: float
    rtt_s: float | None = None  # remote-inbound video roundTripTime
    remote_fraction_lost: int | None = None  # 0..255, the peer's view of our video
    remote_jitter: int | None = None  # RTP units, the peer's view of our video
    packets_received: int | None = None  # inbound video
    packets_lost: int | None = None  # inbound video (cumulative)
    jitter: int | None = None  # inbound video, RTP units
    bytes_sent: int | None = None  # outbound video
    bytes_received: int | None = None  # transport, all media
    frames_received: int | None = None  # decoded video frames handed to the sink


@dataclass(frozen=True, slots=True)
class Figures:
    """The health topic's per-peer RTP figures (None: not known)."""

    rtt_ms: float | None = None
    loss_percent: float | None = None
    jitter_ms: float | None = None
    bitrate_kbps: float | None = None
    fps: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "rtt_ms": self.rtt_ms,
            "loss_percent": self.loss_percent,
            "jitter_ms": self.jitter_ms,
            "bitrate_kbps": self.bitrate_kbps,
            "fps": self.fps,
        }


def _add(total: int | None, value: Any) -> int | None:
    if not isinstance(value, int | float):
        return total
    return int(value) + (total or 0)


def _worst(current: Any, value: Any) -> Any:
    if not isinstance(value, int | float):
        return current
    return value if current is None else max(current, value)


def snapshot(
    report: Mapping[str, Any], at: float, frames_received: int | None = None
) -> StatsSnapshot:
    """The video counters of a ``getStats()`` report (several video streams add up; for
    RTT, loss and jitter the worst one counts)."""
    rtt = fraction = remote_jitter = None
    received = lost = jitter = sent = transport_rx = None
    for stats in report.values():
        kind = getattr(stats, "type", None)
        if kind == "transport":
            transport_rx = _add(transport_rx, getattr(stats, "bytesReceived", None))
            continue
        if getattr(stats, "kind", None) != "video":
            continue
        if kind == "remote-inbound-rtp":
            rtt = _worst(rtt, getattr(stats, "roundTripTime", None))
            fraction = _worst(fraction, getattr(stats, "fractionLost", None))
            remote_jitter = _worst(remote_jitter, getattr(stats, "jitter", None))
        elif kind == "inbound-rtp":
            received = _add(received, getattr(stats, "packetsReceived", None))
            lost = _add(lost, getattr(stats, "packetsLost", None))
            jitter = _worst(jitter, getattr(stats, "jitter", None))
        elif kind == "outbound-rtp":
            sent = _add(sent, getattr(stats, "bytesSent", None))
    return StatsSnapshot(
        at=at,
        rtt_s=None if rtt is None else float(rtt),
        remote_fraction_lost=fraction,
        remote_jitter=remote_jitter,
        packets_received=received,
        packets_lost=lost,
        jitter=jitter,
        bytes_sent=sent,
        bytes_received=transport_rx,
        frames_received=frames_received,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _delta(prev: int | None, cur: int | None) -> int | None:
    """``cur - prev`` of a counter; None if either is unknown or it went backwards (a
    new stream behind the same id: no rate for this interval)."""
    if prev is None or cur is None or cur < prev:
        return None
    return cur - prev


def inbound_loss_percent(prev: StatsSnapshot | None, cur: StatsSnapshot) -> float | None:
    """Loss of the video we receive: lost / expected over the interval (since the start
    of the stream when there is no previous snapshot)."""
    if cur.packets_received is None or cur.packets_lost is None:
        return None
    if prev is None or prev.packets_received is None or prev.packets_lost is None:
        received, lost = cur.packets_received, cur.packets_lost
    else:
        received = cur.packets_received - prev.packets_received
        lost = cur.packets_lost - prev.packets_lost
    lost = max(lost, 0)  # duplicates can make aiortc's cumulative count go down
    expected = received + lost
    if received < 0 or expected <= 0:
        return None
    return 100.0 * lost / expected


def remote_loss_percent(cur: StatsSnapshot) -> float | None:
    """Loss of the video we send, as the peer's last receiver report has it."""
    if cur.remote_fraction_lost is None:
        return None
    return 100.0 * cur.remote_fraction_lost / 256


def jitter_ms(units: int | None, clock_hz: int = VIDEO_CLOCK_HZ) -> float | None:
    return None if units is None else 1000.0 * units / clock_hz


def _rate(prev: int | None, cur: int | None, seconds: float) -> float | None:
    delta = _delta(prev, cur)
    return None if delta is None or seconds <= 0 else delta / seconds


def figures(
    prev: StatsSnapshot | None, cur: StatsSnapshot, bitrate_of: Direction = "sent"
) -> Figures:
    """The figures for the interval ``prev`` -> ``cur``, rounded to 0.1.

    ``rtt_ms``: remote-inbound video RTT. ``loss_percent`` and ``jitter_ms``: the worse
    direction (the video we receive, and the video we send as the peer reports it).
    ``bitrate_kbps``: outbound video bytes when ``bitrate_of`` is ``"sent"`` and we send
    video, else the transport's bytes received. ``fps``: decoded video frames received
    per second. Rates need ``prev``; without it they are None.
    """
    loss = _worst(inbound_loss_percent(prev, cur), remote_loss_percent(cur))
    jitter = _worst(jitter_ms(cur.jitter), jitter_ms(cur.remote_jitter))
    bitrate = fps = None
    if prev is not None:
        seconds = cur.at - prev.at
        if bitrate_of == "sent" and cur.bytes_sent is not None:
            bytes_per_s = _rate(prev.bytes_sent, cur.bytes_sent, seconds)
        else:
            bytes_per_s = _rate(prev.bytes_received, cur.bytes_received, seconds)
        bitrate = None if bytes_per_s is None else bytes_per_s * 8 / 1000
        fps = _rate(prev.frames_received, cur.frames_received, seconds)
    return Figures(
        rtt_ms=_round(None if cur.rtt_s is None else cur.rtt_s * 1000),
        loss_percent=_round(loss),
        jitter_ms=_round(jitter),
        bitrate_kbps=_round(bitrate),
        fps=_round(fps),
    )
