"""Head pose from the detector's five landmarks, and whether a head is "up".

No further model: RetinaFace already gives both eyes, the nose tip and both mouth
corners, and ``cv2.solvePnP`` fits a generic 3D face (adult proportions, millimetres) to
them. Five points pin yaw well and pitch less well (the nose's height between the eyes
and the mouth is the whole pitch signal), which is enough to tell a head turned to the
board from one bent over a desk; ``tools``-free validation on labelled rotations of real
photos is in ``tests/test_sensing_headpose.py`` and the README gives the error.

Angles are the face's direction relative to the line from the face to the camera, so a
pupil in a corner of the picture who looks at the camera has yaw = pitch = 0 whatever the
lens. Yaw > 0: the face turns toward the image's right; pitch > 0: the face points below
the camera (head down). The camera hangs at the front of the room, by the board, so
"toward the camera" is "toward the front"; the band that counts as head up is per room
(``sensing.head_up_*``) because cameras hang at different heights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.config import SensingConfig

# A generic face in camera axes (x right, y down, z away from the camera), millimetres,
# nose tip at the origin; the order is the detector's landmark order.
FACE_MODEL = np.array(
    [
        [-31.0, -33.0, 27.0],  # the eye on the image's left
        [31.0, -33.0, 27.0],  # the other eye
        [0.0, 0.0, 0.0],  # nose tip
        [-25.0, 30.0, 25.0],  # mouth corner on the image's left
        [25.0, 30.0, 25.0],  # the other mouth corner
    ],
    np.float64,
)


@dataclass(frozen=True)
class HeadPose:
    yaw: float  # degrees, + toward the image's right
    pitch: float  # degrees, + below the camera (head down)

    def is_up(self, config: SensingConfig) -> bool:
        """Turned to the front of the room: inside the room's band of yaw and pitch."""
        return (
            abs(self.yaw) <= config.head_up_max_yaw_deg
            and -config.head_up_max_up_deg <= self.pitch <= config.head_up_max_down_deg
        )


def camera_matrix(width: int, height: int) -> NDArray[np.float64]:
    """A pinhole camera with a 60 degree horizontal view (a classroom camera's wide lens);
    a small face's pose barely depends on it."""
    focal = (width / 2) / math.tan(math.radians(30))
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float64)


def head_pose(landmarks: NDArray[np.float32], camera: NDArray[np.float64]) -> HeadPose | None:
    """The head's yaw and pitch toward the camera, or None when the fit fails."""
    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    # Start from a frontal face at the distance the eyes' spacing implies, then refine.
    eyes = float(np.linalg.norm(points[1] - points[0]))
    if not np.isfinite(points).all() or eyes < 1.0:
        return None
    distance = camera[0, 0] * 62.0 / eyes
    ray = np.linalg.inv(camera) @ np.array([*points[2], 1.0])
    guess_t = (ray / ray[2] * distance).reshape(3, 1)
    guess_r = np.zeros((3, 1), np.float64)
    ok, rvec, tvec = cv2.solvePnP(
        FACE_MODEL,
        points,
        camera,
        None,
        rvec=guess_r,
        tvec=guess_t,
        useExtrinsicGuess=True,
        flags=cv2.SOLVEPNP_ITERATIVE,
    )
    if not ok or tvec[2, 0] <= 0:
        return None
    rotation, _ = cv2.Rodrigues(rvec)
    facing = rotation @ np.array([0.0, 0.0, -1.0])  # the face's forward, in camera axes
    # Express it in axes whose -z is the line from the face to the camera.
    to_camera = -tvec[:, 0] / np.linalg.norm(tvec)
    facing = _align(to_camera) @ facing
    yaw = math.degrees(math.atan2(facing[0], -facing[2]))
    pitch = math.degrees(math.atan2(facing[1], math.hypot(facing[0], facing[2])))
    return HeadPose(round(yaw, 1), round(pitch, 1))


def _align(direction: NDArray[np.float64]) -> NDArray[np.float64]:
    """The rotation taking ``direction`` (a unit vector) to (0, 0, -1), without roll."""
    target = np.array([0.0, 0.0, -1.0])
    axis = np.cross(direction, target)
    sin = float(np.linalg.norm(axis))
    cos = float(np.dot(direction, target))
    if sin < 1e-9:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    rotation, _ = cv2.Rodrigues(axis / sin * math.atan2(sin, cos))
    return np.asarray(rotation, np.float64)
