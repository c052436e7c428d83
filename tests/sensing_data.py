"""Shared real-photo fixtures for the sensing tests (models loaded once per module)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FACES = Path(__file__).parent / "data" / "faces"
GROUP_PHOTOS = sorted(FACES.glob("faceapi-sample*.jpg"))  # all different people
OBAMA = [FACES / "fr-obama.jpg", FACES / "fr-obama2.jpg", FACES / "fr-obama3.jpg"]
BIDEN = FACES / "fr-biden.jpg"


def load(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image
