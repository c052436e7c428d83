"""Faces tracked across frames, so identity is voted per track and embedding runs rarely.

A greedy IoU tracker: each new face continues the track whose last box overlaps it most
(at least ``track_iou``); a track unseen for ``track_lost_s`` ends. At 5 fps children
barely move between samples, so overlap is enough and a Kalman filter or ByteTrack would
add a dependency without changing the matches. A track is embedded when it is new and
then at most every ``embed_every_s`` until ``votes_to_settle`` votes agree; after that it
costs nothing but the detector.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from agent.sensing.faces import Face

UNKNOWN = ""  # the vote of a face that matched no one


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    id: int
    face: Face
    first_seen: float
    last_seen: float
    votes: Counter[str] = field(default_factory=Counter)
    last_embed: float | None = None
    settle_votes: int = 3

    @property
    def identity(self) -> str | None:
        """The voted student id, UNKNOWN, or None before any vote."""
        if not self.votes:
            return None
        return self.votes.most_common(1)[0][0]

    @property
    def confidence(self) -> float:
        """Share of this track's votes that agree with its identity."""
        total = sum(self.votes.values())
        return self.votes.most_common(1)[0][1] / total if total else 0.0

    @property
    def settled(self) -> bool:
        return bool(self.votes) and self.votes.most_common(1)[0][1] >= self.settle_votes

    def wants_embedding(self, now: float, every_s: float) -> bool:
        if self.settled:
            return False
        return self.last_embed is None or now - self.last_embed >= every_s

    def vote(self, student: str, now: float) -> None:
        self.votes[student] += 1
        self.last_embed = now


class Tracker:
    def __init__(
        self, *, iou_threshold: float = 0.3, lost_s: float = 3.0, settle_votes: int = 3
    ) -> None:
        self.iou_threshold = iou_threshold
        self.lost_s = lost_s
        self.settle_votes = settle_votes
        self.tracks: dict[int, Track] = {}
        self.ended: list[Track] = []  # tracks that ended since the last drain_ended()
        self._next = 1

    def update(self, faces: list[Face], now: float) -> list[Track]:
        """The track of each face (same order), after ending tracks lost for too long."""
        for track_id in [t.id for t in self.tracks.values() if now - t.last_seen > self.lost_s]:
            self.ended.append(self.tracks.pop(track_id))
        pairs = sorted(
            (
                (iou(face.box, track.face.box), i, track.id)
                for i, face in enumerate(faces)
                for track in self.tracks.values()
            ),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        used: set[int] = set()
        for overlap, i, track_id in pairs:
            if overlap < self.iou_threshold:
                break
            if i in assigned or track_id in used:
                continue
            track = self.tracks[track_id]
            track.face, track.last_seen = faces[i], now
            assigned[i] = track
            used.add(track_id)
        result = []
        for i, face in enumerate(faces):
            if i not in assigned:
                track = Track(self._next, face, now, now, settle_votes=self.settle_votes)
                self.tracks[track.id] = track
                self._next += 1
                assigned[i] = track
            result.append(assigned[i])
        return result

    def drain_ended(self) -> list[Track]:
        ended, self.ended = self.ended, []
        return ended

    def close_all(self) -> list[Track]:
        """End every track (the lesson is over); returns them with the ones already ended."""
        self.ended.extend(self.tracks.values())
        self.tracks.clear()
        return self.drain_ended()
