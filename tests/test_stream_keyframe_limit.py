"""One room's keyframe requests are limited (stream.link.keyframe_request_gap_s): every
room on a layer pays for a keyframe one room asks for, so a lossy room's PLI storm must
not turn the shared stream into keyframes. A request inside the gap waits, it is not lost.
"""

from __future__ import annotations

from typing import Any

from agent.stream import EncodedVideoTrack, VideoLayer


class Encoder:
    """What a track calls on the shared encoder: keyframe requests and its detach."""

    def __init__(self) -> None:
        self.requests: list[VideoLayer] = []

    def _request(self, layer: VideoLayer) -> None:
        self.requests.append(layer)

    def _detach(self, track: Any) -> None:
        pass


def test_a_rooms_keyframe_requests_are_spaced_and_a_deferred_one_is_sent_later() -> None:
    encoder = Encoder()
    now = [100.0]
    track = EncodedVideoTrack(encoder, "rural/lesson", 30)  # type: ignore[arg-type]
    track.clock = lambda: now[0]
    track.keyframe_gap_s = 1.0
    try:
        track.request_keyframe()  # honoured at once
        assert encoder.requests == ["high"]
        for _ in range(5):  # a PLI every 100 ms: all inside the gap
            now[0] += 0.1
            track.request_keyframe()
        assert encoder.requests == ["high"]
        assert (track.keyframe_requests, track.keyframe_requests_deferred) == (6, 1)
        track._offer({})  # a frame before the gap ends: still waiting
        assert encoder.requests == ["high"]
        now[0] = 101.05
        track._offer({})  # the first frame after it: the deferred request goes out, once
        track._offer({})
        assert encoder.requests == ["high", "high"]
        stats = track.stats()
        assert (stats.keyframe_requests, stats.keyframe_requests_deferred) == (6, 1)
    finally:
        track.stop()


def test_without_a_gap_every_request_reaches_the_encoder() -> None:
    encoder = Encoder()
    track = EncodedVideoTrack(encoder, "rural/lesson", 30)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            track.request_keyframe()
        assert encoder.requests == ["high"] * 3
        track.pause()
        track.request_keyframe()  # a paused track sends no video: nothing to ask for
        assert encoder.requests == ["high"] * 3
    finally:
        track.stop()
