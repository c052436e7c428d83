"""S-T analysis of a lesson from its talk: the sample sequence, Rt, Ch and the lesson mode.

The standard method samples the lesson at a fixed interval (30 s) and writes each sample
as T (teacher behaviour: lecturing, explaining, questioning, demonstrating) or S (student
behaviour: answering, discussing, practising, thinking, writing). From the talk spans of
:mod:`agent.sensing.talk` each interval becomes one sample by this rule:

* **T** when the teacher talked for at least ``min_teacher_share`` of the interval (25 %)
  and at least as long as the class did;
* **S** otherwise: the class talked more, or the room was mostly quiet (silent practice
  and thinking are student behaviour in S-T analysis).

A last interval shorter than half the interval is not sampled.

Rt = N_T / N (teacher share), Ch = (g - 1) / N (g = the number of runs of equal samples,
how often the behaviour changes hands). Mode, by the standard thresholds: practice when
Rt <= 0.3, lecture when Rt >= 0.7, dialogue when Ch >= 0.4, mixed otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.contracts import StMode
from agent.sensing.talk import Span

SAMPLE_INTERVAL_S = 30.0  # the standard S-T sampling interval
PRACTICE_RT, LECTURE_RT, DIALOGUE_CH = 0.3, 0.7, 0.4

Mode = StMode  # the contract's (the sensing topic's ``st`` message carries it)


@dataclass(frozen=True)
class StResult:
    """One lesson's S-T figures (aggregates only: safe to publish)."""

    samples: str  # e.g. "TTSTS...", one letter per interval
    interval_s: float
    rt: float
    ch: float
    runs: int
    mode: Mode

    @property
    def n(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "interval_s": self.interval_s,
            "n": self.n,
            "n_t": self.samples.count("T"),
            "runs": self.runs,
            "rt": round(self.rt, 3),
            "ch": round(self.ch, 3),
            "mode": self.mode,
        }


def sample(
    spans: Iterable[Span],
    duration_s: float,
    *,
    interval_s: float = SAMPLE_INTERVAL_S,
    min_teacher_share: float = 0.25,
) -> str:
    """One T or S per ``interval_s`` of the lesson, by the rule in the module docstring."""
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    spans = list(spans)
    count = int(duration_s // interval_s)
    if duration_s - count * interval_s >= interval_s / 2:
        count += 1
    out = []
    for k in range(count):
        lo, hi = k * interval_s, min(duration_s, (k + 1) * interval_s)
        talk = {"T": 0.0, "S": 0.0}
        for span in spans:
            overlap = min(hi, span.end_s) - max(lo, span.start_s)
            if overlap > 0:
                talk[span.speaker] += overlap
        teacher = talk["T"] >= min_teacher_share * (hi - lo) and talk["T"] >= talk["S"]
        out.append("T" if teacher else "S")
    return "".join(out)


def mode_of(rt: float, ch: float) -> Mode:
    if rt <= PRACTICE_RT:
        return "practice"
    if rt >= LECTURE_RT:
        return "lecture"
    if ch >= DIALOGUE_CH:
        return "dialogue"
    return "mixed"


def analyse(samples: str, interval_s: float = SAMPLE_INTERVAL_S) -> StResult:
    """Rt, Ch and the mode of a T/S sample sequence."""
    if set(samples) - {"T", "S"}:
        raise ValueError("samples must be a string of T and S")
    n = len(samples)
    if n == 0:
        return StResult("", interval_s, 0.0, 0.0, 0, "mixed")
    runs = 1 + sum(1 for a, b in itertools.pairwise(samples) if a != b)
    rt = samples.count("T") / n
    ch = (runs - 1) / n
    return StResult(samples, interval_s, rt, ch, runs, mode_of(rt, ch))
