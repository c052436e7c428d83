"""Which layer each receiving room gets: high, low, or no video at all (audio first).

A room on a poor link must not drag the lesson down for itself (a smeared, stalling
picture and, worse, choppy sound) or anyone else. Per peer, :class:`LayerPolicy` looks
at what the link tells the sender and picks ``"high"``, ``"low"`` or ``"paused"``:

* the receiver's bandwidth estimate (REMB; aiortc's receivers send one about every
  0.5 s, captured by :func:`agent.stream.hooks.route_bitrate_estimates`),
* the loss and round-trip time of the video we send (the peer's receiver reports, read
  by :class:`~agent.stream.peer.PeerSession`'s ``getStats()`` poller).

Step down when the current layer does not fit (the estimate is below what the layer
sends plus an audio headroom, loss above a limit, or the RTT grows by a queue's worth)
for ``down_after_s``; step up one level only after the link has been good for
``up_after_s`` (hysteresis), twice as long after each step up that failed at once.
Pausing on the estimate alone also needs some loss or a growing RTT: a single overuse
(one keyframe burst) makes the same fall as a link that is really too small.

Reading the estimate needs care, because of how aiortc 1.16 makes it (``aiortc/rate.py``,
WebRTC's AIMD control): it is clamped to 1.5x the bitrate the receiver actually gets,
and after a step up it climbs only ~8 %/s. So it says "the link is full" only once it
has *fallen* (overuse seen by the receiver: estimate = 0.85x the incoming rate);
before that, on a layer we just started, a low value is the ramp, not the link. The
policy trusts a low estimate only after a fall since the current layer began; and as
the estimate can never show room for the high layer while we send the low one, a step
up is a probe that the backoff keeps from flapping.

"Audio always has priority": when even the low layer does not fit, the track is
*paused*: it sends no video at all (not even occasional keyframes, whose bursts would
queue in front of the audio on exactly the links that cannot take them), and Opus keeps
the lesson audible. The receiver keeps the last picture; audio keeps the receiving
room's media watch satisfied. A session that sends no audio never pauses (the low layer
is then the floor): with nothing flowing its receiver would reconnect. While paused no
estimate arrives (it is made from the video), so the way back is the same timed probe:
after the hold, resume the low layer with a keyframe.

:class:`LayerPolicy` is pure (samples and a clock in, a state out) for unit tests;
:class:`LayerControl` ties one to a track, the encoder's measured layer rates and the
sender.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.stream.encoder import EncodedVideoTrack, EncoderSettings, LayerState, VideoLayer

log = logging.getLogger(__name__)

_LEVELS: tuple[LayerState, ...] = ("paused", "low", "high")
ESTIMATE_FALL = 0.95  # an estimate below 95 % of the previous one: the receiver saw overuse


@dataclass(frozen=True, slots=True)
class LayerPolicySettings:
    """Thresholds of :class:`LayerPolicy` (kbps, percent, milliseconds, seconds)."""

    high_kbps: int = 2500  # the layers' configured bitrates (their most)
    low_kbps: int = 500
    floor_kbps: int | None = None  # the floor layer's (None: no floor, two layers)
    audio_headroom_kbps: int = 64  # Opus and RTCP must fit beside the video
    down_loss_percent: float = 5.0  # high -> low above this loss
    pause_loss_percent: float = 15.0  # low -> paused above this loss
    good_loss_percent: float = 2.0  # a step up needs loss at most this
    queue_delay_ms: float = 250.0  # RTT this far above the lowest seen: queues building
    down_after_s: float = 2.0  # a bad link must stay bad this long (one stats interval)
    up_after_s: float = 10.0  # hysteresis: a good link must stay good this long
    max_up_after_s: float = 160.0  # ... doubled after each failed step up, up to this
    failed_within_s: float = 20.0  # a step down this soon after a step up: it failed
    sample_max_age_s: float = 6.0  # older estimates and loss figures are not used
    allow_pause: bool = True  # False: the low layer is the floor (no audio to protect)
    # Loss that confirms a falling estimate before the lowest layer stops (None:
    # down_loss_percent). A rural line loses 5 % at random with no queue at all: GCC
    # takes 2-10 % loss as no reason to slow down, and the RTT shows real queues.
    corroborate_loss_percent: float | None = None
    up_estimate_ratio: float | None = None  # a climb needs estimate >= this x need
    settle_after_down_s: float = 0.0  # after a step down, loss/RTT this old are not used
    start: LayerState = "high"  # the layer a new session starts on
    first_up_after_s: float | None = None  # the first climb's hysteresis (None: up_after_s)

    @classmethod
    def for_encoder(cls, settings: EncoderSettings, **changes: Any) -> LayerPolicySettings:
        """Thresholds for the layers ``settings`` makes (``changes``: other fields)."""
        floor = settings.floor_bitrate_kbps if settings.floor_enabled else None
        return cls(
            high_kbps=settings.bitrate_kbps,
            low_kbps=settings.low_bitrate_kbps,
            floor_kbps=floor,
            **changes,
        )

    def levels(self) -> tuple[LayerState, ...]:
        """The ladder, lowest first: paused, (floor,) low, high."""
        return _LEVELS if self.floor_kbps is None else ("paused", "floor", "low", "high")


LayerCause = Literal["start", "loss", "bandwidth", "delay", "probe", "pinned"]
"""Why a room is on its layer, in a word a page can translate (``layer_reason`` is the
maintenance log's English sentence)."""


def cause_of(reason: str) -> LayerCause:
    """The :data:`LayerCause` of one of :class:`LayerPolicy`'s reasons."""
    if reason.startswith("loss"):
        return "loss"
    if reason.startswith("estimate"):
        return "bandwidth"
    if reason.startswith("RTT"):
        return "delay"
    if reason.startswith("link good"):
        return "probe"
    return "start"


class LayerPolicy:
    """One peer's layer decision, fed with samples and a clock (``now``: monotonic s).

    Call the ``observe_*`` methods as samples arrive and :meth:`decide` after them; the
    result is :attr:`state`, and :attr:`reason` says why it last changed.
    """

    def __init__(
        self,
        settings: LayerPolicySettings | None = None,
        *,
        now: float,
        state: LayerState = "high",
    ) -> None:
        self.settings = settings or LayerPolicySettings()
        self.state: LayerState = state
        self.since = now  # when the current state began
        self.reason = "start"
        self.cause: LayerCause = "start"
        self.switches = 0
        self.downs = 0
        self.ups = 0
        self.failed_ups = 0
        self._estimate: tuple[float, int] | None = None  # (at, bps)
        self._estimate_fell_at: float | None = None
        self._loss: tuple[float, float] | None = None  # (at, percent)
        self._rtt: tuple[float, float] | None = None  # (at, ms)
        self._min_rtt_ms: float | None = None
        self._rates: dict[VideoLayer, float | None] = {"high": None, "low": None, "floor": None}
        self._levels = self.settings.levels()
        self._bad_since: float | None = None
        self._good_since: float | None = None
        self._last_up_at: float | None = None
        self._settled_at = -1e9  # loss and RTT taken before this are not used

    # -- samples ---------------------------------------------------------------------------

    def observe_estimate(self, bps: int, now: float) -> None:
        """A receiver estimate (REMB), bits per second."""
        previous = self._estimate
        if previous is not None and bps < previous[1] * ESTIMATE_FALL:
            self._estimate_fell_at = now
            if self._good_since is not None:
                self._good_since = now  # a good link is one that stopped overusing
        self._estimate = (now, bps)

    def observe_link(self, now: float, *, loss_percent: float | None, rtt_ms: float | None) -> None:
        """The peer's latest view of our video: loss over its last report interval, RTT."""
        if loss_percent is not None:
            self._loss = (now, loss_percent)
        if rtt_ms is not None:
            self._rtt = (now, rtt_ms)
            self._min_rtt_ms = rtt_ms if self._min_rtt_ms is None else min(self._min_rtt_ms, rtt_ms)

    def observe_rates(
        self, *, high_kbps: float | None, low_kbps: float | None, floor_kbps: float | None = None
    ) -> None:
        """What each layer really sends now (None: not encoded): a still picture needs far
        less than the configured bitrate, and the estimate is compared with that."""
        self._rates = {"high": high_kbps, "low": low_kbps, "floor": floor_kbps}

    # -- the decision ----------------------------------------------------------------------

    def need_kbps(self, layer: VideoLayer) -> float:
        """What ``layer`` needs: its measured rate, at most its configured bitrate."""
        s = self.settings
        caps = {"high": s.high_kbps, "low": s.low_kbps, "floor": s.floor_kbps or s.low_kbps}
        cap = float(caps[layer])
        measured = self._rates[layer]
        return cap if measured is None or measured <= 0 else min(cap, measured)

    def up_after_s(self) -> float:
        """The current hysteresis: longer after each step up that failed."""
        s = self.settings
        if s.first_up_after_s is not None and self.ups == 0 and self.downs == 0:
            return s.first_up_after_s  # started low on purpose: a quick first probe
        return min(s.max_up_after_s, s.up_after_s * 2.0**self.failed_ups)

    def _fresh(self, sample: tuple[float, float] | None, now: float) -> float | None:
        """A sample taken in this state and recent enough to judge it by."""
        if (
            sample is None
            or sample[0] < max(self.since, self._settled_at)
            or now - sample[0] > self.settings.sample_max_age_s
        ):
            return None
        return sample[1]

    def _estimate_kbps(self, now: float) -> float | None:
        if self._estimate is None or now - self._estimate[0] > self.settings.sample_max_age_s:
            return None
        return self._estimate[1] / 1000

    def _floor(self) -> LayerState:
        return "paused" if self.settings.allow_pause else self._levels[1]

    def _bad(self, now: float) -> str | None:
        """Why the current layer does not fit (None: it does, as far as we know)."""
        s = self.settings
        if self.state == "paused":
            return None
        loss = self._fresh(self._loss, now)
        # Loss stops the lowest video layer only when it is heavy; a middle rung (low,
        # with a floor below it) steps down at GCC's 10 % (rural lines lose 5 % at random).
        if self.state == "high":
            limit = s.down_loss_percent
        elif self.state == self._levels[1]:
            limit = s.pause_loss_percent
        else:
            limit = max(s.down_loss_percent, s.corroborate_loss_percent or 0.0)
        if loss is not None and loss > limit:
            return f"loss {loss:.1f} % > {limit:g} %"
        estimate = self._estimate_kbps(now)
        # Strictly after: the fall that ended the previous layer says nothing of this one.
        fell = self._estimate_fell_at is not None and self._estimate_fell_at > self.since
        need = self.need_kbps(self.state) + s.audio_headroom_kbps
        rtt = self._fresh(self._rtt, now)
        queued = None if rtt is None or self._min_rtt_ms is None else rtt - self._min_rtt_ms
        if estimate is not None and fell and estimate < need:
            # One overuse (a keyframe burst) also makes a fall, and aiortc caps its
            # estimate at 1.5x what arrives, so a quiet picture lowers it too: dropping to
            # the low layer costs little, stopping the video needs the link to agree
            # (real loss, not a rural line's usual 2-3 %, or queues building).
            loss_limit = (
                s.down_loss_percent
                if s.corroborate_loss_percent is None
                else s.corroborate_loss_percent
            )
            corroborated = (loss is not None and loss > loss_limit) or (
                queued is not None and queued > s.queue_delay_ms / 2
            )
            if self.state == "high" or corroborated:
                return f"estimate {estimate:.0f} kbps < {need:.0f} kbps"
        if queued is not None and queued > s.queue_delay_ms:
            return f"RTT {rtt:.0f} ms, {queued:.0f} ms above its lowest"
        return None

    def _good(self, now: float) -> bool:
        """Nothing says the link is full: loss low, RTT flat (an estimate fall restarts
        the good time instead, in :meth:`observe_estimate`)."""
        s = self.settings
        loss = self._fresh(self._loss, now)
        if loss is not None and loss > s.good_loss_percent:
            return False
        rtt = self._fresh(self._rtt, now)
        return not (
            rtt is not None
            and self._min_rtt_ms is not None
            and rtt - self._min_rtt_ms > s.queue_delay_ms / 2
        )

    def decide(self, now: float) -> LayerState:
        """The state for now (changes :attr:`state` when a condition has held long enough)."""
        bad = self._bad(now)
        if bad is not None:
            self._good_since = None
            if self._bad_since is None:
                self._bad_since = now
            if now - self._bad_since >= self.settings.down_after_s and self.state != self._floor():
                self._step(-1, now, bad)
            return self.state
        self._bad_since = None
        if not self._good(now):
            self._good_since = None
            return self.state
        if self._good_since is None:
            self._good_since = now
        held = now - self._good_since
        if self.state != "high" and held >= self.up_after_s() and self._headroom(now):
            self._step(+1, now, f"link good for {held:.0f} s")
        return self.state

    def _headroom(self, now: float) -> bool:
        """Whether the receiver's estimate has climbed far enough above what the current
        layer needs to try the next one (always, without ``up_estimate_ratio`` or a fresh
        estimate: the step is then a timed probe). aiortc's estimate climbs ~8 %/s to 1.5x
        what arrives while it sees no queue building, so a ratio of 1.3 means "no overuse
        seen for a few seconds", which a line that only just carries the layer never shows."""
        ratio = self.settings.up_estimate_ratio
        estimate = self._estimate_kbps(now)
        if ratio is None or estimate is None or self.state == "paused":
            return True
        return estimate >= ratio * (self.need_kbps(self.state) + self.settings.audio_headroom_kbps)

    def _step(self, direction: int, now: float, reason: str) -> None:
        before = self.state
        self.state = self._levels[self._levels.index(before) + direction]
        if direction < 0:
            self.downs += 1
            # The next receiver reports still count the congestion that made us step down.
            self._settled_at = now + self.settings.settle_after_down_s
            failed = (
                self._last_up_at is not None
                and now - self._last_up_at < self.settings.failed_within_s
            )
            self.failed_ups = self.failed_ups + 1 if failed else 0
        else:
            self.ups += 1
            self._last_up_at = now
        self.switches += 1
        self.since = now
        self.reason = reason
        self.cause = cause_of(reason)
        self._bad_since = self._good_since = None
        log.info("layer %s -> %s: %s", before, self.state, reason)

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.state,
            "layer_switches": self.switches,
            "layer_downs": self.downs,
            "layer_ups": self.ups,
            "layer_reason": self.reason,
            "layer_cause": self.cause,
            "estimate_kbps": None if self._estimate is None else round(self._estimate[1] / 1000),
        }


class LayerControl:
    """One peer's policy applied to its video track; fed by the sender and the poller.

    ``rates(layer)`` gives a layer's measured kbps (the encoder's ``layer_kbps``);
    ``clock`` is ``time.monotonic`` except in tests. :meth:`pin` overrides the policy
    (the teacher's panel choosing a layer for a room); the policy keeps observing.
    """

    def __init__(
        self,
        track: EncodedVideoTrack,
        policy: LayerPolicy,
        rates: Callable[[VideoLayer], float | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.track = track
        self.policy = policy
        self._rates = rates
        self._clock = clock
        self.pinned: LayerState | None = None
        track.set_state(policy.state)

    @property
    def state(self) -> LayerState:
        """What the track is to send: the pin, else the policy's choice."""
        return self.policy.state if self.pinned is None else self.pinned

    def pin(self, state: LayerState | None) -> None:
        """Send ``state`` whatever the policy says (None: follow the policy again)."""
        self.pinned = state
        self.track.set_state(self.state)

    def on_estimate(self, bps: int) -> None:
        now = self._clock()
        self.policy.observe_estimate(bps, now)
        self._apply(now)

    def on_link(self, *, loss_percent: float | None, rtt_ms: float | None) -> None:
        now = self._clock()
        self.policy.observe_link(now, loss_percent=loss_percent, rtt_ms=rtt_ms)
        self._apply(now)

    def _apply(self, now: float) -> None:
        self.policy.observe_rates(
            high_kbps=self._rates("high"),
            low_kbps=self._rates("low"),
            floor_kbps=self._rates("floor"),
        )
        self.policy.decide(now)
        self.track.set_state(self.state)  # a no-op when already there

    def describe(self) -> dict[str, Any]:
        """The policy's figures, with ``layer`` what the track really sends now."""
        described = {**self.policy.describe(), "layer": self.track.state, "pinned": self.pinned}
        if self.pinned is not None:
            described["layer_cause"] = "pinned"
        return described
