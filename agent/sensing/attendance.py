"""Attendance per lesson and the per-minute aggregates, from tracked, voted faces.

Fed one sample at a time (the faces of one analysed frame, each with its track); knows
nothing of cameras or MQTT, so a simulated lesson tests it exactly.

- A student is *seen* at a sample when a track whose voted identity is that student is
  in the frame. Status at the end: ``absent`` (never seen), ``late`` (first seen after
  start + ``late_after_min``), ``left_early`` (last seen before end - ``left_early_min``;
  a student both late and gone early is ``late`` with ``left_early`` true), ``present``.
  Confidence: the share of the votes of the student's tracks that chose the student.
- *Unknown faces*: tracks that ended having been embedded at least ``votes_to_settle``
  times with every vote "no one" (one stray vote does not make a stranger).
- *Head count* at a sample: the most faces in any sample of the last
  ``head_count_window_s`` (a child who looks down for a moment still counts; one facing
  away for the whole window does not, since the detector sees faces, not heads). The
  minute's head count is the median of those values over the minute.
- *Head-up rate* at a sample: the faces turned to the front of the room (the room's
  band of yaw and pitch, :mod:`agent.sensing.headpose`) over the head count. A child
  bent over a desk usually shows no face at all: the head count still holds them, so
  they count as heads down. The minute's rate is the mean over its samples.
- *Hand raises*: the events :mod:`agent.sensing.hands` counted in the minute's samples;
  None for a minute in which hand raising measured nothing (off, or its model missing),
  so a chart never reads "no hands" where nobody looked.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from agent.config import SensingConfig
from agent.sensing.track import UNKNOWN, Track

STATUSES = ("present", "late", "left_early", "absent")


@dataclass
class _Seen:
    first: float
    last: float
    tracks: set[int] = field(default_factory=set)  # the tracks seen as this student


@dataclass
class Minute:
    """What one minute of samples adds up to (counts only)."""

    start: float
    samples: int = 0
    head_counts: list[int] = field(default_factory=list)
    present: set[str] = field(default_factory=set)
    unknown_tracks: int = 0
    head_up: list[float] = field(default_factory=list)  # per sample with a head count
    hand_raises: int | None = None  # None: hand raising measured no sample of the minute

    def to_message(self) -> dict[str, Any]:
        return {
            "minute_start": self.start,
            "samples": self.samples,
            "head_count": round(statistics.median(self.head_counts)) if self.head_counts else 0,
            "head_count_max": max(self.head_counts, default=0),
            "head_up_rate": round(statistics.fmean(self.head_up), 3) if self.head_up else None,
            "present": len(self.present),
            "unknown": self.unknown_tracks,
            "hand_raises": self.hand_raises,
        }


class Attendance:
    """One lesson's (or one sensing period's) attendance, head count and unknown faces."""

    def __init__(
        self, config: SensingConfig, lesson_id: str, start: float, enrolled: set[str]
    ) -> None:
        self.config = config
        self.lesson_id = lesson_id
        self.start = start
        self.enrolled = enrolled
        self.seen: dict[str, _Seen] = {}
        self.unknown = 0
        self._window: deque[tuple[float, int]] = deque()
        self.minute = Minute(start)
        self.last_sample = start
        self._tracks: dict[int, Track] = {}
        self.minutes: list[dict[str, Any]] = []  # the lesson's curves, a row a minute

    def head_count(self, now: float, faces: int) -> int:
        self._window.append((now, faces))
        while self._window and now - self._window[0][0] > self.config.head_count_window_s:
            self._window.popleft()
        return max(n for _, n in self._window)

    def observe(
        self,
        now: float,
        tracks: list[Track],
        heads_up: int | None = None,
        hand_raises: int | None = None,
    ) -> None:
        """One analysed sample: the tracks of the faces in it, how many of those faces
        were turned to the front (None: no head pose for this sample) and how many hand
        raises it completed (None: hand raising did not look at this sample)."""
        self.last_sample = now
        if hand_raises is not None:
            self.minute.hand_raises = (self.minute.hand_raises or 0) + hand_raises
        count = self.head_count(now, len(tracks))
        self.minute.samples += 1
        self.minute.head_counts.append(count)
        if heads_up is not None and count > 0:
            self.minute.head_up.append(min(1.0, heads_up / count))
        for track in tracks:
            student = track.identity
            if not student or student not in self.enrolled:
                continue
            seen = self.seen.get(student)
            if seen is None:
                seen = self.seen[student] = _Seen(now, now)
            seen.last = now
            seen.tracks.add(track.id)
            self._tracks[track.id] = track  # its votes are read at the end
            self.minute.present.add(student)

    def tracks_ended(self, tracks: list[Track]) -> None:
        for track in tracks:
            only_unknown = bool(track.votes) and set(track.votes) == {UNKNOWN}
            if only_unknown and track.votes[UNKNOWN] >= self.config.votes_to_settle:
                self.unknown += 1
                self.minute.unknown_tracks += 1

    def take_minute(self, now: float) -> dict[str, Any]:
        """The minute's aggregates; a new minute starts at ``now``."""
        message = self.minute.to_message()
        self.minute = Minute(now)
        self.minutes.append(message)
        return message

    def _confidence(self, student: str) -> float:
        seen = self.seen[student]
        agree = total = 0
        for track_id in seen.tracks:
            track = self._tracks[track_id]
            agree += track.votes[student]
            total += sum(track.votes.values())
        return round(agree / total, 3) if total else 0.0

    def finish(self, end: float) -> dict[str, Any]:
        """Per-student records (stay on the device, sealed) and the counts (may leave it)."""
        late_after = self.start + 60 * self.config.late_after_min
        gone_before = end - 60 * self.config.left_early_min
        students: dict[str, dict[str, Any]] = {}
        for student in sorted(self.enrolled):
            seen = self.seen.get(student)
            if seen is None:
                students[student] = {"status": "absent", "confidence": 0.0}
                continue
            late = seen.first > late_after
            left_early = seen.last < gone_before
            status = "late" if late else "left_early" if left_early else "present"
            students[student] = {
                "status": status,
                "late": late,
                "left_early": left_early,
                "first_seen_min": round((seen.first - self.start) / 60, 2),
                "last_seen_min": round((seen.last - self.start) / 60, 2),
                "confidence": self._confidence(student),
            }
        counts = Counter(r["status"] for r in students.values())
        return {
            "lesson": self.lesson_id,
            "start": self.start,
            "end": end,
            "students": students,
            "counts": {s: counts.get(s, 0) for s in STATUSES},
            "unknown": self.unknown,
            "minutes": self.minutes,
        }

    def summary(self) -> dict[str, Any]:
        """The lesson's engagement aggregates (counts and rates only: may leave the room)."""
        heads = [m["head_count"] for m in self.minutes if m["samples"]]
        rates = [m["head_up_rate"] for m in self.minutes if m["head_up_rate"] is not None]
        hands = self.hands()
        return {
            "head_count": round(statistics.median(heads)) if heads else 0,
            "head_count_max": max((m["head_count_max"] for m in self.minutes), default=0),
            "head_up_rate": round(statistics.fmean(rates), 3) if rates else None,
            "hand_raises": None if hands is None else sum(h["count"] for h in hands),
        }

    def hands(self) -> list[dict[str, Any]] | None:
        """The report's hand-raise timeline: one row per measured minute (``minute``: its
        start in minutes since the lesson's start, ``count``); None when none was measured."""
        rows = [
            {"minute": round((m["minute_start"] - self.start) / 60, 2), "count": m["hand_raises"]}
            for m in self.minutes
            if m.get("hand_raises") is not None
        ]
        return rows or None
