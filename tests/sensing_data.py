"""Shared real-photo fixtures for the sensing tests (models loaded once per module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.capture import FrameHub, open_video_source
from agent.config import SensingConfig
from agent.sensing import SensingService
from tests.rooms import SMALL

FACES = Path(__file__).parent / "data" / "faces"
GROUP_PHOTOS = sorted(FACES.glob("faceapi-sample*.jpg"))  # all different people
OBAMA = [FACES / "fr-obama.jpg", FACES / "fr-obama2.jpg", FACES / "fr-obama3.jpg"]
BIDEN = FACES / "fr-biden.jpg"


def load(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


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
    video = FrameHub(open_video_source(SMALL.video), SMALL)
    return service_class(
        config or SensingConfig(enabled=True),
        video,
        publisher,
        "edu/s/r/sensing",
        device="s.r",
        lesson=lambda: None,
        store_dir=store_dir,
        **options,
    )
