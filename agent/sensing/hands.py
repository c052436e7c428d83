"""Hand raising over time: whom to look at each sample, and when a raised hand is an event.

:func:`agent.sensing.pose.hand_raised` answers for one set of keypoints; a classroom asks
more: who put a hand up and kept it there. :class:`HandRaising` is fed one sample at a
time (the frame and its tracked faces) and keeps a small state per track. It is plain
code (no threads, no clock of its own): the sensing service calls it in its worker
thread, and the tests feed it real keypoints from real photos as successive samples.

**Schedule.** MoveNet costs about 10 ms a region, so a sample reads at most
``sensing.hand_regions_per_sample`` regions whatever the class size. Urgent people come
first: a track whose hand was seen up and not yet counted (it is read every sample until
the rule decides), and a track whose last reading was unknown after a known one (looked
at once more, at once). The rest are read in turn, least recently read first (a new
track has never been read, so it goes first). With 30 pupils, 4 regions and 5 samples a
second, each pupil is looked at every 1.5 s; a hand going up is then followed every
sample.

**The rule.** A *run* starts at a reading "up" and lasts while readings stay up. One
miss inside a run is tolerated (an unknown reading: a wrist blurred by motion, an arm
hiding the face; or a sample in which the track's face was not found); two in a row end
it. A reading "down" ends it. Up readings further apart than ``HAND_GAP_S`` (a schedule
saturated by many hands at once) do not join into one run. When a run has lasted
``sensing.hand_min_s`` (first to latest up reading) it is one hand raise, counted at that
reading. The same track counts again only after a reading "down": a hand held up for a
minute is one raise. Unknown is never down: a hand that goes out of view does not re-arm
the count.

**A hand on the head.** The keypoint test cannot tell a wrist held above the head from
a hand resting on top of it (both put the wrist above the eyes). Such a pose held for
``hand_min_s`` counts as one raise, once, and never again until the hand is seen down, so
a pupil leaning on a hand for the whole lesson adds one raise, not one a minute. With
``sensing.raise_room_hand`` it raises the room's hand once; the teacher lowers it.

What leaves the device is the count per minute; nothing here is stored per pupil beyond
the track ids of the current frame.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.config import SensingConfig
from agent.sensing.pipeline import FaceResult
from agent.sensing.pose import (
    DEFAULT_MIN_SCORE,
    Image,
    Keypoints,
    Region,
    body_region,
    hand_raised,
)

HAND_GAP_S = 4.0  # up readings further apart than this are two runs, not one
TOLERATED_MISSES = 1  # unknown readings in a row a run survives
FORGET_S = 10.0  # a track absent this long is forgotten (the tracker ends it after 3 s)
RECENT_SAMPLES = 50  # samples the health's regions-per-sample figure is the mean of
SLACK_S = 1e-3  # sample times are floats: a run 0.9999999 s long has lasted 1 s

Estimate = Callable[[Image, Region], Keypoints]  # PoseEstimator.keypoints


@dataclass
class _Person:
    """What the rule remembers about one track."""

    present: float  # the last sample the track was in
    checked: float | None = None  # the last reading
    answer: bool | None = None  # and what it said
    up_since: float | None = None  # first up reading of the current run
    last_up: float | None = None  # latest up reading of the current run
    misses: int = 0  # unknown readings in a row inside the run
    counted: bool = False  # this run was counted; re-armed by a down reading
    retry: bool = False  # unknown after a known answer: read again next sample

    @property
    def urgent(self) -> bool:
        return (self.up_since is not None and not self.counted) or self.retry


class HandRaising:
    """Hand-raise events of tracked people, from body keypoints read on a budget."""

    def __init__(
        self,
        min_s: float,
        regions_per_sample: int,
        estimate: Estimate,
        *,
        min_score: float = DEFAULT_MIN_SCORE,
    ) -> None:
        self.min_s = min_s
        self.regions_per_sample = regions_per_sample
        self.estimate = estimate
        self.min_score = min_score
        self.people: dict[int, _Person] = {}
        self.events = 0  # hand raises counted since the start
        self.regions = 0  # regions read since the start
        self.seconds = 0.0  # spent reading them
        self._recent: deque[int] = deque(maxlen=RECENT_SAMPLES)

    @classmethod
    def from_config(cls, config: SensingConfig, estimate: Estimate) -> HandRaising:
        return cls(config.hand_min_s, config.hand_regions_per_sample, estimate)

    # -- the schedule -------------------------------------------------------------------

    def schedule(self, now: float, tracks: Sequence[int]) -> list[int]:
        """The tracks (of those in this sample) whose keypoints to read now, at most
        ``regions_per_sample``: urgent ones first, then the least recently read."""
        for track in tracks:
            person = self.people.get(track)
            if person is None:
                self.people[track] = _Person(now)
            else:
                person.present = now
        for track, person in list(self.people.items()):
            if now - person.present > FORGET_S:
                del self.people[track]
            elif person.present != now:  # not in this sample: the face was not found
                self._miss(person)

        def priority(track: int) -> tuple[bool, float, int]:
            person = self.people[track]
            checked = -math.inf if person.checked is None else person.checked
            return (not person.urgent, checked, track)

        return sorted(set(tracks), key=priority)[: self.regions_per_sample]

    # -- the rule -----------------------------------------------------------------------

    def read(self, now: float, track: int, answer: bool | None) -> bool:
        """One reading of one track's hands (True up, False down, None unknown); True
        when it completes a hand raise."""
        person = self.people.setdefault(track, _Person(now))
        person.retry = answer is None and person.answer is not None
        person.checked, person.answer = now, answer
        if answer is False:
            person.up_since = person.last_up = None
            person.misses = 0
            person.counted = False
            return False
        if answer is None:
            self._miss(person)
            return False
        person.misses = 0
        if person.last_up is None or now - person.last_up > HAND_GAP_S:
            person.up_since = now
        person.last_up = now
        assert person.up_since is not None
        if person.counted or now - person.up_since < self.min_s - SLACK_S:
            return False
        person.counted = True
        self.events += 1
        return True

    @staticmethod
    def _miss(person: _Person) -> None:
        """An unknown reading, or a sample without the track: a run survives one."""
        if person.up_since is None:
            return
        person.misses += 1
        if person.misses > TOLERATED_MISSES:
            person.up_since = person.last_up = None
            person.misses = 0

    # -- one sample ---------------------------------------------------------------------

    def sample(self, now: float, image: Image, results: Sequence[FaceResult]) -> list[int]:
        """One analysed frame: the scheduled tracks' keypoints read and judged; the tracks
        whose hand raise this sample completed."""
        boxes = {r.track.id: r.face.box for r in results if r.track is not None}
        chosen = self.schedule(now, list(boxes))
        events: list[int] = []
        started = time.perf_counter()
        for track in chosen:
            keypoints = self.estimate(image, body_region(boxes[track]))
            if self.read(now, track, hand_raised(keypoints, self.min_score)):
                events.append(track)
        self.seconds += time.perf_counter() - started
        self.regions += len(chosen)
        self._recent.append(len(chosen))
        return events

    def regions_recent(self) -> float:
        """Regions read per sample, mean over the last RECENT_SAMPLES samples."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def ms_per_region(self) -> float:
        return 1000 * self.seconds / self.regions if self.regions else 0.0
