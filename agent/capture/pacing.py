"""Real-time pacing for sources that are not paced by hardware (files, synthetic patterns)."""

from __future__ import annotations

import threading
import time

from agent.capture.errors import ReadInterruptedError


class Pacer:
    """Releases one tick per period of real time.

    Small lateness is made up so the average rate holds; a large stall (a slow decode,
    a paused machine) restarts the schedule instead of bursting frames to catch up,
    which would look like a fast-forward to every consumer.
    """

    def __init__(self, rate_hz: float) -> None:
        self.period_ns = round(1e9 / rate_hz)
        self._next_ns: int | None = None

    def reset(self) -> None:
        self._next_ns = None

    def wait(self, interrupt: threading.Event) -> None:
        """Block until the next tick; raise ReadInterruptedError if ``interrupt`` is set."""
        now = time.monotonic_ns()
        if self._next_ns is None:
            self._next_ns = now
        delay = self._next_ns - now
        if delay > 0:
            if interrupt.wait(delay / 1e9):
                raise ReadInterruptedError("stopping")
        elif -delay > 2 * self.period_ns:
            self._next_ns = now
        if interrupt.is_set():
            raise ReadInterruptedError("stopping")
        self._next_ns += self.period_ns
