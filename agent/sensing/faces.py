"""Detectors and embedders behind two small interfaces, each with a registry key.

A better model is dropped in by subclassing :class:`Detector` or :class:`Embedder`,
registering it under a name, and adding its file to ``models.json``; the config then
names it (``sensing.detector`` / ``sensing.embedder``). Everything here is blocking:
callers run it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.sensing.models import ModelInfo, open_session

Image = NDArray[np.uint8]  # BGR (height, width, 3), as the capture hub delivers
Embedding = NDArray[np.float32]


@dataclass(frozen=True)
class Face:
    """One detected face in frame pixels: box (x, y, w, h), score and 5 landmarks.

    Landmarks (5, 2) in this order: the eye on the image's left, the other eye, the nose
    tip, the mouth corner on the image's left, the other mouth corner.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: NDArray[np.float32]

    @property
    def height(self) -> float:
        return self.box[3]


class Detector(ABC):
    """Finds faces with 5 landmarks in a BGR image."""

    name: ClassVar[str]

    @abstractmethod
    def detect(self, image: Image) -> list[Face]: ...


class Embedder(ABC):
    """Turns aligned faces into descriptors; ``distance`` is the metric thresholds use."""

    name: ClassVar[str]
    chip_size: ClassVar[int]

    @abstractmethod
    def align(self, image: Image, face: Face) -> Image:
        """The face chip this embedder expects (RGB), cut from the BGR frame."""

    @abstractmethod
    def embed(self, chips: list[Image]) -> list[Embedding]: ...

    @staticmethod
    def distance(a: Embedding, b: Embedding) -> float:
        return float(np.linalg.norm(a - b))


DetectorFactory = Callable[..., Detector]
EmbedderFactory = Callable[..., Embedder]
DETECTORS: dict[str, type[Detector]] = {}
EMBEDDERS: dict[str, type[Embedder]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    DETECTORS[cls.name] = cls
    return cls


def register_embedder(cls: type[Embedder]) -> type[Embedder]:
    EMBEDDERS[cls.name] = cls
    return cls


# -- RetinaFace-MobileNet0.25 -------------------------------------------------------------

_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCE = (0.1, 0.2)
_MEAN_BGR = np.array([104, 117, 127], dtype=np.float32)
MAX_UPSCALE = 2.0


@lru_cache(maxsize=8)
def _anchors(width: int, height: int) -> NDArray[np.float32]:
    """RetinaFace's prior boxes (cx, cy, w, h) in pixels, in the network's output order."""
    rows = []
    for stride, sizes in zip(_STRIDES, _ANCHOR_SIZES, strict=True):
        nx, ny = math.ceil(width / stride), math.ceil(height / stride)
        xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
        centres = (np.stack([xx.ravel(), yy.ravel()], axis=1) + 0.5) * stride
        for_each = np.repeat(centres, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], dtype=np.float64), (nx * ny, 1))
        rows.append(np.hstack([for_each, wh]))
    return np.vstack(rows).astype(np.float32)


@register_detector
class RetinaFaceDetector(Detector):
    """RetinaFace-MobileNet0.25: 1.7 MB, 5 landmarks, finds faces from about 10 px up.

    Frames wider than ``detect_width`` are scaled down first (cost grows with pixels;
    ``None``: never), then enlarged by ``upscale`` (1-2x) to find the small faces of a
    classroom's back rows; boxes come back in the original frame's pixels.
    """

    name = "retinaface-mnet025"

    def __init__(
        self,
        info: ModelInfo,
        *,
        threads: int = 1,
        provider: str = "auto",
        detect_width: int | None = 1280,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.4,
        upscale: float = 1.0,
    ) -> None:
        if not 1.0 <= upscale <= MAX_UPSCALE:
            raise ValueError(f"upscale must be between 1 and {MAX_UPSCALE:g}, got {upscale:g}")
        self.upscale = upscale
        self.info = info
        self.session = open_session(info, threads=threads, provider=provider)
        self.detect_width = detect_width
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def detect(self, image: Image) -> list[Face]:
        height, width = image.shape[:2]
        scale = 1.0 if self.detect_width is None else min(1.0, self.detect_width / width)
        scale *= self.upscale
        small: Image
        if abs(scale - 1.0) < 1e-3:
            small, scale = image, 1.0
        else:  # down: area averaging; up (small faces at the back): bilinear
            small = cv2.resize(  # type: ignore[assignment]
                image,
                (round(width * scale), round(height * scale)),
                interpolation=cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR,
            )
        h, w = small.shape[:2]
        blob = (small.astype(np.float32) - _MEAN_BGR).transpose(2, 0, 1)[np.newaxis]
        loc, conf, marks = self.session.run(None, {"input": np.ascontiguousarray(blob)})
        return self._decode(loc[0], conf[0], marks[0], (w, h), scale)

    def _decode(
        self,
        loc: NDArray[Any],
        conf: NDArray[Any],
        marks: NDArray[Any],
        size: tuple[int, int],
        scale: float,
    ) -> list[Face]:
        width, height = size
        scores = conf[:, 1]
        keep = np.flatnonzero(scores > self.score_threshold)
        if keep.size == 0:
            return []
        priors = _anchors(width, height)[keep]
        loc, marks, scores = loc[keep], marks[keep], scores[keep]
        centre = priors[:, :2] + loc[:, :2] * _VARIANCE[0] * priors[:, 2:]
        extent = priors[:, 2:] * np.exp(loc[:, 2:] * _VARIANCE[1])
        boxes = np.hstack([centre - extent / 2, extent])  # x, y, w, h
        points = priors[:, None, :2] + marks.reshape(-1, 5, 2) * _VARIANCE[0] * priors[:, None, 2:]
        chosen = cv2.dnn.NMSBoxes(
            boxes.tolist(), scores.tolist(), self.score_threshold, self.nms_threshold
        )
        faces = []
        for i in np.asarray(chosen, dtype=np.int64).reshape(-1):
            box = boxes[i] / scale
            faces.append(
                Face(
                    box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                    score=float(scores[i]),
                    landmarks=(points[i] / scale).astype(np.float32),
                )
            )
        faces.sort(key=lambda f: (f.box[1], f.box[0]))
        return faces


# -- dlib's ResNet descriptor ---------------------------------------------------------------

# Where RetinaFace's 5 landmarks fall, on average, in dlib's 150x150 chip (padding 0.25).
# Fitted by tools/verify_embedder.py: dlib's 5-point shape predictor + get_face_chip_details
# give the chip transform of each face; RetinaFace's landmarks of the same face are mapped
# through it and averaged. Aligning RetinaFace's points to this template reproduces dlib's
# chip without dlib's shape predictor.
DLIB_CHIP_TEMPLATE = np.array(
    [
        [47.94, 45.42],
        [100.32, 43.66],
        [72.30, 77.47],
        [53.31, 102.12],
        [98.78, 100.40],
    ],
    dtype=np.float32,
)


def similarity_transform(src: NDArray[Any], dst: NDArray[Any]) -> NDArray[np.float64]:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src onto dst (Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / s.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def warp_chip(image: Image, matrix: NDArray[np.float64], size: int) -> Image:
    """Cut a size x size chip as dlib does: halve the image (a 5-tap pyramid) while the
    chip would shrink it by more than 2, then sample bilinearly."""
    m = matrix.copy()
    src: Any = image
    while math.hypot(m[0, 0], m[0, 1]) < 0.5 and min(src.shape[:2]) > 2 * size:
        src = cv2.pyrDown(src)
        m[:, :2] *= 2.0
    return np.asarray(cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR), np.uint8)


@register_embedder
class DlibResnetEmbedder(Embedder):
    """dlib's ResNet (128-d, CC0 weights): 6.5 MB, about 3 ms a face on one core."""

    name = "dlib-resnet-v1"
    chip_size = 150

    def __init__(self, info: ModelInfo, *, threads: int = 1, provider: str = "auto") -> None:
        self.info = info
        self.session = open_session(info, threads=threads, provider=provider)

    def align(self, image: Image, face: Face) -> Image:
        matrix = similarity_transform(face.landmarks, DLIB_CHIP_TEMPLATE)
        chip = warp_chip(image, matrix, self.chip_size)
        return np.ascontiguousarray(chip[:, :, ::-1])  # BGR -> RGB

    def embed(self, chips: list[Image]) -> list[Embedding]:
        if not chips:
            return []
        batch = np.stack(chips).astype(np.float32)
        (out,) = self.session.run(None, {"image": batch})
        return [row.astype(np.float32) for row in out]


def make_detector(name: str, info: ModelInfo, **options: Any) -> Detector:
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r} (known: {', '.join(sorted(DETECTORS))})")
    return DETECTORS[name](info, **options)  # type: ignore[call-arg]


def make_embedder(name: str, info: ModelInfo, **options: Any) -> Embedder:
    if name not in EMBEDDERS:
        raise KeyError(f"unknown embedder {name!r} (known: {', '.join(sorted(EMBEDDERS))})")
    return EMBEDDERS[name](info, **options)  # type: ignore[call-arg]
