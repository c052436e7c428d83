"""The sensing pipeline: detect, track, align, embed, match; timed per stage.

One :class:`Pipeline` serves both the live service (``frame()``: tracked, embedding only
new or unsettled tracks) and ``classroom-agent sensing analyze`` (``still()``: every face
of one photo). All of it blocks: the service runs it in a worker thread.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.config import SensingConfig
from agent.sensing.faces import Detector, Embedder, Embedding, Face, make_detector, make_embedder
from agent.sensing.headpose import HeadPose, camera_matrix, head_pose
from agent.sensing.models import model_info
from agent.sensing.track import UNKNOWN, Track, Tracker

STAGES = ("detect", "track", "align", "embed")


@dataclass(frozen=True)
class Match:
    student: str  # the student's pseudonymous id, or UNKNOWN
    distance: float  # to the nearest enrolled embedding (inf with an empty gallery)


class Gallery:
    """Enrolled students' embeddings, matched by nearest neighbour under a distance cap."""

    def __init__(self, embeddings: dict[str, list[Embedding]], max_distance: float) -> None:
        self.max_distance = max_distance
        self._ids: list[str] = []
        rows: list[Embedding] = []
        for student, items in embeddings.items():
            for item in items:
                self._ids.append(student)
                rows.append(item)
        self._matrix: NDArray[np.float32] = (
            np.stack(rows).astype(np.float32) if rows else np.zeros((0, 128), np.float32)
        )

    @property
    def students(self) -> set[str]:
        return set(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def match(self, embedding: Embedding) -> Match:
        if not self._ids:
            return Match(UNKNOWN, float("inf"))
        distances = np.linalg.norm(self._matrix - embedding, axis=1)
        best = int(np.argmin(distances))
        distance = float(distances[best])
        return Match(self._ids[best] if distance <= self.max_distance else UNKNOWN, distance)


@dataclass
class StageTimes:
    """Seconds spent per stage, and calls, since the last ``take()``."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    embeddings: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    def mean_ms(self) -> dict[str, float]:
        return {
            s: round(1000 * self.seconds[s] / self.calls[s], 2) if self.calls[s] else 0.0
            for s in STAGES
        }


@dataclass(frozen=True)
class FaceResult:
    face: Face
    match: Match | None  # None: too small to identify, or no gallery
    track: Track | None = None
    pose: HeadPose | None = None  # None: the landmarks gave no fit

    def to_dict(self) -> dict[str, Any]:
        x, y, w, h = self.face.box
        out: dict[str, Any] = {
            "box": [round(x), round(y), round(w), round(h)],
            "score": round(self.face.score, 4),
        }
        if self.match is not None:
            out["student"] = self.match.student or None
            out["distance"] = (
                round(self.match.distance, 4) if np.isfinite(self.match.distance) else None
            )
        return out


def heads_up(results: list[FaceResult], config: SensingConfig) -> int:
    """How many of a sample's faces are turned to the front (the room's head-up band)."""
    return sum(1 for r in results if r.pose is not None and r.pose.is_up(config))


class Pipeline:
    def __init__(
        self,
        config: SensingConfig,
        *,
        detector: Detector | None = None,
        embedder: Embedder | None = None,
        gallery: Gallery | None = None,
        identify: bool = True,
    ) -> None:
        self.config = config
        self.detector = detector or make_detector(
            config.detector,
            model_info(config.detector, config.models_dir),
            threads=config.threads,
            provider=config.execution_provider,
            detect_width=config.detect_width,
            score_threshold=config.detect_score,
            upscale=config.detect_upscale,
        )
        self.embedder: Embedder | None = None
        if identify:
            self.embedder = embedder or make_embedder(
                config.embedder,
                model_info(config.embedder, config.models_dir),
                threads=config.threads,
                provider=config.execution_provider,
            )
        self.gallery = gallery
        self.tracker = Tracker(
            iou_threshold=config.track_iou,
            lost_s=config.track_lost_s,
            settle_votes=config.votes_to_settle,
        )
        self.times = StageTimes()

    def use_gallery(self, gallery: Gallery) -> None:
        """A new roster (between lessons): load the embedder if sensing ran without one."""
        if self.embedder is None:
            self.embedder = make_embedder(
                self.config.embedder,
                model_info(self.config.embedder, self.config.models_dir),
                threads=self.config.threads,
                provider=self.config.execution_provider,
            )
        self.gallery = gallery

    def models(self) -> list[dict[str, Any]]:
        out = [self.detector.info.to_dict()]  # type: ignore[attr-defined]
        if self.embedder is not None:
            out.append(self.embedder.info.to_dict())  # type: ignore[attr-defined]
        return out

    def detect(self, image: NDArray[np.uint8]) -> list[Face]:
        started = time.perf_counter()
        faces = [f for f in self.detector.detect(image) if f.height >= self.config.min_face_px]
        self.times.add("detect", time.perf_counter() - started)
        return faces

    def embed(self, image: NDArray[np.uint8], faces: list[Face]) -> list[Embedding]:
        assert self.embedder is not None
        started = time.perf_counter()
        chips = [self.embedder.align(image, face) for face in faces]
        aligned = time.perf_counter()
        self.times.add("align", aligned - started)
        embeddings = self.embedder.embed(chips)
        self.times.add("embed", time.perf_counter() - aligned)
        self.times.embeddings += len(embeddings)
        return embeddings

    def identifiable(self, face: Face) -> bool:
        return self.embedder is not None and face.height >= self.config.min_embed_px

    def still(self, image: NDArray[np.uint8]) -> list[FaceResult]:
        """Every face of one photo, each matched against the gallery when there is one."""
        faces = self.detect(image)
        wanted = [f for f in faces if self.identifiable(f)] if self.gallery is not None else []
        matches = {
            id(f): self.gallery.match(e)  # type: ignore[union-attr]
            for f, e in zip(wanted, self.embed(image, wanted) if wanted else [], strict=True)
        }
        return [FaceResult(f, matches.get(id(f))) for f in faces]

    def frame(self, image: NDArray[np.uint8], now: float) -> list[FaceResult]:
        """One sampled frame: faces tracked; new or unsettled tracks embedded and voted."""
        faces = self.detect(image)
        started = time.perf_counter()
        tracks = self.tracker.update(faces, now)
        self.times.add("track", time.perf_counter() - started)
        results: list[FaceResult] = []
        if self.gallery is not None and self.embedder is not None:
            todo = [
                (f, t)
                for f, t in zip(faces, tracks, strict=True)
                if self.identifiable(f) and t.wants_embedding(now, self.config.embed_every_s)
            ]
            if todo:
                embeddings = self.embed(image, [f for f, _ in todo])
                for (_, track), embedding in zip(todo, embeddings, strict=True):
                    track.vote(self.gallery.match(embedding).student, now)
        camera = camera_matrix(image.shape[1], image.shape[0])
        for face, track in zip(faces, tracks, strict=True):
            identity = track.identity
            match = None if identity is None else Match(identity, float("nan"))
            results.append(FaceResult(face, match, track, head_pose(face.landmarks, camera)))
        return results
