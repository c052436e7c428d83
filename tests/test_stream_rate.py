"""The layer controller with stream.link's rural tuning, on feedback recorded from real
lessons through the impairment shim (bench/lesson.py, rural-poor: 150 ms RTT, 5 % loss,
1 Mbit/s): the main room's getStats() loss/RTT every 2 s and the receiver's REMB.

Recorded with ``describe()`` once a second on the main room (``estimate_kbps`` is the
REMB, ``loss_percent``/``rtt_ms`` the receiver reports of our video). The same feedback
through the untuned policy is the control: it stopped the video (audio only) for the
rest of the window, on a line that carries the low layer with no queue at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.stream.layers import LayerPolicy, LayerPolicySettings
from agent.stream.peer import GCC_LOSS_HOLD_PERCENT, UP_ESTIMATE_RATIO

# (seconds, estimate kbps or None, loss % or None, RTT ms or None, low layer kbps sent)
RURAL_POOR = [
    (2.8, None, 7.4, None, 422),
    (4.8, 431, 4.3, 153.7, 441),
    (5.8, 431, 4.3, 153.7, 441),
    (6.8, 404, 5.5, 153.7, 465),
    (7.8, 437, 5.5, 153.7, 465),
    (8.8, 411, 6.2, 154.4, 426),
    (9.8, 411, 6.2, 154.4, 426),
    (10.8, 411, 6.2, 154.2, 430),
    (12.8, 438, 5.2, 154.7, 440),
    (14.8, 407, 6.0, 154.4, 437),
    (16.8, 440, 5.1, 154.0, 445),
    (18.8, 412, 5.8, 155.1, 447),
    (20.8, 430, 4.9, 154.6, 446),
]

# Made up in the shape of a 2 Mbit/s line with 1-2 % loss (rural-good): the estimate
# climbs ~8 %/s while no queue builds.
RURAL_GOOD = [
    (t, 500 + 40 * t, 1.0 if t % 4 else 1.8, 61.0, 480) for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
]


def tuned(**changes: Any) -> LayerPolicySettings:
    """What PeerSession builds with the default stream.link (start_low)."""
    return dataclasses.replace(
        LayerPolicySettings(high_kbps=2500, low_kbps=500),
        start="low",
        first_up_after_s=4.0,
        corroborate_loss_percent=GCC_LOSS_HOLD_PERCENT,
        up_estimate_ratio=UP_ESTIMATE_RATIO,
        **changes,
    )


def replay(p: LayerPolicy, feedback: list[tuple[Any, ...]]) -> list[str]:
    states = []
    for at, estimate, loss, rtt, low_kbps in feedback:
        p.observe_rates(high_kbps=None, low_kbps=low_kbps)
        if estimate is not None:
            p.observe_estimate(int(estimate * 1000), at)
        p.observe_link(at, loss_percent=loss, rtt_ms=rtt)
        states.append(p.decide(at))
    return states


def test_random_loss_with_no_queue_keeps_the_low_layer() -> None:
    p = LayerPolicy(tuned(), now=0.0, state="low")
    states = replay(p, RURAL_POOR)
    assert set(states) == {"low"}, states
    assert p.switches == 0
    # Not once did it climb to the high layer either: 5 % loss is not a good link, and
    # the estimate never rose 1.3x above what the low layer needs.


def test_the_untuned_policy_stops_the_video_on_the_same_feedback() -> None:
    p = LayerPolicy(LayerPolicySettings(high_kbps=2500, low_kbps=500), now=0.0, state="low")
    states = replay(p, RURAL_POOR)
    assert states[-1] == "paused", states
    assert "estimate" in p.reason


def test_a_queue_building_still_stops_the_lowest_layer() -> None:
    """Delay is the congestion signal: the same estimates with the RTT 200 ms over its
    floor (a queue filling) pause the video, audio first."""
    queued = [
        (t, e, loss, None if rtt is None else rtt + (200 if t > 6 else 0), r)
        for t, e, loss, rtt, r in RURAL_POOR
    ]
    p = LayerPolicy(tuned(), now=0.0, state="low")
    states = replay(p, queued)
    assert states[-1] == "paused", states


def test_a_good_line_climbs_after_the_short_first_hold() -> None:
    p = LayerPolicy(tuned(), now=0.0, state="low")
    states = replay(p, RURAL_GOOD)
    assert states[-1] == "high", states
    assert p.ups == 1
    # Good for 4 s at t=5, but the estimate (700) was not yet 1.3x the low layer's need
    # (480 + 64 kbps): one sample later it was.
    assert p.reason == "link good for 5 s"


def test_no_climb_while_the_estimate_shows_no_room() -> None:
    """Low loss for a moment on a thin line (the estimate flat at what arrives) is not a
    reason to send 2.5 Mbit/s into it."""
    flat = [(t, 450, 1.0, 154.0, 440) for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)]
    p = LayerPolicy(tuned(), now=0.0, state="low")
    assert set(replay(p, flat)) == {"low"}
    untuned = LayerPolicy(
        dataclasses.replace(LayerPolicySettings(high_kbps=2500, low_kbps=500), up_after_s=4.0),
        now=0.0,
        state="low",
    )
    assert replay(untuned, flat)[-1] == "high"  # the timed probe the tuning holds back
