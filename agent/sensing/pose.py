"""Body keypoints for one person at a time, and a raised hand read from them.

MoveNet SinglePose Lightning (Google, Apache-2.0; ``movenet-lightning`` in models.json)
finds the 17 COCO keypoints of the person nearest the middle of its square input. A
classroom frame holds many people, so it runs on one region per person, cut around each
tracked face (:func:`body_region`): the region is letterboxed into the model's input and
the keypoints come back in frame pixels. Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.sensing.models import model_info, open_session

Image = NDArray[np.uint8]  # BGR (height, width, 3), as the capture hub delivers
Region = tuple[float, float, float, float]  # x, y, w, h in frame pixels
Keypoints = NDArray[np.float32]  # (17, 3): x, y in frame pixels, score 0-1; COCO order

DEFAULT_MODEL = "movenet-lightning"

# COCO keypoint order. Left and right are the person's own: facing the camera, their left
# shoulder is on the image's right.
NOSE = 0
LEFT_EYE = 1
RIGHT_EYE = 2
LEFT_EAR = 3
RIGHT_EAR = 4
LEFT_SHOULDER = 5
RIGHT_SHOULDER = 6
LEFT_ELBOW = 7
RIGHT_ELBOW = 8
LEFT_WRIST = 9
RIGHT_WRIST = 10
LEFT_HIP = 11
RIGHT_HIP = 12
LEFT_KNEE = 13
RIGHT_KNEE = 14
LEFT_ANKLE = 15
RIGHT_ANKLE = 16
KEYPOINT_COUNT = 17

# How far a region reaches around a face, in face heights: from 1.5 above the top of the
# face (a wrist held up is about there) to 4.5 below it (elbows, hands on a desk), 6 across,
# centred on the face so the pupil stays the person nearest the middle, the one MoveNet
# reports. Wider or taller and a neighbour's body wins more often in a crowded row.
REGION_ABOVE = 1.5
REGION_SIDE = 6.0

# A wrist counts as raised when it is above the shoulder line by this share of the
# shoulder width, about the height of the eyes. On the test photos wrists held up are
# 1.0-1.5 widths above the line, a hand at the mouth or chin 0.3-0.4.
SHOULDER_MARGIN = 0.8
DEFAULT_MIN_SCORE = 0.3  # the threshold MoveNet's own demos draw keypoints from


def body_region(face_box: Region) -> Region:
    """The square region around a face that holds the upper body and a raised hand."""
    x, y, w, h = face_box
    side = REGION_SIDE * h
    return (x + w / 2 - side / 2, y - REGION_ABOVE * h, side, side)


class PoseEstimator:
    """MoveNet keypoints of the person in a region; about 10 ms a region on one core."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        models_dir: Path | None = None,
        threads: int = 1,
        provider: str = "auto",
    ) -> None:
        self.info = model_info(model, models_dir)
        self.session = open_session(self.info, threads=threads, provider=provider)
        (model_input,) = self.session.get_inputs()
        self.input_name: str = model_input.name
        self.size = int(model_input.shape[1])  # square NHWC input: 192 for Lightning

    def keypoints(self, image: Image, region: Region) -> Keypoints:
        """The 17 keypoints (x, y, score) of the person nearest the region's middle.

        The region is letterboxed: padded black about its centre to a square (MoveNet is
        never stretched), and so is any part of it past the frame's edges; the square is
        scaled to the model's input.
        """
        x, y, w, h = region
        side = max(w, h, 1.0)
        left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
        scale = self.size / side
        # Cut the frame to the region first so shrinking never touches the whole frame;
        # halve the cut (a 5-tap pyramid) while the input would shrink it by more than 2,
        # then sample bilinearly, as the face chips are cut.
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x1 = min(int(np.ceil(x + w)), image.shape[1])
        y1 = min(int(np.ceil(y + h)), image.shape[0])
        if x1 <= x0 or y1 <= y0:
            return np.zeros((KEYPOINT_COUNT, 3), dtype=np.float32)
        cut: NDArray[np.uint8] = image[y0:y1, x0:x1]
        factor = 1.0
        while scale * factor < 0.5 and min(cut.shape[:2]) >= 4:
            cut = np.asarray(cv2.pyrDown(cut), dtype=np.uint8)
            factor *= 2.0
        step = scale * factor  # input pixels per pixel of the (halved) cut
        matrix = np.array(
            [[step, 0.0, (x0 - left) * scale], [0.0, step, (y0 - top) * scale]],
            dtype=np.float64,
        )
        square = cv2.warpAffine(cut, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR)
        rgb = np.ascontiguousarray(square[:, :, ::-1], dtype=np.int32)[np.newaxis]
        (out,) = self.session.run(None, {self.input_name: rgb})
        yx_score = out.reshape(KEYPOINT_COUNT, 3)
        points = np.empty((KEYPOINT_COUNT, 3), dtype=np.float32)
        points[:, 0] = left + yx_score[:, 1] * side
        points[:, 1] = top + yx_score[:, 0] * side
        points[:, 2] = yx_score[:, 2]
        return points


def hand_raised(kp: Keypoints, min_score: float = DEFAULT_MIN_SCORE) -> bool | None:
    """Whether a wrist is up, from one set of keypoints (no memory of earlier frames).

    A wrist is raised when it is above the shoulder line (the mean height of both
    shoulders) by ``SHOULDER_MARGIN`` of the shoulder width, or above the eyes (the nose
    when no eye is seen). Only keypoints scoring ``min_score`` or more are used. None when
    no wrist, or nothing to compare a wrist with, is confident enough: a hand hidden
    under a desk is unknown, not down. A hand on the head counts as up; telling it from a
    hand held up is for the rule over time.
    """
    seen = kp[:, 2] >= min_score
    lines: list[float] = []  # heights a wrist must be above (y grows downwards)
    if seen[LEFT_SHOULDER] and seen[RIGHT_SHOULDER]:
        left, right = kp[LEFT_SHOULDER, :2], kp[RIGHT_SHOULDER, :2]
        width = float(np.hypot(*(left - right)))
        lines.append((left[1] + right[1]) / 2 - SHOULDER_MARGIN * width)
    eyes = [kp[i, 1] for i in (LEFT_EYE, RIGHT_EYE) if seen[i]]
    if eyes:
        lines.append(min(eyes))
    elif seen[NOSE]:
        lines.append(kp[NOSE, 1])
    wrists = [kp[i, 1] for i in (LEFT_WRIST, RIGHT_WRIST) if seen[i]]
    if not lines or not wrists:
        return None
    return bool(min(wrists) < max(lines))
