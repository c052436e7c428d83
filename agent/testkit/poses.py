"""Real face photos turned in 3D by a known yaw and pitch, to check head-pose estimates.

Honest about what it is: a real photo of a (roughly frontal) face is lifted onto a
generic face surface (a half-ellipsoid the size of the face, with a nose bump at the
detected nose tip; the background is a plane behind it), turned about the head's centre
and drawn again (orthographic, nearer surface wins, holes filled from the original). The
turn applied is the ground truth: estimates are compared as the change from the
unturned photo's own estimate, since no photo's true pose is known. Limits: the surface
is generic (real faces are flatter or deeper), hair and ears are painted on it, and past
about 40 degrees the far side's stretched pixels look unlike a real turned head.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.uint8]


def turn_matrix(yaw_deg: float, pitch_deg: float) -> NDArray[np.float64]:
    """The rotation that turns a face looking at the camera to ``yaw`` (+ toward the
    image's right) and ``pitch`` (+ down), in camera axes (x right, y down, z away)."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    # The forward vector (0, 0, -1) must become (sin yaw cos pitch, sin pitch, -cos yaw cos pitch).
    turn_yaw = np.array(
        [[math.cos(yaw), 0, -math.sin(yaw)], [0, 1, 0], [math.sin(yaw), 0, math.cos(yaw)]]
    )
    turn_pitch = np.array(
        [[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]]
    )
    return np.asarray(turn_yaw @ turn_pitch, np.float64)


def turn_face(
    image: Image, landmarks: NDArray[np.float32], yaw_deg: float, pitch_deg: float
) -> Image:
    """``image`` with the face at ``landmarks`` (detector order) turned by yaw and pitch."""
    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes = float(np.linalg.norm(points[1] - points[0]))
    centre = (points[0] + points[1] + points[3] + points[4]) / 4
    half_w, half_h, depth = 1.25 * eyes, 1.7 * eyes, 1.1 * eyes
    scale = 2  # sample the source twice per pixel each way: no holes from stretching
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    height, width = big.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) / scale
    u, v = (xs - centre[0]) / half_w, (ys - centre[1]) / half_h
    inside = np.clip(1 - u * u - v * v, 0, None)
    nose = points[2]
    bump = (
        0.45 * eyes * np.exp(-((xs - nose[0]) ** 2 + (ys - nose[1]) ** 2) / (2 * (0.2 * eyes) ** 2))
    )
    z = -depth * np.sqrt(inside) - bump * (inside > 0)  # toward the camera is negative
    pivot_z = 0.3 * depth  # a head turns about a point behind its face
    source = np.stack([xs - centre[0], ys - centre[1], z - pivot_z], axis=-1).reshape(-1, 3)
    turned = source @ turn_matrix(yaw_deg, pitch_deg).T
    dest_x = np.rint(turned[:, 0] + centre[0]).astype(np.int64)
    dest_y = np.rint(turned[:, 1] + centre[1]).astype(np.int64)
    out_h, out_w = image.shape[:2]
    keep = (dest_x >= 0) & (dest_x < out_w) & (dest_y >= 0) & (dest_y < out_h)
    order = np.argsort(-turned[keep, 2], kind="stable")  # far first: the near side wins
    colours = big.reshape(-1, 3)[keep][order]
    flat = (dest_y[keep] * out_w + dest_x[keep])[order]
    canvas = np.zeros((out_h * out_w, 3), np.uint8)
    filled = np.zeros(out_h * out_w, bool)
    canvas[flat] = colours  # numpy keeps the last write for repeated indices
    filled[flat] = True
    result = canvas.reshape(out_h, out_w, 3)
    holes = (~filled).reshape(out_h, out_w).astype(np.uint8)
    if holes.any():
        result = cv2.inpaint(result, holes, 3, cv2.INPAINT_TELEA)
    return np.ascontiguousarray(result)
