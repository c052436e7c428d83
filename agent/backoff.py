"""The one retry delay used everywhere: broker reconnects, device reopens, service restarts."""

from __future__ import annotations

import math
import random


def backoff_delay(
    attempt: int, min_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (0-based): capped exponential backoff with
    full jitter, ``uniform(0, min(max_s, min_s * 2**attempt))``.

    Full jitter spreads a fleet that lost the broker (or power) at the same moment over
    the whole window instead of bringing it back in synchronized waves.
    """
    cap = min(max_s, min_s * math.pow(2.0, min(max(attempt, 0), 64)))
    return (rng or random).uniform(0.0, cap)
