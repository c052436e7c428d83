"""What a browser viewer of a received picture gets: the newest decoded frame, or a slate.

Fed through the real `LatestFrames` board, as the receiving room's sink fills it; the
track is read the way aiortc's sender reads it (``recv()`` in a loop).
"""

from __future__ import annotations

import time

import av
import numpy as np

from agent.capture import Stamp, draw_stamp, read_stamp
from agent.panel import LatestFrameTrack
from agent.panel.viewers import fit, slate_image
from agent.stream import LatestFrames


def decoded_frame(number: int, width: int = 320, height: int = 240) -> av.VideoFrame:
    """A frame as aiortc's decoder hands it over: yuv420p, stamped like the synthetic camera."""
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    draw_stamp(image, Stamp(number, time.time_ns()))
    return av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")


async def test_newest_frame_then_a_slate_when_the_picture_stops() -> None:
    board = LatestFrames()
    track = LatestFrameTrack(
        board, lambda: "school1.room1", lambda: "Reconnecting...", fps=30, stale_after_s=0.3
    )
    try:
        # Nothing received yet: a slate that says why, never a blank or frozen picture.
        first = await track.recv()
        assert (first.width, first.height) == fit(640, 360, 320)
        assert read_stamp(first.to_ndarray(format="gray")) is None
        assert track.slates == 1

        shared = decoded_frame(7)
        board.observe("school1.room1", "video", shared)
        board.observe("school1.room1", "video", decoded_frame(8))
        got = await track.recv()
        stamp = read_stamp(got.to_ndarray(format="gray"))
        assert stamp is not None
        assert stamp.frame == 8  # the newest, not every frame
        assert got is not board.latest("school1.room1")[1]  # the board's frame is shared
        assert got.pts > first.pts

        # The picture stops: within stale_after_s the viewer gets the slate again.
        started = time.monotonic()
        while True:
            frame = await track.recv()
            if read_stamp(frame.to_ndarray(format="gray")) is None:
                break
            assert time.monotonic() - started < 5, "no slate after the picture stopped"
        assert time.monotonic() - started < 2.0
        assert track.slates >= 2
    finally:
        track.stop()


def test_slate_is_dark_with_light_text() -> None:
    image = slate_image(640, 360, "Waiting for the lesson")
    assert image.shape == (360, 640, 3)
    assert float(image.mean()) < 60
    assert int(image.max()) > 200  # the text
    assert fit(1280, 720, 480) == (480, 270)
    assert fit(321, 241, 640) == (320, 240)  # 4:2:0 needs even sizes
