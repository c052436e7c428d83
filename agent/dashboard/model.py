"""The fleet as the maintenance dashboard sees it, built only from what the fleet publishes.

`FleetModel.apply(topic, payload)` takes every message of the dashboard's read-only
subscriptions (``{prefix}/+/+/state``, ``/health``, ``/alert``, ``/sensing`` and
``{prefix}/lesson/+``, docs/contracts.md) and keeps, per room: online/offline with
since-when, the last health figures, the active alerts and the room's part in a live
lesson; per lesson group: the announcement joined with the rooms' ``stream`` sections;
per lesson: each sensing room's aggregates (`sensing_view`). It is synchronous and does
no I/O, so the tests drive it with fake clocks and hand-made payloads.

Rules that are easy to get wrong:

- *Birth/death order.* A state message is ordered by ``(boot_time, seq)``: ``seq``
  grows per connection attempt of one agent process and starts again at 1 when the
  process restarts (then ``boot_time`` is newer). A message with an older key than the
  room's current one is a late Last Will (or a stale retained copy) and is ignored; with
  the same key, ``offline`` ends that connection and an ``online`` after it is stale.
- *Alerts.* Events (``raised``/``cleared``) and the health message's ``alerts.active``
  snapshot both feed the active set, so a dashboard started late still knows what is
  open. Timestamps decide between them: a snapshot taken before a ``cleared`` event does
  not bring that alert back, and a ``raised`` event older than a snapshot that no longer
  lists it is already over.
- *Stale.* An online room whose health has not arrived for ``stale_intervals`` of its
  interval (estimated from the messages' ``ts`` and ``n``) is marked stale: the agent is
  connected but its reporter is stuck, or the figures are lost on the way.
- *Sensing.* A room's ``sensing`` messages are counts and rates only (schemas/sensing.v1
  json): while a lesson runs, each ``minute`` gives the latest head count and head-up rate
  (hand raises add up per minute); at its end ``st`` (Rt, Ch, mode) and ``attendance``
  (present/late/absent counts, the lesson's mean head-up rate) complete the lesson's
  figures; a teacher's correction on the panel sends ``attendance`` again, and the
  newest by ``ts`` holds. They arrive after the lesson's announcement is gone, so the
  model remembers which group and subject each announced lesson id had. The newest
  ``MAX_SENSED_LESSONS`` lessons are kept; nothing but numbers is stored.
- *Bad input.* Payloads that are not JSON, have the wrong shape or types, or name
  another device are counted per kind (`ModelStats`) and change nothing.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import contracts
from agent.contracts import (
    RESERVED_SITES,
    ST_MODES,
    ContractError,
    DeviceState,
    StateOrder,
    is_device_id,
)

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 256 * 1024  # the shipped broker's packet limit
MAX_TEXT = 300  # alert messages, subjects: enough for a person, not a flood
MAX_CLEARED_REMEMBERED = 128  # cleared alert ids kept per room (order of events)
MAX_LIST = 500  # entries read from any list in a payload
DELAY_SAMPLES = 4096
STATUSES = contracts.STATUSES
SEVERITIES = contracts.SEVERITIES
MAX_LAYERS = 16  # fleet, school, groups, room: a handful; more is junk
KINDS = ("state", "health", "alert", "lesson", "config", "sensing", "topic")
# A pushed profile layer in one of these states needs IT's attention (the "profiles" filter).
PROFILE_PROBLEMS = frozenset({"rejected", "rolled-back", "expired", "dropped"})
PROFILE_STATES = PROFILE_PROBLEMS | {"pending", "waiting", "applied", "cleared"}

_SLUG = re.compile(contracts.SLUG_PATTERN)
SENSING_KINDS = frozenset({"minute", "st", "attendance"})
ATTENDANCE_COUNTS = ("present", "late", "left_early", "absent", "unknown", "enrolled")
MAX_SENSED_LESSONS = 200  # lessons whose sensing figures are kept (the newest)
SHOWN_SENSED_LESSONS = 20  # of those, the ones the page lists (live ones first)
MAX_ANNOUNCED = 1000  # lesson id -> (group, subject) remembered for late end-of-lesson figures


class BadPayload(ValueError):
    """A message the model refuses (the text says why); counted, never raised out."""


# -- small parsing helpers ----------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number, or None (JSON booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if not isinstance(value, str):
        return None
    return value[:limit]


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``data[name]`` as a mapping: missing or null is empty, any other type is bad."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadPayload(f"{name} must be an object, not {type(value).__name__}")
    return value


_iso_epoch = contracts.iso_epoch


def _echo(value: Any) -> dict[str, Any] | None:
    """What maintenance reads of the microphone's processing when a room complains."""
    if not isinstance(value, Mapping):
        return None
    stages = value.get("stages")
    return {
        "active": _flag(value.get("active")),
        "aec": _flag(stages.get("echo_cancellation")) if isinstance(stages, Mapping) else None,
        "cancelling": _flag(value.get("cancelling")),
        "echo_path_ms": _round(_num(value.get("echo_path_ms")), 0),
        "erle_db": _round(_num(value.get("erle_db")), 0),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# -- value types ------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One peer of a room's live-lesson stream (health ``stream.peers``)."""

    device: str
    state: str | None
    rtt_ms: float | None
    loss_percent: float | None
    jitter_ms: float | None
    bitrate_kbps: float | None
    fps: float | None
    # The ladder rung the main room sends this room and why; audio only below the floor.
    layer: str | None = None
    layer_reason: str | None = None
    layer_cause: str | None = None  # start | loss | bandwidth | delay | probe | pinned
    audio_only: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "state": self.state,
            "rtt_ms": _round(self.rtt_ms),
            "loss_percent": _round(self.loss_percent, 2),
            "jitter_ms": _round(self.jitter_ms),
            "bitrate_kbps": _round(self.bitrate_kbps, 0),
            "fps": _round(self.fps),
            "layer": self.layer,
            "layer_reason": self.layer_reason,
            "layer_cause": self.layer_cause,
            "audio_only": self.audio_only,
        }


@dataclass(frozen=True)
class Stream:
    """A room's health ``stream`` section: the lesson it is in, as the room sees it."""

    lesson: str | None
    role: str | None
    state: str | None
    peers: tuple[Peer, ...]


@dataclass(frozen=True)
class Health:
    """The figures of a room's last health message the dashboard shows."""

    ts: float  # the device's clock
    received: float  # the dashboard's clock
    n: int | None
    camera: str | None
    camera_reason: str | None
    fps: float | None
    mic: str | None
    mic_dbfs: float | None
    clipping: bool | None
    echo: dict[str, Any] | None  # the microphone's echo canceller (None: no processing)
    cpu_percent: float | None
    memory_percent: float | None
    temperature_c: float | None
    disk_percent: float | None
    disk_free_mb: float | None
    broker_rtt_ms: float | None
    clock_synced: bool | None
    uptime_s: float | None
    queued: int | None
    version: str | None
    stream: Stream | None
    alert_ids: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": round(self.ts, 3),
            "received": round(self.received, 3),
            "camera": self.camera,
            "camera_reason": self.camera_reason,
            "fps": _round(self.fps),
            "mic": self.mic,
            "mic_dbfs": _round(self.mic_dbfs),
            "clipping": self.clipping,
            "echo": self.echo,
            "cpu_percent": _round(self.cpu_percent),
            "memory_percent": _round(self.memory_percent),
            "temperature_c": _round(self.temperature_c),
            "disk_percent": _round(self.disk_percent),
            "disk_free_mb": _round(self.disk_free_mb, 0),
            "broker_rtt_ms": _round(self.broker_rtt_ms),
            "clock_synced": self.clock_synced,
            # Arrival minus the device's own timestamp: delivery delay plus clock offset;
            # tens of seconds means the room's clock is off (NTP).
            "clock_offset_s": round(self.received - self.ts, 1),
            "uptime_s": _round(self.uptime_s, 0),
            "queued": self.queued,
            "version": self.version,
        }


@dataclass(frozen=True)
class Alert:
    """An open incident of one room."""

    id: str
    rule: str
    severity: str
    since: float | None
    message: str
    seen_at: float  # device time of the event or snapshot that last reported it
    delayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "since": _round(self.since, 3),
            "message": self.message,
            "delayed": self.delayed,
        }


@dataclass(frozen=True)
class Lesson:
    """A retained ``{prefix}/lesson/{group}`` announcement (contracts v1)."""

    group: str
    lesson_id: str
    subject: str
    main: str
    expected: tuple[str, ...]
    joined: tuple[str, ...]
    started_at: float | None
    state: str
    received_mono: float


@dataclass
class RoomFigures:
    """One room's sensing aggregates for one lesson: counts and rates, never who."""

    device: str
    ts: float  # device time of the newest message taken
    head_count: int | None = None  # live: the latest minute's; final: the lesson's median
    head_up_rate: float | None = None  # live: the latest minute's; final: the lesson's mean
    hand_raises: int | None = None  # None: not measured in this room
    minute_start: float | None = None  # the newest minute counted (re-deliveries add nothing)
    rt: float | None = None
    ch: float | None = None
    mode: str | None = None
    counts: dict[str, int] | None = None  # ATTENDANCE_COUNTS, from the attendance message
    counted_ts: float | None = None  # device time of the attendance message taken
    corrections: int | None = None  # teacher corrections in those counts (None: none sent)

    @property
    def final(self) -> bool:
        """The lesson's attendance message came: the figures are complete."""
        return self.counted_ts is not None

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts or {}
        return {
            "device": self.device,
            "final": self.final,
            "head_count": self.head_count,
            "head_up_rate": _round(self.head_up_rate, 3),
            "hand_raises": self.hand_raises,
            "rt": _round(self.rt, 3),
            "ch": _round(self.ch, 3),
            "mode": self.mode,
            **{name: counts.get(name) for name in ATTENDANCE_COUNTS},
            "corrections": self.corrections,
        }


@dataclass
class LessonFigures:
    """The sensing figures of one lesson id, per room (`FleetModel.sensed`)."""

    lesson_id: str
    rooms: dict[str, RoomFigures] = field(default_factory=dict)
    ts: float = 0.0  # device time of the newest message of any room


@dataclass
class Room:
    """Everything the dashboard knows about one room (mutable; owned by the model)."""

    site: str
    room: str
    name: str | None = None
    status: str | None = None  # online | offline | None (no state seen yet)
    state: DeviceState | None = None  # the state message in force (contracts' order)
    key: tuple[float, int] | None = None  # (boot epoch, seq) of the current state
    seq: int | None = None
    reason: str | None = None
    version: str | None = None
    profile: str | None = None
    since: float | None = None  # when the current status began (epoch)
    since_exact: bool = False  # False: it began before the dashboard could see it
    online_mono: float | None = None  # monotonic time the dashboard saw it come online
    health: Health | None = None
    health_mono: float | None = None
    interval_s: float = 10.0
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    stale: bool = False
    alerts: dict[str, Alert] = field(default_factory=dict)
    cleared: OrderedDict[str, float] = field(default_factory=OrderedDict)
    config: dict[str, Any] | None = None  # the pushed profiles, from config/reported
    rev: int = 0

    @property
    def device(self) -> str:
        return f"{self.site}.{self.room}"


@dataclass
class ModelStats:
    """Counters for ``/api/stats`` and the bench: what came in, what was refused."""

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    last_bad: str | None = None
    stale_states: int = 0  # state messages older than the room's current one (late wills)
    rooms_refused: int = 0  # rooms beyond max_rooms
    delays_ms: deque[float] = field(default_factory=lambda: deque(maxlen=DELAY_SAMPLES))

    def to_dict(self) -> dict[str, Any]:
        delays = sorted(self.delays_ms)
        return {
            "messages": dict(self.messages),
            "bad": dict(self.bad),
            "last_bad": self.last_bad,
            "stale_states": self.stale_states,
            "rooms_refused": self.rooms_refused,
            "health_delay_ms": _percentiles(delays),
        }


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "median": None, "p95": None, "max": None}
    return {
        "count": len(values),
        "median": round(statistics.median(values), 2),
        "p95": round(values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)], 2),
        "max": round(values[-1], 2),
    }


@dataclass(frozen=True)
class Changes:
    """What changed since the last `FleetModel.take_changes` (for incremental pushes)."""

    rooms: tuple[str, ...]
    lessons: bool
    sensing: bool = False  # the lessons' sensing figures (`FleetModel.sensing_view`)


# -- the model ----------------------------------------------------------------------------


class FleetModel:
    """Per-room and per-lesson state of the fleet (see the module docstring).

    ``wall`` (epoch) stamps what the page shows; ``monotonic`` measures staleness, so a
    clock step on the dashboard host does not flip rooms. ``on_change`` is called
    (synchronously, cheaply) after anything changed; the server uses it to wake its
    push loop.
    """

    def __init__(
        self,
        prefix: str = "edu",
        *,
        default_interval_s: float = 10.0,
        stale_intervals: float = 3.0,
        max_rooms: int = 5000,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if not _SLUG.match(prefix):
            raise ValueError(f"topic prefix {prefix!r} is not a valid topic level")
        self.prefix = prefix
        self.default_interval_s = default_interval_s
        self.stale_intervals = stale_intervals
        self.max_rooms = max_rooms
        self.wall = wall
        self.monotonic = monotonic
        self.on_change = on_change
        self.started = wall()
        self.stats = ModelStats()
        self.rooms: dict[str, Room] = {}
        self.lessons: dict[str, Lesson] = {}
        self._sorted_ids: list[str] = []
        self._dirty: set[str] = set()
        self._lessons_dirty = False
        self._lesson_of: dict[str, str] = {}  # device -> group, for rooms in a lesson
        self.sensed: dict[str, LessonFigures] = {}  # lesson id -> its rooms' figures
        # lesson id -> (group, subject) of announcements seen: the end-of-lesson figures
        # arrive after the announcement is gone.
        self._announced: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._sensing_dirty = False

    # -- input ------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, *, retained: bool = False) -> bool:
        """Take one message; True if the fleet view changed. Never raises on bad input."""
        kind = self._kind(topic)
        try:
            if kind == "topic":
                raise BadPayload(f"topic {topic[:120]!r} is not one the dashboard reads")
            self.stats.messages[kind] += 1
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise BadPayload(f"{len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
            levels = topic.split("/")
            if kind == "lesson":
                changed = self._apply_lesson(levels[2], payload)
            elif kind == "sensing":
                changed = self._apply_sensing(f"{levels[1]}.{levels[2]}", self._object(payload))
            else:
                device = f"{levels[1]}.{levels[2]}"
                room = self.rooms.get(device)
                new = room is None
                if room is None:
                    room = Room(site=levels[1], room=levels[2], interval_s=self.default_interval_s)
                data = self._object(payload)
                if kind == "state":
                    changed = self._apply_state(room, data, retained)
                elif kind == "health":
                    changed = self._apply_health(room, data)
                elif kind == "config":
                    changed = self._apply_config(room, data)
                else:
                    changed = self._apply_alert(room, data)
                if changed and new and not self._register(room):
                    return False
                if changed:
                    self._touch(room)
        except BadPayload as exc:
            self.stats.bad[kind] += 1
            self.stats.last_bad = f"{topic[:120]}: {exc}"
            logger.debug("ignored a bad %s message on %s: %s", kind, topic[:120], exc)
            return False
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    def check_stale(self) -> list[str]:
        """Re-evaluate staleness (call about once a second); the rooms that flipped."""
        now = self.monotonic()
        flipped: list[str] = []
        for device, room in self.rooms.items():
            stale = False
            if room.status == "online":
                # Health from before the room came online does not count for it.
                marks = [m for m in (room.health_mono, room.online_mono) if m is not None]
                if marks:
                    stale = now - max(marks) > self.stale_intervals * room.interval_s
            if stale != room.stale:
                room.stale = stale
                self._touch(room)
                flipped.append(device)
        if flipped and self.on_change is not None:
            self.on_change()
        return flipped

    def forget_lessons_before(self, monotonic_time: float) -> list[str]:
        """Drop announcements not received again since ``monotonic_time``.

        After the dashboard reconnects, the broker re-sends every retained announcement;
        one that does not come back ended while the dashboard was away.
        """
        gone = [g for g, lesson in self.lessons.items() if lesson.received_mono < monotonic_time]
        for group in gone:
            self._set_lesson(group, None)
        if gone and self.on_change is not None:
            self.on_change()
        return gone

    # -- output -----------------------------------------------------------------------

    def take_changes(self) -> Changes:
        """The rooms (and whether the lessons) changed since the last call; resets."""
        rooms = tuple(sorted(self._dirty))
        lessons, sensing = self._lessons_dirty, self._sensing_dirty
        self._dirty.clear()
        self._lessons_dirty = self._sensing_dirty = False
        return Changes(rooms, lessons, sensing)

    def room_view(self, device: str) -> dict[str, Any] | None:
        room = self.rooms.get(device)
        return None if room is None else self._room_view(room)

    def rooms_view(self, devices: Iterable[str] | None = None) -> list[dict[str, Any]]:
        ids = self._sorted_ids if devices is None else devices
        return [self._room_view(self.rooms[d]) for d in ids if d in self.rooms]

    def lessons_view(self) -> list[dict[str, Any]]:
        return [self._lesson_view(self.lessons[g]) for g in sorted(self.lessons, key=_natural)]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(
            (
                "rooms",
                "online",
                "offline",
                "stale",
                "unknown",
                "alerts",
                "critical",
                "warning",
                "rooms_with_alerts",
                "lessons_live",
                "rooms_in_lesson",
                "profile_problems",
            ),
            0,
        )
        counts["rooms"] = len(self.rooms)
        for room in self.rooms.values():
            if room.status == "online":
                counts["stale" if room.stale else "online"] += 1
            elif room.status == "offline":
                counts["offline"] += 1
            else:
                counts["unknown"] += 1
            if room.config is not None and room.config["problem"]:
                counts["profile_problems"] += 1
            if room.alerts:
                counts["rooms_with_alerts"] += 1
                for alert in room.alerts.values():
                    counts["alerts"] += 1
                    counts[alert.severity] += 1
        counts["lessons_live"] = sum(1 for ls in self.lessons.values() if ls.state == "live")
        counts["rooms_in_lesson"] = sum(1 for d in self._lesson_of if d in self.rooms)
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The whole fleet (``GET /api/fleet`` and a WebSocket client's first message)."""
        return {
            "v": 1,
            "prefix": self.prefix,
            "generated_at": round(self.wall(), 3),
            "started_at": round(self.started, 3),
            "counts": self.counts(),
            "rooms": self.rooms_view(),
            "lessons": self.lessons_view(),
            "sensing": self.sensing_view(),
        }

    # -- topics and rooms -------------------------------------------------------------

    def _kind(self, topic: str) -> str:
        levels = topic.split("/")
        if not levels or levels[0] != self.prefix:
            return "topic"
        if len(levels) == 3 and levels[1] == "lesson":
            return "lesson" if _SLUG.match(levels[2]) else "topic"
        if len(levels) == 5 and levels[3:] == ["config", "reported"]:
            ok = (
                levels[1] not in RESERVED_SITES
                and _SLUG.match(levels[1])
                and _SLUG.match(levels[2])
            )
            return "config" if ok else "topic"
        if len(levels) == 4 and levels[3] in ("state", "health", "alert", "sensing"):
            if levels[1] in RESERVED_SITES:
                return "topic"
            if _SLUG.match(levels[1]) and _SLUG.match(levels[2]):
                return levels[3]
        return "topic"

    def _register(self, room: Room) -> bool:
        """Add a room whose first message was accepted (False: over ``max_rooms``)."""
        if len(self.rooms) >= self.max_rooms:
            self.stats.rooms_refused += 1
            if self.stats.rooms_refused == 1:
                logger.warning("more than %d rooms: ignoring new ones", self.max_rooms)
            return False
        self.rooms[room.device] = room
        bisect.insort(self._sorted_ids, room.device)
        return True

    def _touch(self, room: Room) -> None:
        room.rev += 1
        self._dirty.add(room.device)
        if room.device in self._lesson_of:
            self._lessons_dirty = True  # joined / quality / main online may have moved

    @staticmethod
    def _object(payload: bytes) -> Mapping[str, Any]:
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            raise BadPayload("not UTF-8 JSON") from None
        except RecursionError:
            raise BadPayload("JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise BadPayload(f"not a JSON object ({type(data).__name__})")
        return data

    @staticmethod
    def _check_device(room: Room, data: Mapping[str, Any]) -> None:
        device = data.get("device")
        if device is not None and device != room.device:
            raise BadPayload(f"device {str(device)[:80]!r} on the topic of {room.device}")

    # -- state --------------------------------------------------------------------------

    def _apply_state(self, room: Room, data: Mapping[str, Any], retained: bool) -> bool:
        self._check_device(room, data)
        try:
            state = DeviceState.parse(data)
        except ContractError as exc:
            raise BadPayload(str(exc)) from None
        order = state.order(room.state)
        if order is StateOrder.SAME:
            return False  # the same state again (retained copy after a reconnect)
        if order is StateOrder.STALE:
            self.stats.stale_states += 1
            return False  # a late will of an earlier connection, or a birth that ended
        status, seq, key = state.status, state.seq, state.key
        now = self.wall()
        if status == "online":
            since = _iso_epoch(state.connected_at)
            exact = since is not None or not retained
            room.online_mono = self.monotonic()
            room.reason = None
        else:
            since = _iso_epoch(state.disconnected_at)
            exact = since is not None or not retained
            room.reason = state.reason
            room.online_mono = None
        if since is None:
            since = now if exact else self.started
        room.status = status
        room.state = state
        room.key = key
        room.seq = seq
        room.since = since
        room.since_exact = exact
        room.version = state.version or room.version
        room.profile = state.profile or room.profile
        if state.display_name:
            room.name = state.display_name
        room.stale = False if status == "offline" else room.stale
        return True

    # -- health -------------------------------------------------------------------------

    def _apply_health(self, room: Room, data: Mapping[str, Any]) -> bool:
        self._check_device(room, data)
        ts = _num(data.get("ts"))
        if ts is None:
            raise BadPayload("ts must be a number")
        system = _section(data, "system")
        mqtt = _section(data, "mqtt")
        capture = _section(data, "capture")
        video = _section(capture, "video")
        audio = _section(capture, "audio")
        agent = _section(data, "agent")
        alerts = _section(data, "alerts")
        active = alerts.get("active", [])
        if not isinstance(active, list):
            raise BadPayload("alerts.active must be a list")
        stream = self._stream(data.get("stream"))
        entries = [self._alert_entry(e) for e in active[:MAX_LIST]]
        n = _int(data.get("n"))
        previous = room.health
        # Not newer by the device's clock: a duplicate, unless ``n`` moved (a larger n is
        # a clock stepped back by NTP, a smaller one a restarted agent).
        if (
            previous is not None
            and ts <= previous.ts
            and (n is None or previous.n is None or n == previous.n)
        ):
            return False
        if previous is not None and n is not None and previous.n is not None and n > previous.n:
            interval = (ts - previous.ts) / (n - previous.n)
            if 0.2 <= interval <= 3600:
                # The low median of the last few: one stalled tick does not stretch the
                # room's interval (and hide the next stall), a new setting wins in three.
                room.intervals.append(interval)
                room.interval_s = statistics.median_low(room.intervals)
        received = self.wall()
        delay_ms = (received - ts) * 1000.0
        if -60_000 < delay_ms < 600_000:
            self.stats.delays_ms.append(delay_ms)
        rtt = _num(mqtt.get("publish_rtt_ms"))
        if rtt is None:
            rtt = _num(mqtt.get("ping_rtt_ms"))
        old_stream = previous.stream if previous is not None else None
        room.health = Health(
            ts=ts,
            received=received,
            n=n,
            camera=_text(video.get("state"), 20),
            camera_reason=_text(video.get("reason"), 120),
            fps=_num(video.get("fps")),
            mic=_text(audio.get("state"), 20),
            mic_dbfs=_num(audio.get("level_dbfs")),
            clipping=_flag(audio.get("clipping")),
            echo=_echo(audio.get("processing")),
            cpu_percent=_num(system.get("cpu_percent")),
            memory_percent=_num(system.get("memory_percent")),
            temperature_c=_num(system.get("temperature_c")),
            disk_percent=_num(system.get("disk_percent")),
            disk_free_mb=_num(system.get("disk_free_mb")),
            broker_rtt_ms=rtt,
            clock_synced=_flag(system.get("clock_synced")),
            uptime_s=_num(system.get("uptime_s")),
            queued=_int(mqtt.get("queued")),
            version=_text(agent.get("version"), 40),
            stream=stream,
            alert_ids=frozenset(e.id for e in entries if e is not None),
        )
        room.health_mono = self.monotonic()
        if room.stale:
            room.stale = False
        self._reconcile_alerts(room, ts, [e for e in entries if e is not None])
        if stream != old_stream:
            self._lessons_dirty = True
        return True

    def _stream(self, value: Any) -> Stream | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise BadPayload("stream must be an object or null")
        peers_value = value.get("peers") or {}
        if not isinstance(peers_value, Mapping):
            raise BadPayload("stream.peers must be an object")
        peers = []
        for device, stats in list(peers_value.items())[:MAX_LIST]:
            if not isinstance(stats, Mapping) or not is_device_id(str(device)):
                continue
            peers.append(
                Peer(
                    device=str(device),
                    state=_text(stats.get("state"), 20),
                    rtt_ms=_num(stats.get("rtt_ms")),
                    loss_percent=_num(stats.get("loss_percent")),
                    jitter_ms=_num(stats.get("jitter_ms")),
                    bitrate_kbps=_num(stats.get("bitrate_kbps")),
                    fps=_num(stats.get("fps")),
                    layer=_text(stats.get("layer"), 20),
                    layer_reason=_text(stats.get("layer_reason"), 200),
                    layer_cause=_text(stats.get("layer_cause"), 20),
                    audio_only=_flag(stats.get("audio_only")),
                )
            )
        role = value.get("role")
        return Stream(
            lesson=_text(value.get("lesson"), 64),
            role=role if role in ("main", "receiving") else None,
            state=_text(value.get("state"), 20),
            peers=tuple(peers),
        )

    # -- alerts -------------------------------------------------------------------------

    @staticmethod
    def _alert_entry(entry: Any) -> Alert | None:
        """An ``alerts.active`` entry; None (skipped) when it does not parse."""
        if not isinstance(entry, Mapping):
            return None
        alert_id, rule = _text(entry.get("id"), 64), _text(entry.get("rule"), 40)
        if not alert_id or not rule:
            return None
        severity = entry.get("severity")
        return Alert(
            id=alert_id,
            rule=rule,
            severity=severity if severity in SEVERITIES else "warning",
            since=_num(entry.get("since")),
            message=_text(entry.get("message")) or "",
            seen_at=0.0,
        )

    def _reconcile_alerts(self, room: Room, ts: float, entries: list[Alert]) -> None:
        """Adopt a health snapshot's active list, keeping what happened after it."""
        active: dict[str, Alert] = {}
        for entry in entries:
            cleared_at = room.cleared.get(entry.id)
            if cleared_at is not None and cleared_at >= ts:
                continue  # a 'cleared' event newer than this snapshot
            known = room.alerts.get(entry.id)
            delayed = known.delayed if known is not None else False
            active[entry.id] = Alert(
                entry.id, entry.rule, entry.severity, entry.since, entry.message, ts, delayed
            )
        for alert in room.alerts.values():
            if alert.id not in active and alert.seen_at > ts:
                active[alert.id] = alert  # raised by an event newer than this snapshot
        room.alerts = active

    def _apply_config(self, room: Room, data: Mapping[str, Any]) -> bool:
        """The device's answer to pushed profiles: what is in effect, what went wrong."""
        self._check_device(room, data)
        effective = data.get("effective")
        layers = data.get("layers")
        if not isinstance(effective, Mapping) or not isinstance(layers, Mapping):
            raise BadPayload("config/reported needs 'effective' and 'layers' objects")
        shown: dict[str, int] = {}
        for layer, version in list(effective.items())[:MAX_LAYERS]:
            number = _int(version)
            if isinstance(layer, str) and number is not None:
                shown[layer[:MAX_TEXT]] = number
        entries = []
        for layer, entry in list(layers.items())[:MAX_LAYERS]:
            if not isinstance(entry, Mapping) or entry.get("state") not in PROFILE_STATES:
                continue
            entries.append(
                {
                    "layer": str(layer)[:MAX_TEXT],
                    "state": entry["state"],
                    "version": _int(entry.get("version")),
                    "applied_version": _int(entry.get("applied_version")),
                    "reason": _text(entry.get("reason")) or "",
                    "code": _text(entry.get("code")) or "",
                }
            )
        config = {
            "effective": shown,
            "layers": entries,
            "problem": any(e["state"] in PROFILE_PROBLEMS for e in entries),
        }
        if config == room.config:
            return False
        room.config = config
        return True

    def _apply_alert(self, room: Room, data: Mapping[str, Any]) -> bool:
        self._check_device(room, data)
        alert_id = _text(data.get("id"), 64)
        rule = _text(data.get("rule"), 40)
        state = data.get("state")
        at = _num(data.get("at"))
        if not alert_id or not rule:
            raise BadPayload("id and rule must be non-empty strings")
        if state not in ("raised", "cleared"):
            raise BadPayload(f"state must be 'raised' or 'cleared', got {str(state)[:40]!r}")
        if at is None:
            raise BadPayload("at must be a number")
        severity = data.get("severity")
        if severity not in SEVERITIES:
            raise BadPayload(
                f"severity must be 'warning' or 'critical', got {str(severity)[:40]!r}"
            )
        delayed = data.get("delayed") is True
        if state == "cleared":
            room.cleared[alert_id] = at
            room.cleared.move_to_end(alert_id)
            while len(room.cleared) > MAX_CLEARED_REMEMBERED:
                room.cleared.popitem(last=False)
            return room.alerts.pop(alert_id, None) is not None
        if alert_id in room.cleared:
            return False  # its 'cleared' came first (a re-delivery)
        health = room.health
        if health is not None and health.ts > at and alert_id not in health.alert_ids:
            return False  # a newer snapshot no longer lists it: already over
        room.alerts[alert_id] = Alert(
            id=alert_id,
            rule=rule,
            severity=severity,
            since=_num(data.get("since")),
            message=_text(data.get("message")) or "",
            seen_at=at,
            delayed=delayed,
        )
        return True

    # -- lessons ------------------------------------------------------------------------

    def _apply_lesson(self, group: str, payload: bytes) -> bool:
        if not payload:
            return self._set_lesson(group, None)
        data = self._object(payload)
        if data.get("v") != 1:
            raise BadPayload("not a version 1 announcement")
        lesson_id = _text(data.get("lesson_id"), 64)
        main = data.get("main")
        if not lesson_id:
            raise BadPayload("lesson_id must be a non-empty string")
        if not isinstance(main, str) or not is_device_id(main):
            raise BadPayload("main must be a device id (site.room)")
        if data.get("group", group) != group:
            raise BadPayload("group differs from the topic's")

        def devices(name: str) -> tuple[str, ...]:
            value = data.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(v, str) and is_device_id(v) for v in value
            ):
                raise BadPayload(f"{name} must be a list of device ids")
            return tuple(dict.fromkeys(value[:MAX_LIST]))

        expected, joined = devices("expected"), devices("joined")
        started = data.get("started_at")
        if started is not None and _num(started) is None:
            raise BadPayload("started_at must be a number")
        subject = data.get("subject", "")
        if not isinstance(subject, str):
            raise BadPayload("subject must be a string")
        lesson = Lesson(
            group=group,
            lesson_id=lesson_id,
            subject=subject[:MAX_TEXT],
            main=main,
            expected=expected,
            joined=joined,
            started_at=_num(started),
            state=_text(data.get("state"), 20) or "live",
            received_mono=self.monotonic(),
        )
        self._remember(lesson)
        old = self.lessons.get(group)
        if old is not None and _same_lesson(old, lesson):
            self.lessons[group] = lesson  # refresh the receipt time only
            return False
        return self._set_lesson(group, lesson)

    def _set_lesson(self, group: str, lesson: Lesson | None) -> bool:
        old = self.lessons.pop(group, None)
        if old is None and lesson is None:
            return False
        if lesson is not None:
            self.lessons[group] = lesson
        members: set[str] = set()
        for item in (old, lesson):
            if item is not None:
                members.update((item.main, *item.expected))
        self._lesson_of = {}
        for name in sorted(self.lessons):
            current = self.lessons[name]
            for device in (current.main, *current.expected):
                self._lesson_of.setdefault(device, name)
        for device in members:
            room = self.rooms.get(device)
            if room is not None:
                self._touch(room)
        self._lessons_dirty = True
        if any(item is not None and item.lesson_id in self.sensed for item in (old, lesson)):
            self._sensing_dirty = True  # its figures turn live or ended
        return True

    def _remember(self, lesson: Lesson) -> None:
        known = self._announced.get(lesson.lesson_id)
        self._announced[lesson.lesson_id] = (lesson.group, lesson.subject)
        self._announced.move_to_end(lesson.lesson_id)
        while len(self._announced) > MAX_ANNOUNCED:
            self._announced.popitem(last=False)
        if known != (lesson.group, lesson.subject) and lesson.lesson_id in self.sensed:
            self._sensing_dirty = True

    # -- sensing ------------------------------------------------------------------------

    def _apply_sensing(self, device: str, data: Mapping[str, Any]) -> bool:
        """A room's sensing aggregates (see the module docstring); counts and rates only."""
        room = self.rooms.get(device)
        if room is None:
            raise BadPayload("sensing from a room that has sent no state or health yet")
        self._check_device(room, data)
        if data.get("v") != 1:
            raise BadPayload("not a version 1 sensing message")
        kind = data.get("kind")
        if kind not in SENSING_KINDS:
            raise BadPayload(f"kind must be minute, st or attendance, got {str(kind)[:40]!r}")
        ts = _num(data.get("ts"))
        if ts is None:
            raise BadPayload("ts must be a number")
        lesson = data.get("lesson", "")
        if lesson is not None and (not isinstance(lesson, str) or not 0 < len(lesson) <= 64):
            raise BadPayload("lesson must be a lesson id (1-64 characters) or null")
        if kind == "minute":
            minute_start = _num(data.get("minute_start"))
            if minute_start is None:
                raise BadPayload("minute_start must be a number")
            update: dict[str, Any] = {
                "minute_start": minute_start,
                "head_count": _count_field(data, "head_count"),
                "head_up_rate": _rate_field(data, "head_up_rate", nullable=True),
                "hand_raises": _count_field(data, "hand_raises", required=False),
            }
        elif kind == "st":
            mode = data.get("mode")
            if mode not in ST_MODES:
                raise BadPayload(
                    f"mode must be practice, lecture, dialogue or mixed, got {str(mode)[:40]!r}"
                )
            update = {
                "rt": _rate_field(data, "rt"),
                "ch": _rate_field(data, "ch"),
                "mode": mode,
            }
        else:
            update = {
                "corrections": _count_field(data, "corrections", required=False),
                "counts": {name: _count_field(data, name) for name in ATTENDANCE_COUNTS},
                "head_count": _count_field(data, "head_count"),
                "head_up_rate": _rate_field(data, "head_up_rate", nullable=True),
                "hand_raises": _count_field(data, "hand_raises", required=False),
            }
        if lesson is None:
            return False  # a head count between lessons: no lesson's figures
        record = self.sensed.get(lesson)
        if record is None:
            if len(self.sensed) >= MAX_SENSED_LESSONS:
                oldest = min(self.sensed.values(), key=lambda r: r.ts)
                if oldest.ts >= ts:
                    return False  # older than every lesson kept
                del self.sensed[oldest.lesson_id]
            record = self.sensed[lesson] = LessonFigures(lesson)
        figures = record.rooms.get(device)
        if figures is None:
            if len(record.rooms) >= MAX_LIST:
                raise BadPayload(f"more than {MAX_LIST} rooms report lesson {lesson!r}")
            figures = record.rooms[device] = RoomFigures(device, ts)
        if kind == "minute":
            start = update["minute_start"]
            if figures.final or (
                figures.minute_start is not None and start <= figures.minute_start
            ):
                return False  # a re-delivered or late minute: the figures have moved on
            figures.minute_start = start
            figures.head_count = update["head_count"]
            figures.head_up_rate = update["head_up_rate"]
            if update["hand_raises"] is not None:
                figures.hand_raises = (figures.hand_raises or 0) + update["hand_raises"]
        elif kind == "st":
            figures.rt, figures.ch, figures.mode = update["rt"], update["ch"], update["mode"]
        else:
            if figures.counted_ts is not None and ts <= figures.counted_ts:
                return False  # re-delivered, or overtaken by a teacher's correction
            figures.counted_ts = ts
            figures.corrections = update["corrections"]
            figures.counts = update["counts"]
            figures.head_count = update["head_count"]
            figures.head_up_rate = update["head_up_rate"]
            if "hand_raises" in data:  # the lesson's total (null: not measured)
                figures.hand_raises = update["hand_raises"]
        figures.ts = max(figures.ts, ts)
        record.ts = max(record.ts, ts)
        self._sensing_dirty = True
        return True

    def sensing_view(self) -> list[dict[str, Any]]:
        """The newest lessons' sensing figures, live lessons first: per room and in total."""
        live = {lesson.lesson_id for lesson in self.lessons.values()}
        records = sorted(
            self.sensed.values(), key=lambda r: (r.lesson_id not in live, -r.ts, r.lesson_id)
        )
        out = []
        for record in records[:SHOWN_SENSED_LESSONS]:
            group, subject = self._announced.get(record.lesson_id, (None, ""))
            rooms = [record.rooms[d].to_dict() for d in sorted(record.rooms, key=_natural)]
            out.append(
                {
                    "lesson_id": record.lesson_id,
                    "group": group,
                    "subject": subject,
                    "live": record.lesson_id in live,
                    "ts": round(record.ts, 3),
                    "rooms": rooms,
                    "totals": _sensing_totals(rooms),
                }
            )
        return out

    # -- views --------------------------------------------------------------------------

    def _room_view(self, room: Room) -> dict[str, Any]:
        health = room.health
        return {
            "id": room.device,
            "site": room.site,
            "room": room.room,
            "name": room.name,
            "status": room.status,
            "stale": room.stale,
            "since": _round(room.since, 3),
            "since_exact": room.since_exact,
            "reason": room.reason,
            "seq": room.seq,
            "version": (health.version if health is not None else None) or room.version,
            "profile": room.profile,
            "interval_s": round(room.interval_s, 2),
            "health": None if health is None else health.to_dict(),
            "alerts": [
                a.to_dict()
                for a in sorted(
                    room.alerts.values(),
                    key=lambda a: (a.severity != "critical", a.since or 0.0, a.id),
                )
            ],
            "lesson": self._room_lesson(room),
            "config": room.config,
            "rev": room.rev,
        }

    def _room_lesson(self, room: Room) -> dict[str, Any] | None:
        group = self._lesson_of.get(room.device)
        stream = room.health.stream if room.health is not None else None
        if group is None:
            if stream is None or stream.lesson is None:
                return None
            return {  # the room streams a lesson the dashboard has no announcement of
                "group": None,
                "lesson_id": stream.lesson,
                "subject": "",
                "role": stream.role,
                "joined": stream.state in (None, "live"),
                "state": stream.state,
            }
        lesson = self.lessons[group]
        role = "main" if room.device == lesson.main else "receiving"
        joined = room.device in self._joined(lesson)
        return {
            "group": group,
            "lesson_id": lesson.lesson_id,
            "subject": lesson.subject,
            "role": role,
            "joined": joined,
            "state": stream.state
            if stream is not None and stream.lesson == lesson.lesson_id
            else None,
        }

    def _joined(self, lesson: Lesson) -> set[str]:
        """Receiving rooms in the lesson: the announcement's list, or what the rooms say."""
        joined = set(lesson.joined)
        main = self.rooms.get(lesson.main)
        if main is not None and main.status == "online":
            joined.add(lesson.main)
            stream = main.health.stream if main.health is not None else None
            if stream is not None and stream.lesson == lesson.lesson_id:
                joined.update(p.device for p in stream.peers if p.state == "connected")
        for device in lesson.expected:
            room = self.rooms.get(device)
            stream = room.health.stream if room is not None and room.health is not None else None
            if stream is not None and stream.lesson == lesson.lesson_id and stream.state == "live":
                joined.add(device)
        return joined

    def _lesson_view(self, lesson: Lesson) -> dict[str, Any]:
        expected = [d for d in lesson.expected if d != lesson.main]
        joined = self._joined(lesson)
        peers: list[Peer] = []
        for device in (lesson.main, *expected):
            room = self.rooms.get(device)
            stream = room.health.stream if room is not None and room.health is not None else None
            if stream is not None and stream.lesson == lesson.lesson_id:
                peers.extend(stream.peers)
        quality, detail = lesson_quality(peers)
        main = self.rooms.get(lesson.main)
        # What the main room sends each receiving room: its ladder rung and why.
        main_stream = main.health.stream if main is not None and main.health is not None else None
        layers = [
            {
                "device": p.device,
                "layer": p.layer,
                "reason": p.layer_reason,
                "audio_only": bool(p.audio_only) or p.layer == "paused",
            }
            for p in (main_stream.peers if main_stream is not None else ())
            if p.layer is not None and p.device in expected
        ]
        return {
            "group": lesson.group,
            "lesson_id": lesson.lesson_id,
            "subject": lesson.subject,
            "main": lesson.main,
            "main_name": main.name if main is not None else None,
            "main_online": main is not None and main.status == "online",
            "expected": expected,
            "joined": [d for d in expected if d in joined],
            "started_at": _round(lesson.started_at, 3),
            "state": lesson.state,
            "quality": quality,
            "quality_detail": detail,
            # The same worst-peer figures as numbers: the page words them in its language.
            "quality_figures": worst_figures(peers),
            "layers": layers,
        }


def _count_field(data: Mapping[str, Any], name: str, *, required: bool = True) -> int | None:
    """``data[name]`` as a count; absent or null only where not ``required``."""
    value = data.get(name)
    if value is None and not required:
        return None
    number = _int(value)
    if number is None or number < 0:
        or_null = "" if required else " or null"
        raise BadPayload(f"{name} must be a count (an integer >= 0){or_null}")
    return number


def _rate_field(data: Mapping[str, Any], name: str, *, nullable: bool = False) -> float | None:
    value = data.get(name)
    if value is None and nullable:
        return None
    number = _num(value)
    if number is None or not 0 <= number <= 1:
        or_null = " or null" if nullable else ""
        raise BadPayload(f"{name} must be a number from 0 to 1{or_null}")
    return number


def _sensing_totals(rooms: list[dict[str, Any]]) -> dict[str, Any]:
    """A lesson's figures over its rooms: counts add up, the head-up rate is the mean
    weighted by each room's head count; Rt, Ch and the mode are per room only."""

    def total(name: str) -> int | None:
        values = [room[name] for room in rooms if room[name] is not None]
        return sum(values) if values else None

    rated = [r for r in rooms if r["head_up_rate"] is not None]
    weight = sum(r["head_count"] or 0 for r in rated)
    rate: float | None = None
    if weight:
        rate = sum(r["head_up_rate"] * (r["head_count"] or 0) for r in rated) / weight
    elif rated:
        rate = statistics.fmean(r["head_up_rate"] for r in rated)
    return {
        "final": all(room["final"] for room in rooms),
        "head_count": total("head_count"),
        "head_up_rate": _round(rate, 3),
        "hand_raises": total("hand_raises"),
        **{name: total(name) for name in ATTENDANCE_COUNTS},
        "corrections": total("corrections"),
    }


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``g2`` before ``g10``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part
    )


def _same_lesson(a: Lesson, b: Lesson) -> bool:
    return (a.lesson_id, a.subject, a.main, a.expected, a.joined, a.started_at, a.state) == (
        b.lesson_id,
        b.subject,
        b.main,
        b.expected,
        b.joined,
        b.started_at,
        b.state,
    )


# Thresholds for a live lesson's stream, worst peer counts: above "fair" a class notices
# (choppy video, lip-sync drift); these follow common WebRTC call-quality guidance.
GOOD = {"loss_percent": 2.0, "rtt_ms": 150.0, "fps_min": 20.0}
FAIR = {"loss_percent": 5.0, "rtt_ms": 300.0, "fps_min": 12.0}


def worst_figures(peers: Iterable[Peer]) -> dict[str, float | None]:
    """The worst peer's ``loss_percent``, ``rtt_ms`` and ``fps`` (None: nobody reported it)."""
    peers = list(peers)
    loss = [p.loss_percent for p in peers if p.loss_percent is not None]
    rtt = [p.rtt_ms for p in peers if p.rtt_ms is not None]
    fps = [p.fps for p in peers if p.fps is not None]
    return {
        "loss_percent": max(loss) if loss else None,
        "rtt_ms": max(rtt) if rtt else None,
        "fps": min(fps) if fps else None,
    }


def lesson_quality(peers: Iterable[Peer]) -> tuple[str, str]:
    """``(good|fair|poor|unknown, "loss 0.4 %, rtt 35 ms, 25 fps")`` over the worst peer."""
    peers = list(peers)
    worst = worst_figures(peers)
    worst_loss, worst_rtt, worst_fps = worst["loss_percent"], worst["rtt_ms"], worst["fps"]
    if worst_loss is None and worst_rtt is None and worst_fps is None:
        return "unknown", "no stream statistics yet" if peers else "no peers"

    def within(limits: Mapping[str, float]) -> bool:
        return (
            (worst_loss is None or worst_loss <= limits["loss_percent"])
            and (worst_rtt is None or worst_rtt <= limits["rtt_ms"])
            and (worst_fps is None or worst_fps >= limits["fps_min"])
        )

    quality = "good" if within(GOOD) else "fair" if within(FAIR) else "poor"
    parts = []
    if worst_loss is not None:
        parts.append(f"loss {worst_loss:.1f} %")
    if worst_rtt is not None:
        parts.append(f"rtt {worst_rtt:.0f} ms")
    if worst_fps is not None:
        parts.append(f"{worst_fps:.0f} fps")
    return quality, ", ".join(parts)
