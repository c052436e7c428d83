"""Classroom-like frames composed from real face photos, with their ground truth.

Cameras are faked honestly: real faces (cut from real photos with a margin, at full
resolution) are pasted at classroom sizes (16-80 px faces) in rows on a plain
background, and the box of each pasted face is written down as the ground truth.
Faces are cut where the detector finds them in the *full-size* photo (score >= 0.95),
so what the composite tests is detection at small sizes and in a crowd, and identity
across scale, not the cutting. The demo's class (:func:`make_demo_class`) adds a man
standing at the side, strips of real pose photos, who raises his hands once a loop.
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

DEMO_SIZE = (960, 540)  # the demo camera's frame (width, height)
DEMO_FPS = 10
DEMO_LOOP_S = 12.0  # the video's length: it plays in a loop
DEMO_HANDS_UP_S = (4.5, 7.5)  # when, in each loop, the standing man holds his hands up
STANDING_W = 288  # the strip at the room's right side where the man stands
STANDING_FACE_TOP = 80  # where his face's top is in the frame
STANDING_ABOVE = 70  # photo pixels kept above his face (his raised hands reach 45)


@dataclass(frozen=True)
class DemoClass:
    """A class for the demo: a camera video, an enrolled roster, and what is true in it.

    The video is ``loop_s`` long and plays in a loop; in each loop the standing man holds
    his hands up from ``hands_up_s[0]`` to ``hands_up_s[1]`` (seconds into the loop), one
    hand raise (``raises_per_loop``) for a rule that needs a hand up for 1 s, and his
    hands are down the rest of the time. Nobody else raises a hand."""

    video: Path
    enrolled: int
    in_room: int  # enrolled students in the picture
    strangers: int  # faces in the picture that are not enrolled (the visitor, the man)
    size: tuple[int, int] = DEMO_SIZE  # the video's frame (width, height)
    fps: int = DEMO_FPS
    loop_s: float = DEMO_LOOP_S
    hands_up_s: tuple[float, float] = DEMO_HANDS_UP_S
    raises_per_loop: int = 1
    # The strip of the frame the man stands in (x, y, w, h); the seated class is left of it.
    standing: tuple[float, float, float, float] = (
        DEMO_SIZE[0] - STANDING_W,
        0,
        STANDING_W,
        DEMO_SIZE[1],
    )


def photos_dir() -> Path | None:
    """The real face photos kept with the tests (a source checkout), or None. The pose
    photos the demo's standing man comes from are beside them (``../pose``)."""
    folder = Path(__file__).resolve().parents[2] / "tests" / "data" / "faces"
    if not any(folder.glob("faceapi-sample*.jpg")):
        return None
    return folder if all(p.is_file() for p in _standing_photos(folder)) else None


def _standing_photos(photos: Path) -> tuple[Path, Path]:
    """The Sports2D man's photos (hands down, hands up) beside the face photos."""
    pose = photos.parent / "pose"
    return pose / "sports2d-man-hands-down.jpg", pose / "sports2d-man-hands-up.jpg"


def _standing(path: Path, detector: Detector, height: int) -> Image:
    """A strip of the photo, at full resolution and unchanged, ``STANDING_W`` wide and
    ``height`` tall, centred on the man's face with ``STANDING_ABOVE`` pixels above it:
    both poses cut this way put his face at the same place of the frame."""
    read = cv2.imread(str(path))
    if read is None:
        raise FileNotFoundError(f"cannot read {path}")
    image: Image = np.asarray(read, np.uint8)
    x, y, w, _ = max(detector.detect(image), key=lambda f: f.score).box
    x0 = round(x + w / 2 - STANDING_W / 2)
    y0 = round(y) - STANDING_ABOVE
    if x0 < 0 or y0 < 0 or x0 + STANDING_W > image.shape[1] or y0 + height > image.shape[0]:
        raise ValueError(f"{path.name}: the man is too near the photo's edge to cut")
    return np.ascontiguousarray(image[y0 : y0 + height, x0 : x0 + STANDING_W])


def make_demo_class(photos: Path, workdir: Path, store_dir: Path) -> DemoClass:
    """Enrol students cut from face-api's group photos (MIT, see tests/data/faces/
    LICENSES.md) into an encrypted store, and write a 960x540 video of the class: most of
    them at their desks, one absent, one visitor who is not enrolled; and, at the room's
    right side, a man standing (not enrolled) who raises his hands once a loop.

    The man is the Sports2D demo's (BSD-3, see tests/data/pose/LICENSES.md): a strip of
    its hands-down photo, switched for the same strip of its hands-up photo for
    ``DEMO_HANDS_UP_S`` of each loop; both strips are pasted at full resolution (his face
    about 40 px high), aligned on his face, with their own background (a rooftop, not a
    classroom; it shifts by the 19 px his head rose between the two frames). The hands-up
    photo is the top of a jumping jack (legs apart): real arms held up, in an exercise
    rather than a pupil's raised hand. His face and body region (``body_region``: about 235 px
    square) lie inside the strip, so MoveNet reads him as it reads the photos themselves
    (tests/test_sensing_hands.py); the seated faces' regions read down or unknown."""
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
    # The absent student (the last) is the one with her hands in her hair: the keypoint
    # test reads a hand on the head as up (agent/sensing/hands.py), and the demo's class
    # raises no hand but the standing man's.
    students, visitor = [*crops[:4], *crops[5:7], crops[4]], crops[7]
    store = open_store(store_dir, create=True)
    assert pipeline.embedder is not None
    for i, crop in enumerate(students, start=1):
        face = max(pipeline.detect(crop.image), key=lambda f: f.height)
        embedding = pipeline.embedder.embed([pipeline.embedder.align(crop.image, face)])[0]
        store.put(Enrolled(f"demo-s{i:02d}", f"Student {i}", "demo-class", True, [embedding], 0))
    store.save()
    width, height = DEMO_SIZE
    seated: list[FaceCrop | None] = [*students[:-1], None, visitor]  # the last one is absent
    desks, _ = compose(
        seated, width=width - STANDING_W, height=height, face_px=(60, 70), rows=2, seed=7
    )
    top = STANDING_FACE_TOP - STANDING_ABOVE
    down, up = (_standing(path, full, height - top) for path in _standing_photos(photos))
    frames = []
    for standing in (down, up):
        frame = np.full((height, width, 3), 120, np.uint8)
        frame[:, : width - STANDING_W] = desks
        _paste(frame, standing, width - STANDING_W, top)
        frames.append(frame)
    video = workdir / "sensing-class.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), DEMO_FPS, DEMO_SIZE)
    first, last = (round(s * DEMO_FPS) for s in DEMO_HANDS_UP_S)
    for i in range(round(DEMO_LOOP_S * DEMO_FPS)):  # with the camera's own small wobble
        writer.write(np.roll(frames[first <= i < last], (i % 4) - 2, axis=1))
    writer.release()
    return DemoClass(video, len(students), len(students) - 1, 2)
