"""Classroom-like frames composed from real face photos, with their ground truth.

Cameras are faked honestly: real faces (cut from real photos with a margin, at full
resolution) are pasted at classroom sizes (16-80 px faces) in rows on a plain
background, and the box of each pasted face is written down as the ground truth.
Faces are cut where the detector finds them in the *full-size* photo (score >= 0.95),
so what the composite tests is detection at small sizes and in a crowd, and identity
across scale, not the cutting.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.sensing import Detector

Image = NDArray[np.uint8]


@dataclass(frozen=True)
class FaceCrop:
    """A face cut from a photo: the crop and where the face box sits inside it."""

    source: str  # photo file name and face index, e.g. "faceapi-sample2.jpg#3"
    image: Image
    box: tuple[float, float, float, float]  # face box within the crop (x, y, w, h)


@dataclass(frozen=True)
class PlacedFace:
    source: str
    box: tuple[float, float, float, float]  # in the composed frame


def cut_faces(
    photos: list[Path], detector: Detector, *, margin: float = 0.6, min_score: float = 0.95
) -> list[FaceCrop]:
    """Every confidently detected face of the photos, with ``margin`` (share of the face
    size) of context around it."""
    crops: list[FaceCrop] = []
    for path in photos:
        read = cv2.imread(str(path))
        if read is None:
            continue
        image: Image = np.asarray(read, np.uint8)
        height, width = image.shape[:2]
        for i, face in enumerate(detector.detect(image)):
            if face.score < min_score:
                continue
            x, y, w, h = face.box
            pad = margin * max(w, h)
            x0, y0 = max(0, int(x - pad)), max(0, int(y - pad))
            x1, y1 = min(width, int(x + w + pad)), min(height, int(y + h + pad))
            crops.append(
                FaceCrop(
                    f"{path.name}#{i}",
                    np.ascontiguousarray(image[y0:y1, x0:x1]),
                    (x - x0, y - y0, w, h),
                )
            )
    return crops


def compose(
    crops: Sequence[FaceCrop | None],
    *,
    width: int = 1280,
    height: int = 720,
    face_px: tuple[int, int] = (16, 80),
    count: int | None = None,
    rows: int = 3,
    seed: int = 0,
    background: int = 120,
) -> tuple[Image, list[PlacedFace]]:
    """A frame with ``count`` faces (default: every crop once) in ``rows`` rows, the back
    row smallest (as a camera over the board sees a class), and the ground truth.
    A ``None`` leaves its seat empty, so the others keep their places."""
    rng = random.Random(seed)
    chosen = list(crops) if count is None else [crops[i % len(crops)] for i in range(count)]
    frame = np.full((height, width, 3), background, np.uint8)
    placed: list[PlacedFace] = []
    per_row = max(1, -(-len(chosen) // rows))
    small, large = face_px
    for index, crop in enumerate(chosen):
        row, col = divmod(index, per_row)
        if crop is None:
            continue
        # Back rows (top of the picture) small, front rows large.
        size = small + (large - small) * (row / max(1, rows - 1))
        scale = size / crop.box[3]
        patch: Image = cv2.resize(  # type: ignore[assignment]
            crop.image,
            (
                max(1, round(crop.image.shape[1] * scale)),
                max(1, round(crop.image.shape[0] * scale)),
            ),
            interpolation=cv2.INTER_AREA,
        )
        cell_w, cell_h = width / per_row, height / rows
        cx = (col + 0.5) * cell_w + rng.uniform(-0.15, 0.15) * cell_w
        cy = (row + 0.5) * cell_h + rng.uniform(-0.1, 0.1) * cell_h
        fx, fy, fw, fh = (v * scale for v in crop.box)
        x0, y0 = round(cx - fx - fw / 2), round(cy - fy - fh / 2)
        _paste(frame, patch, x0, y0)
        placed.append(PlacedFace(crop.source, (x0 + fx, y0 + fy, fw, fh)))
    return frame, placed


def _paste(frame: Image, patch: Image, x0: int, y0: int) -> None:
    h, w = patch.shape[:2]
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + w), min(frame.shape[0], y0 + h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    frame[fy0:fy1, fx0:fx1] = patch[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]


def recall(
    truth: list[PlacedFace], boxes: list[tuple[float, float, float, float]], min_iou: float = 0.3
) -> tuple[int, int]:
    """(faces found, false boxes): each true face matched to at most one box by IoU."""
    from agent.sensing import iou  # noqa: PLC0415

    used: set[int] = set()
    found = 0
    for face in truth:
        best, best_iou = None, min_iou
        for i, box in enumerate(boxes):
            overlap = iou(face.box, box)
            if i not in used and overlap >= best_iou:
                best, best_iou = i, overlap
        if best is not None:
            used.add(best)
            found += 1
    return found, len(boxes) - len(used)


# -- the demo's sensing room ----------------------------------------------------------------


@dataclass(frozen=True)
class DemoClass:
    """A class for the demo: a camera video, an enrolled roster, and what is true in it."""

    video: Path
    enrolled: int
    in_room: int  # enrolled students in the picture
    strangers: int  # faces in the picture that are not enrolled


def photos_dir() -> Path | None:
    """The real face photos kept with the tests (a source checkout), or None."""
    folder = Path(__file__).resolve().parents[2] / "tests" / "data" / "faces"
    return folder if any(folder.glob("faceapi-sample*.jpg")) else None


def make_demo_class(photos: Path, workdir: Path, store_dir: Path) -> DemoClass:
    """Enrol students cut from face-api's group photos (MIT, see tests/data/faces/
    LICENSES.md) into an encrypted store, and write a 640x360 video of the class: most of
    them at their desks, one absent, one visitor who is not enrolled."""
    from agent.config import SensingConfig  # noqa: PLC0415
    from agent.sensing import (  # noqa: PLC0415
        Enrolled,
        Pipeline,
        RetinaFaceDetector,
        model_info,
        open_store,
    )

    pipeline = Pipeline(SensingConfig())
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    crops = cut_faces(sorted(photos.glob("faceapi-sample*.jpg")), full)
    students, visitor = crops[:7], crops[7]
    store = open_store(store_dir, create=True)
    assert pipeline.embedder is not None
    for i, crop in enumerate(students, start=1):
        face = max(pipeline.detect(crop.image), key=lambda f: f.height)
        embedding = pipeline.embedder.embed([pipeline.embedder.align(crop.image, face)])[0]
        store.put(Enrolled(f"demo-s{i:02d}", f"Student {i}", "demo-class", True, [embedding], 0))
    store.save()
    seated: list[FaceCrop | None] = [*students[:-1], None, visitor]  # the last one is absent
    frame, _ = compose(seated, width=640, height=360, face_px=(60, 70), rows=2, seed=7)
    video = workdir / "sensing-class.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (640, 360))
    for i in range(30):  # the camera's own small wobble
        writer.write(np.roll(frame, (i % 4) - 2, axis=1))
    writer.release()
    return DemoClass(video, len(students), len(students) - 1, 1)
