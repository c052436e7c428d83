"""A rural link in user space: delay, jitter, loss and a rate-limited bottleneck applied
to every ICE/RTP datagram aioice sends and receives in this process.

``tc netem`` is not available on the machines this project is tested on, so tests and
benchmarks that need a bad network use :func:`impaired` instead. It is never used by
the daemon: nothing in ``agent`` imports this module outside tests and ``bench``.

Hook (aioice 0.13, private API, :func:`agent.stream.hooks.intercept_stun_datagrams`):
every ICE candidate pair, host or relayed, talks through an ``aioice.ice.StunProtocol``.
Its three methods carry every datagram:

* ``datagram_received(data, addr)``: everything received (STUN, DTLS, SRTP, SRTCP);
* ``send_stun(message, addr)``: STUN requests and responses sent;
* ``send_data(data, addr)`` (a coroutine that only calls ``self.transport.sendto``):
  DTLS/SRTP/SRTCP sent.

While a :func:`impaired` block is active the three are replaced on the class (so
sockets opened before the block are impaired too) and restored when it ends. They are
checked by name, signature and (for ``send_data``) body at activation: an aioice
upgrade that renames or reshapes them raises :class:`ImpairmentUnavailable` instead of
silently running unimpaired. Other aioice sockets (mDNS) are not touched, nor is the
MQTT link: only media and ICE see the impaired link.

The link model, per direction (one outbound and one inbound direction per process,
shared by every socket, like a room's one access line):

1. loss: Bernoulli with probability ``loss``, or Gilbert (bursts of mean length
   ``loss_burst`` packets, same average loss) when ``loss_burst > 1``;
2. the bottleneck, with ``rate_kbps``: a token bucket one packet deep draining a
   drop-tail FIFO that holds ``queue_ms`` of the rate; a packet that would wait longer
   than ``queue_ms`` is dropped (a 2 Mbit/s link first queues, then drops, like a real
   one);
3. propagation: ``delay_ms / 2`` plus a uniform jitter of ``±jitter_ms / 2``; packets
   are never reordered (a late packet holds back the ones behind it).

Delay convention: half of ``delay_ms`` on the way out and half on the way in, so the
round trip between this process and an *unimpaired* peer is ``delay_ms`` (the bench's
"60 ms RTT": receivers impaired, the main room not). Two peers that are both in the
impaired process cross the shim twice each way: their round trip is ``2 * delay_ms``
and each one-way trip sees ``loss`` twice. ``loss`` and ``rate_kbps`` apply to each
direction on its own (a one-way media stream sees ``loss``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.stream import hooks

log = logging.getLogger(__name__)

Way = Literal["out", "in"]


class ImpairmentUnavailable(RuntimeError):
    """aioice no longer has the hook this module wraps (an upgrade): fix the shim."""


@dataclass(frozen=True, slots=True)
class LinkImpairment:
    """A link's faults. ``delay_ms``: round-trip delay to an unimpaired peer (half each
    way); ``jitter_ms``: peak-to-peak round-trip jitter (uniform, half each way);
    ``loss``: probability (0..1) that a datagram is lost, each direction; ``loss_burst``:
    mean burst length in packets (1: independent losses); ``rate_kbps``: bottleneck
    rate each direction (None: unlimited); ``queue_ms``: how much the bottleneck queues
    before it drops; ``seed``: for repeatable runs."""

    delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_kbps: float | None = None
    queue_ms: float = 200.0
    seed: int | None = None
    loss_burst: float = 1.0

    def __post_init__(self) -> None:
        def finite(name: str, value: float) -> None:
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        for name in ("delay_ms", "jitter_ms", "loss", "queue_ms", "loss_burst"):
            finite(name, getattr(self, name))
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(
                f"jitter_ms must be between 0 and delay_ms ({self.delay_ms}), got {self.jitter_ms}"
            )
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.loss_burst < 1:
            raise ValueError(f"loss_burst must be >= 1 packet, got {self.loss_burst}")
        if self.rate_kbps is not None:
            finite("rate_kbps", self.rate_kbps)
            if self.rate_kbps <= 0:
                raise ValueError(f"rate_kbps must be > 0 (None: unlimited), got {self.rate_kbps}")
        if self.queue_ms <= 0:
            raise ValueError(f"queue_ms must be > 0, got {self.queue_ms}")


@dataclass(slots=True)
class LinkCounters:
    """What one direction (or both, summed) did to the datagrams offered to it.
    ``sent``: delivered (to the socket, or to aioice for received ones); ``delayed``:
    of those, how many were held back rather than passed on at once."""

    sent: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    delayed: int = 0
    bytes_sent: int = 0
    bytes_offered: int = 0  # everything offered, lost or queued-out included

    @property
    def offered(self) -> int:
        return self.sent + self.dropped_loss + self.dropped_queue

    def __add__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(
            self.sent + other.sent,
            self.dropped_loss + other.dropped_loss,
            self.dropped_queue + other.dropped_queue,
            self.delayed + other.delayed,
            self.bytes_sent + other.bytes_sent,
            self.bytes_offered + other.bytes_offered,
        )


@dataclass(slots=True)
class _Direction:
    """One direction of the link: its loss state, its bottleneck and its in-flight queue."""

    counters: LinkCounters = field(default_factory=LinkCounters)
    in_burst: bool = False  # Gilbert state
    link_free_at: float = 0.0  # loop time the bottleneck finishes its queued packets
    last_due: float = 0.0  # delivery times never go backwards: no reordering
    flight: deque[tuple[float, Callable[[], None]]] = field(default_factory=deque)
    timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop | None = None


class ImpairedLink:
    """The active impairment (what :func:`impaired` yields): its counters per direction."""

    def __init__(self, impairment: LinkImpairment) -> None:
        self.impairment = impairment
        self._rng = random.Random(impairment.seed)
        self._ways: dict[Way, _Direction] = {"out": _Direction(), "in": _Direction()}
        imp = impairment
        # Gilbert: P(good -> bad) and P(bad -> good) that give mean loss `loss` and mean
        # burst `loss_burst`.
        self._leave_burst = 1.0 / imp.loss_burst
        self._enter_burst = 0.0 if imp.loss == 0 else imp.loss / (imp.loss_burst * (1.0 - imp.loss))
        self._bytes_per_s = None if imp.rate_kbps is None else imp.rate_kbps * 1000 / 8
        self.closed = False

    @property
    def outbound(self) -> LinkCounters:
        return self._ways["out"].counters

    @property
    def inbound(self) -> LinkCounters:
        return self._ways["in"].counters

    @property
    def counters(self) -> LinkCounters:
        """Both directions summed."""
        return self.outbound + self.inbound

    def describe(self) -> dict[str, Any]:
        return {
            way: {
                "sent": d.counters.sent,
                "dropped_loss": d.counters.dropped_loss,
                "dropped_queue": d.counters.dropped_queue,
                "delayed": d.counters.delayed,
                "bytes_sent": d.counters.bytes_sent,
                "bytes_offered": d.counters.bytes_offered,
            }
            for way, d in self._ways.items()
        }

    # -- the link -------------------------------------------------------------------------

    def _lost(self, way: _Direction) -> bool:
        imp = self.impairment
        if imp.loss == 0:
            return False
        if imp.loss_burst <= 1:
            return self._rng.random() < imp.loss
        if way.in_burst:
            way.in_burst = self._rng.random() >= self._leave_burst
        else:
            way.in_burst = self._rng.random() < self._enter_burst
        return way.in_burst

    def offer(self, which: Way, size: int, deliver: Callable[[], None]) -> None:
        """One datagram of ``size`` bytes into direction ``which``: ``deliver`` is called
        when (and if) it comes out of the far end."""
        way = self._ways[which]
        if self.closed:
            deliver()
            return
        way.counters.bytes_offered += size
        if self._lost(way):
            way.counters.dropped_loss += 1
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        imp = self.impairment
        due = now
        if self._bytes_per_s is not None:
            start = max(now, way.link_free_at)
            if start - now > imp.queue_ms / 1000:
                way.counters.dropped_queue += 1
                return
            way.link_free_at = start + size / self._bytes_per_s
            due = way.link_free_at
        half = imp.delay_ms / 2000
        if imp.jitter_ms:
            half += self._rng.uniform(-imp.jitter_ms, imp.jitter_ms) / 4000
        due = max(due + half, way.last_due)
        way.last_due = due
        way.counters.sent += 1
        way.counters.bytes_sent += size
        if due <= now and not way.flight:
            deliver()
            return
        way.counters.delayed += 1
        way.flight.append((due, deliver))
        if way.timer is None:
            way.loop = loop
            way.timer = loop.call_at(due, self._drain, way)

    def _drain(self, way: _Direction) -> None:
        way.timer = None
        loop = way.loop
        assert loop is not None
        now = loop.time()
        while way.flight and way.flight[0][0] <= now:
            _, deliver = way.flight.popleft()
            _deliver(deliver)
        if way.flight:
            way.timer = loop.call_at(way.flight[0][0], self._drain, way)

    def close(self) -> None:
        """Deliver what is in flight now and pass everything straight through from here
        on (the hook is being removed)."""
        self.closed = True
        for way in self._ways.values():
            if way.timer is not None:
                way.timer.cancel()
                way.timer = None
            while way.flight:
                _, deliver = way.flight.popleft()
                _deliver(deliver)


def _deliver(deliver: Callable[[], None]) -> None:
    try:
        deliver()
    except Exception:  # a callback on the loop must not raise; aioice would have logged
        log.exception("delivering an impaired datagram failed")


# -- named links -------------------------------------------------------------------------

PRESETS: dict[str, LinkImpairment] = {
    # Thin ADSL at a village school: what the project tested first.
    "rural-good": LinkImpairment(delay_ms=60, loss=0.02, rate_kbps=2000, queue_ms=200, seed=7),
    # A poor line: the lesson stopped being two-way here (issue 13).
    "rural-poor": LinkImpairment(delay_ms=150, loss=0.05, rate_kbps=1000, queue_ms=200, seed=7),
    # 4G: bursty (Gilbert) loss averaging 3 %, 50 ms of jitter.
    "4g-burst": LinkImpairment(
        delay_ms=80, jitter_ms=50, loss=0.03, loss_burst=4, rate_kbps=3000, queue_ms=200, seed=7
    ),
    # Geostationary satellite: long, mostly clean.
    "satellite": LinkImpairment(delay_ms=600, loss=0.01, rate_kbps=2000, queue_ms=200, seed=7),
}
"""The links of issue 13 (bench/lesson.py --preset, tests/test_stream_rural.py), each
with a 200 ms drop-tail queue and a fixed seed."""


# -- the aioice hook ------------------------------------------------------------------------

_active: list[ImpairedLink] = []  # the one active link, if any


@contextlib.contextmanager
def impaired(impairment: LinkImpairment) -> Iterator[ImpairedLink]:
    """Impair every aioice datagram of this process while the block runs (see the
    module's docstring for the model). Not reentrant: one link per process. On exit the
    datagrams still in flight are delivered and aioice's own methods are put back."""
    if _active:
        raise RuntimeError("an impairment is already active in this process")
    link = ImpairedLink(impairment)
    intercepting = hooks.intercept_stun_datagrams(
        received=lambda size, deliver: link.offer("in", size, deliver),
        sent=lambda size, deliver: link.offer("out", size, deliver),
    )
    try:
        intercepting.__enter__()
    except hooks.HookUnavailable as exc:
        raise ImpairmentUnavailable(f"{exc}: update agent/testkit/impair.py") from exc
    _active.append(link)
    log.info("aioice datagrams impaired: %s", impairment)
    try:
        yield link
    finally:
        _active.clear()
        intercepting.__exit__(None, None, None)
        link.close()
        log.info("aioice impairment removed: %s", link.describe())
