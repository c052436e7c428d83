"""Attendance over a simulated lesson built from real face photos.

The class: s-obama (enrolled from two photos, seen in a third), and four students cut
from face-api's group photos (enrolled from the full-size photo, seen at classroom size,
so identity is checked across scale but not across photos: the only multi-photo
identity in any package is the first). s-late arrives after the late mark, s-gone leaves
before the early-leaving mark, s-absent never comes, and a stranger (not enrolled) sits
in the room throughout. The lesson's clock is simulated (one sample every 2 s of lesson
time) so that minutes pass in seconds; the frames are real detector/embedder input.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import SensingConfig
from agent.sensing import (
    Attendance,
    DlibResnetEmbedder,
    Gallery,
    Pipeline,
    RetinaFaceDetector,
    heads_up,
    model_info,
)
from agent.testkit import compose, cut_faces
from tests.sensing_data import GROUP_PHOTOS, OBAMA, load

LESSON_S = 240.0
STEP_S = 4.0


@pytest.fixture(scope="module")
def models() -> tuple[RetinaFaceDetector, DlibResnetEmbedder]:
    return RetinaFaceDetector(model_info("retinaface-mnet025")), DlibResnetEmbedder(
        model_info("dlib-resnet-v1")
    )


def test_a_simulated_lesson_gives_present_late_left_early_absent_and_unknown(
    models: tuple[RetinaFaceDetector, DlibResnetEmbedder],
) -> None:
    detector, embedder = models
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    group = cut_faces(GROUP_PHOTOS[:3], full)
    seen_obama = cut_faces([OBAMA[2]], full)
    assert len(group) >= 5

    def enrol(image: np.ndarray) -> np.ndarray:
        faces = detector.detect(image)
        face = max(faces, key=lambda f: f.height)
        return embedder.embed([embedder.align(image, face)])[0]

    def enrol_crop(crop: object) -> np.ndarray:
        return enrol(crop.image)  # type: ignore[attr-defined]

    names = ["s-present", "s-late", "s-gone", "s-absent"]
    gallery = Gallery(
        {
            "s-obama": [enrol(load(OBAMA[0])), enrol(load(OBAMA[1]))],
            **{name: [enrol_crop(crop)] for name, crop in zip(names, group, strict=False)},
        },
        SensingConfig().match_distance,
    )
    stranger = group[4]
    by_name = dict(zip(names, group, strict=False))
    config = SensingConfig(
        late_after_min=1.0, left_early_min=1.0, embed_every_s=4.0, track_lost_s=10.0
    )
    pipeline = Pipeline(config, detector=detector, embedder=embedder, gallery=gallery)
    attendance = Attendance(config, "lesson-1", 0.0, gallery.students)
    minutes = []
    t = 0.0
    while t < LESSON_S:
        crops = [
            seen_obama[0],
            by_name["s-present"],
            stranger,
            by_name["s-late"] if t >= 70 else None,  # 70 s in: after the 1 min late mark
            by_name["s-gone"] if t < 170 else None,  # gone at 170 s: before the last minute
        ]
        frame, truth = compose(crops, width=960, height=540, face_px=(70, 80), rows=1, seed=1)
        results = pipeline.frame(frame, t)
        assert len(results) == len(truth)
        attendance.tracks_ended(pipeline.tracker.drain_ended())
        up = heads_up(results, config)
        attendance.observe(t, [r.track for r in results if r.track is not None], up)
        if int(t) % 60 == 56:
            minutes.append(attendance.take_minute(t))
        t += STEP_S
    attendance.tracks_ended(pipeline.tracker.close_all())
    record = attendance.finish(LESSON_S)
    status = {s: r["status"] for s, r in record["students"].items()}
    assert status == {
        "s-obama": "present",
        "s-present": "present",
        "s-late": "late",
        "s-gone": "left_early",
        "s-absent": "absent",
    }
    assert record["counts"] == {"present": 2, "late": 1, "left_early": 1, "absent": 1}
    assert record["unknown"] == 1  # the stranger, one whole track, never matched
    assert all(r["confidence"] >= 0.6 for s, r in record["students"].items() if s != "s-absent")
    # Minute aggregates: head count follows who is in the room; counts only.
    assert [m["head_count"] for m in minutes] == [4, 5, 5, 4]
    keys = {"minute_start", "samples", "head_count", "head_count_max", "head_up_rate"}
    assert all(set(m) == keys | {"present", "unknown", "hand_raises"} for m in minutes)
    assert all(m["hand_raises"] is None for m in minutes)  # hand raising fed no sample
    # Faces cut from (mostly frontal) photos: most of the class counts as heads up.
    assert all(m["head_up_rate"] is not None and m["head_up_rate"] >= 0.5 for m in minutes)
    # Embedding ran for new or unsettled tracks only, not for every face of every frame.
    faces_analysed = sum(m["samples"] * m["head_count"] for m in minutes)
    assert pipeline.times.embeddings < faces_analysed / 4
