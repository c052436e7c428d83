"""``stream.link``: how a room's media adapts to a poor rural line (issue 13).

Its own module so the sections of ``agent/config/models.py`` stay small to merge; the
stream package turns it into ``agent.stream.LinkTuning``.
"""

from __future__ import annotations

from pydantic import Field

from agent.config.base import StrictModel


class LinkConfig(StrictModel):
    """Loss- and delay-resilience of the lesson's media (defaults suit rural links)."""

    voice_opus: bool = Field(
        default=True,
        description="Send the microphone as speech Opus (mono, voice_bitrate_kbps, in-band "
        "FEC) instead of 96 kbit/s stereo; false: aiortc's default Opus",
    )
    voice_bitrate_kbps: int = Field(
        default=32, ge=12, le=64, description="Speech Opus bitrate (24-32 suits one voice)"
    )
    red: bool = Field(
        default=True,
        description="Ask for RED audio (RFC 2198): each packet also carries the two frames "
        "before it, so a lost packet is rebuilt from the next; peers that do not offer it "
        "get plain Opus",
    )
    keyframe_request_gap_s: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="Least time between two keyframes one receiving room may ask for, so a "
        "lossy room does not make every room pay for keyframes (0: no limit)",
    )
    give_up_lost_video: bool = Field(
        default=True,
        description="Received video: give up on a packet still missing after about 1.5 "
        "round trips (its retransmission lost too), drop to the next keyframe and ask for "
        "one, instead of freezing the picture for seconds and replaying it late",
    )
    low_layer_burst_ms: int = Field(
        default=250,
        ge=50,
        le=1000,
        description="Largest burst the low layer sends (a keyframe), in milliseconds of its "
        "bitrate: it must fit the queue of a rural line (about 200 ms) or the keyframe's tail "
        "is dropped and asked for again; 1000: as the high layer",
    )
    start_low: bool = Field(
        default=True,
        description="A room's video starts on the low layer and climbs to the high one after "
        "first_up_after_s of good link, instead of starting high and overfilling a thin line",
    )
    first_up_after_s: float = Field(
        default=4.0,
        ge=1,
        le=60,
        description="With start_low: how long the link must be good before the first climb",
    )
    floor_layer: bool = Field(
        default=True,
        description="A third, smallest video layer (floor_height, floor_bitrate_kbps) for "
        "lines that cannot carry the low one, before a room's video pauses (audio only); "
        "encoded only while some room is on it",
    )
    floor_bitrate_kbps: int = Field(
        default=200, ge=50, le=1000, description="Floor layer bitrate (150-250 suits 180p)"
    )
    floor_height: int = Field(
        default=180,
        ge=90,
        le=720,
        description="Picture height of the floor layer (180: a quarter of 720p, so the "
        "picture, and the synthetic camera's latency stamp, scale cleanly)",
    )

    @classmethod
    def baseline(cls) -> LinkConfig:
        """Everything above off: the lesson as it was before (the benchmark's "before")."""
        return cls(
            voice_opus=False,
            red=False,
            keyframe_request_gap_s=0.0,
            give_up_lost_video=False,
            low_layer_burst_ms=1000,
            start_low=False,
            floor_layer=False,
        )
