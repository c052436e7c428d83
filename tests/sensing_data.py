"""Shared real-photo fixtures for the sensing tests (models loaded once per module)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.capture import FrameHub, open_video_source
from agent.config import SensingConfig
from agent.sensing import Attendance, Face, SensingService
from agent.sensing.report import report_record
from agent.sensing.st_analysis import analyse
from agent.sensing.track import Track
from tests.rooms import SMALL

FACES = Path(__file__).parent / "data" / "faces"
GROUP_PHOTOS = sorted(FACES.glob("faceapi-sample*.jpg"))  # all different people
OBAMA = [FACES / "fr-obama.jpg", FACES / "fr-obama2.jpg", FACES / "fr-obama3.jpg"]
BIDEN = FACES / "fr-biden.jpg"


def load(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def room_service(
    store_dir: Path,
    config: SensingConfig,
    video: FrameHub,
    *,
    lesson: Callable[[], str | None] = lambda: None,
    service_class: type[SensingService] = SensingService,
    publisher: Any = None,
    **options: Any,
) -> SensingService:
    """A sensing service of the test room ``s.r`` (topic ``edu/s/r/sensing``) on
    ``video``, in the lesson ``lesson()`` names (None: no lesson)."""
    return service_class(
        config,
        video,
        publisher,
        "edu/s/r/sensing",
        device="s.r",
        lesson=lesson,
        store_dir=store_dir,
        **options,
    )


def lessonless_service(
    store_dir: Path,
    config: SensingConfig | None = None,
    *,
    service_class: type[SensingService] = SensingService,
    publisher: Any = None,
    **options: Any,
) -> SensingService:
    """A sensing service on a small synthetic camera in a room with no lesson (nothing is
    published unless a lesson opens): for the tests of loading, failing and housekeeping."""
    return room_service(
        store_dir,
        config or SensingConfig(enabled=True),
        FrameHub(open_video_source(SMALL.video), SMALL),
        service_class=service_class,
        publisher=publisher,
        **options,
    )


def track(number: int, student: str | None = None) -> Track:
    """A track of a face (no image behind it) that voted for ``student``."""
    face = Face((20.0 * number, 0.0, 10.0, 10.0), 0.9, np.zeros((5, 2), np.float32))
    made = Track(number, face, 0.0, 0.0)
    if student is not None:
        made.votes[student] = 3
    return made


def lesson_report(
    corrected: bool = False, *, lesson: str = "lesson-20261206-0800", start: float = 0.0
) -> dict[str, Any]:
    """A 20-minute lesson's report made by the real attendance and S-T code: s-a
    present, s-b late (first seen in minute 8), s-c absent; hands raised in minutes 3
    and 11, so every chart draws (``corrected``: the teacher set s-c present)."""
    config = SensingConfig(late_after_min=5, left_early_min=5)
    attendance = Attendance(config, lesson, start, {"s-a", "s-b", "s-c"})
    for minute in range(20):
        seen = [track(1, "s-a"), track(2, "s-b" if minute >= 8 else None)]
        attendance.observe(start + minute * 60 + 1, seen, heads_up=2 if minute % 5 else 1)
        attendance.take_minute(start + (minute + 1) * 60)
    record = attendance.finish(start + 20 * 60)
    st = analyse("TTTSSTTTTSTSTTTTSSTTTTTTSSTTTTTTSTTTTTTT", 30.0)
    report = report_record(
        record,
        attendance.summary(),
        st,
        room="s1.r1",
        role="main",
        hands=[{"minute": 3, "count": 2}, {"minute": 11, "count": 4}],
    )
    if corrected:
        report["corrections"].append(
            {"student": "s-c", "status": "present", "at": start + 1300.0, "by": "panel"}
        )
    return report
