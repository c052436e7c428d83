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

from agent.config import LinkConfig, StreamConfig
from agent.stream import EncoderSettings, LinkTuning
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
    fields: dict[str, Any] = {
        "start": "low",
        "first_up_after_s": 4.0,
        "corroborate_loss_percent": GCC_LOSS_HOLD_PERCENT,
        "up_estimate_ratio": UP_ESTIMATE_RATIO,
        **changes,
    }
    return dataclasses.replace(LayerPolicySettings(high_kbps=2500, low_kbps=500), **fields)


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


# -- the floor layer -----------------------------------------------------------------------


def with_floor(**changes: Any) -> LayerPolicySettings:
    return tuned(floor_kbps=200, **changes)


def thin_line(at: float, loss: float, rtt: float, estimate: float) -> tuple[Any, ...]:
    return (at, estimate, loss, rtt, 440)


def test_a_line_too_thin_for_the_low_layer_gets_the_floor_before_audio_only() -> None:
    """A 400 kbit/s line: the low layer (~440 kbps sent) queues, the RTT climbs 150 ms
    over its floor and the estimate falls; the ladder takes the floor first, and only a
    line that cannot carry that either loses its picture."""
    p = LayerPolicy(with_floor(), now=0.0, state="low")
    queued = [thin_line(t, 6.0, 150 + 40 * (t - 1), 330) for t in range(1, 12)]
    states = replay(p, queued)
    assert states[-1] == "floor", states
    assert p.cause in {"delay", "bandwidth"}
    # On the floor (~200 kbps) the queue drains: it stays, no pause.
    p.observe_rates(high_kbps=None, low_kbps=None, floor_kbps=190)
    drained = [(t, 330, 4.0, 152.0, 440) for t in (12.0, 14.0, 16.0, 18.0)]
    for at, estimate, loss, rtt, _ in drained:
        p.observe_estimate(int(estimate * 1000), at)
        p.observe_link(at, loss_percent=loss, rtt_ms=rtt)
        assert p.decide(at) == "floor"


def test_the_floor_steps_to_audio_only_on_heavy_loss_and_climbs_back_through_the_ladder() -> None:
    p = LayerPolicy(with_floor(first_up_after_s=None, up_after_s=4.0), now=0.0, state="floor")
    for at in (1.0, 2.0, 3.5):
        p.observe_link(at, loss_percent=30.0, rtt_ms=160.0)
        p.decide(at)
    assert p.state == "paused"
    assert p.cause == "loss"
    states = []
    for at in range(5, 40):
        p.observe_link(float(at), loss_percent=0.0, rtt_ms=150.0)
        states.append(p.decide(float(at)))
    assert "floor" in states  # the ladder is climbed one rung at a time
    assert states.index("floor") < states.index("low") < states.index("high")


def test_without_the_floor_the_ladder_is_as_before() -> None:
    p = LayerPolicy(tuned(), now=0.0, state="low")
    assert p.settings.levels() == ("paused", "low", "high")
    queued = [thin_line(t, 6.0, 150 + 40 * (t - 1), 330) for t in range(1, 12)]
    assert replay(p, queued)[-1] == "paused"


def test_the_baseline_turns_every_part_off() -> None:
    """The benchmark's "before" (LinkConfig.baseline()) is the lesson as it was: aiortc's
    audio, its video buffer, two layers with 1 s keyframe bursts, rooms starting high."""
    config = StreamConfig(link=LinkConfig.baseline())
    assert LinkTuning.from_config(config.link) == LinkTuning.baseline()
    settings = EncoderSettings.from_config(config)
    assert not settings.floor_enabled
    assert settings.low_vbv_buffer_s == settings.vbv_buffer_s == 1.0
    assert LayerPolicySettings.for_encoder(settings).levels() == ("paused", "low", "high")
    tuned_settings = EncoderSettings.from_config(StreamConfig())
    assert tuned_settings.floor_enabled
    assert tuned_settings.low_vbv_buffer_s == 0.25


def test_reports_about_the_layer_left_behind_do_not_push_the_floor_to_audio_only() -> None:
    """Stepping down to the floor, the next receiver reports still count the loss of the
    low layer's congestion: with settle_after_down_s they are not used against the floor;
    loss that goes on after it still is."""
    settle = with_floor(settle_after_down_s=3.0, down_after_s=2.0)
    p = LayerPolicy(settle, now=0.0, state="low")
    for at in (1.0, 2.0, 3.5):
        p.observe_link(at, loss_percent=12.0, rtt_ms=160.0)
        p.decide(at)
    assert p.state == "floor"
    for at in (4.0, 5.0, 6.0):  # old news: the low layer's congestion
        p.observe_link(at, loss_percent=25.0, rtt_ms=160.0)
        assert p.decide(at) == "floor"
    for at in (7.0, 8.0, 9.5):  # still losing a quarter on the floor: audio only
        p.observe_link(at, loss_percent=25.0, rtt_ms=160.0)
        p.decide(at)
    assert p.state == "paused"
    eager = LayerPolicy(with_floor(down_after_s=2.0), now=0.0, state="low")
    for at in (1.0, 2.0, 3.5, 4.0, 5.0, 6.0):
        eager.observe_link(at, loss_percent=12.0 if at < 4 else 25.0, rtt_ms=160.0)
        eager.decide(at)
    assert eager.state == "paused"  # the control: without settling it paused at once
