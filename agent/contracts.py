"""The MQTT message contracts, typed, in the one module every layer may import.

``docs/contracts.md`` describes each message and the JSON Schemas in ``schemas/`` are
the external contract; this module is their Python face (``tests/test_contracts.py``
checks that both agree on property names and required fields). It imports only the
standard library so that config, sync, stream, the dashboard and the broker tools can
all use it without an import circle.

What lives here, because it was written out several times before:

- the device-id and slug patterns (`is_device_id`, `is_slug`);
- `FleetTopics` / `Topics`: every topic name and subscription filter;
- `DeviceState`, the retained birth / Last Will, with the one newer-than rule
  (`DeviceState.order`): ordered by ``boot_time`` then ``seq``;
- `Alert`, `CommandRequest`, `CommandResult`, `Announcement`;
- the health message's sections as TypedDicts.

Parsing is for untrusted payloads: junk raises `ContractError` (a `ValueError`) whose
text says why; consumers catch it, count it and carry on.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, TypedDict, get_args

# -- names --------------------------------------------------------------------------------

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}\.[a-z0-9][a-z0-9_-]{0,62}$"
LESSON_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Top-level topic names that are not sites: {prefix}/lesson/{group}, {prefix}/rtc/{from}/{to}.
RESERVED_SITES = frozenset({"lesson", "rtc", "fleet"})

_SLUG = re.compile(SLUG_PATTERN)
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_LESSON_ID = re.compile(LESSON_ID_PATTERN)


def is_slug(value: str) -> bool:
    """A usable topic level (site, room, group, prefix, command name)."""
    return bool(_SLUG.match(value))


def is_device_id(value: str) -> bool:
    """``{site}.{room}``: the MQTT user name, the signalling address, the lesson member."""
    return bool(_DEVICE_ID.match(value))


def is_lesson_id(value: str) -> bool:
    return bool(_LESSON_ID.match(value))


class ContractError(ValueError):
    """An MQTT payload that does not follow its contract (the text says why)."""


# -- topics -------------------------------------------------------------------------------


def _slug(kind: str, value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid topic level "
            "(lower-case letters, digits, '-' and '_', at most 63)"
        )
    return value


def _device(value: str) -> str:
    if not is_device_id(value):
        raise ValueError(f"device id {value!r} must look like 'site.room'")
    return value


@dataclass(frozen=True)
class FleetTopics:
    """Topic names that are not one device's: fleet-wide filters, lessons, signalling.

    The layout is documented in `agent.sync.topics`; dashboards, the ACL renderer and
    the demo use these instead of writing topics out.
    """

    prefix: str

    def __post_init__(self) -> None:
        _slug("topic prefix", self.prefix)

    def device(self, device_id: str) -> Topics:
        """The per-device topics of ``site.room``."""
        site, _, room = _device(device_id).partition(".")
        return Topics(self.prefix, site, room)

    def _all(self, leaf: str) -> str:
        return f"{self.prefix}/+/+/{leaf}"

    @property
    def everything(self) -> str:
        return f"{self.prefix}/#"

    @property
    def state_all(self) -> str:
        return self._all("state")

    @property
    def health_all(self) -> str:
        return self._all("health")

    @property
    def alert_all(self) -> str:
        return self._all("alert")

    @property
    def sensing_all(self) -> str:
        return self._all("sensing")

    @property
    def config_desired_all(self) -> str:
        return self._all("config/desired")

    @property
    def config_reported_all(self) -> str:
        return self._all("config/reported")

    @property
    def config_keys(self) -> str:
        """Retained ``keys`` document that replaces the pinned IT keys (signed by a threshold)."""
        return f"{self.prefix}/fleet/config/keys"

    def config_desired_for(self, layer: str) -> str:
        """Where IT publishes the profile of one layer (``fleet``, ``school:SITE``,
        ``group:GROUP``, ``room:SITE.ROOM``); rooms keep theirs under their own topics."""
        kind, _, name = layer.partition(":")
        if kind == "fleet" and not name:
            return f"{self.prefix}/fleet/config/desired"
        if kind == "school":
            return f"{self.prefix}/fleet/school/{_slug('site', name)}/config/desired"
        if kind == "group":
            return f"{self.prefix}/fleet/group/{_slug('lesson group', name)}/config/desired"
        if kind == "room":
            return self.device(name).config_desired
        raise ContractError(f"unknown profile layer {layer!r}: fleet, school:, group:, room:")

    def layer_of_desired(self, topic: str) -> str | None:
        """The layer a ``config/desired`` topic belongs to (None: not such a topic)."""
        levels = topic.split("/")
        if levels[0] != self.prefix or levels[-2:] != ["config", "desired"]:
            return None
        middle = levels[1:-2]
        if middle == ["fleet"]:
            return "fleet"
        if len(middle) == 3 and middle[0] == "fleet" and middle[1] in ("school", "group"):
            return f"{middle[1]}:{middle[2]}" if is_slug(middle[2]) else None
        if len(middle) == 2 and middle[0] not in RESERVED_SITES:
            device = f"{middle[0]}.{middle[1]}"
            return f"room:{device}" if is_device_id(device) else None
        return None

    @property
    def lesson_all(self) -> str:
        return f"{self.prefix}/lesson/+"

    def lesson(self, group: str) -> str:
        return f"{self.prefix}/lesson/{_slug('lesson group', group)}"

    def rtc(self, from_device: str, to_device: str) -> str:
        return f"{self.prefix}/rtc/{_device(from_device)}/{_device(to_device)}"

    def rtc_to(self, to_device: str) -> str:
        """Subscription filter for signalling addressed to ``to_device`` (any sender)."""
        return f"{self.prefix}/rtc/+/{_device(to_device)}"

    def rtc_from(self, from_device: str) -> str:
        """Filter for signalling sent by ``from_device`` (to anyone)."""
        return f"{self.prefix}/rtc/{_device(from_device)}/+"

    @property
    def rtc_out_pattern(self) -> str:
        """Mosquitto ACL pattern: a client writes signalling only as itself (``%u``)."""
        return f"{self.prefix}/rtc/%u/+"

    @property
    def rtc_in_pattern(self) -> str:
        """Mosquitto ACL pattern: a client reads only signalling addressed to it."""
        return f"{self.prefix}/rtc/+/%u"


@dataclass(frozen=True)
class Topics(FleetTopics):
    """Topic names for one device (see `agent.sync.topics` for the layout)."""

    site: str
    room: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _slug("site", self.site)
        _slug("room", self.room)
        if self.site in RESERVED_SITES:
            raise ValueError(
                f"site {self.site!r} is reserved: '{self.prefix}/{self.site}/...' is used by "
                "fleet-wide topics; rename the site"
            )

    @property
    def device_id(self) -> str:
        return f"{self.site}.{self.room}"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.room}"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def health(self) -> str:
        return f"{self.base}/health"

    @property
    def alert(self) -> str:
        return f"{self.base}/alert"

    @property
    def sensing(self) -> str:
        return f"{self.base}/sensing"

    @property
    def probe(self) -> str:
        """The self-test's broker round trip: the one topic a device writes and reads."""
        return f"{self.base}/probe"

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    @property
    def config_reported(self) -> str:
        return f"{self.base}/config/reported"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{_slug('command name', name)}"

    def cmd_result(self, name: str) -> str:
        return f"{self.cmd(name)}/result"

    @property
    def cmd_filter(self) -> str:
        """Subscription filter for every command addressed to this device."""
        return f"{self.base}/cmd/+"

    @property
    def cmd_result_filter(self) -> str:
        """Filter for every command result this device writes."""
        return f"{self.base}/cmd/+/result"

    @property
    def rtc_inbox(self) -> str:
        """Subscription filter for signalling addressed to this device."""
        return self.rtc_to(self.device_id)

    @property
    def rtc_outbox(self) -> str:
        """Filter for signalling this device sends."""
        return self.rtc_from(self.device_id)


# -- small parsing helpers ----------------------------------------------------------------


def iso_epoch(value: object) -> float | None:
    """Epoch seconds of an ISO time (``...Z`` or with an offset), None if it is not one."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def iso_time(moment: dt.datetime) -> str:
    """The contracts' ISO form: UTC, milliseconds, ``Z``."""
    text = moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _number(value: object) -> float | None:
    """A finite number, or None (JSON booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def decode_object(payload: bytes) -> dict[str, Any]:
    """A JSON object from an MQTT payload, or `ContractError`."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ContractError("not UTF-8 JSON") from None
    except RecursionError:
        raise ContractError("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ContractError(f"not a JSON object ({type(data).__name__})")
    return data


# -- state: birth, Last Will, shutdown ---------------------------------------------------

StateStatus = Literal["online", "offline"]
STATUSES: tuple[StateStatus, ...] = ("online", "offline")


class StateOrder(Enum):
    """How a state message relates to the one held (`DeviceState.order`)."""

    NEWER = "newer"  # it replaces the held state
    SAME = "same"  # the held state again (a retained copy after a reconnect)
    STALE = "stale"  # older: a late Last Will, or the birth of a connection that ended


@dataclass(frozen=True, slots=True)
class DeviceState:
    """``{prefix}/{site}/{room}/state``: the birth (``online``), its Last Will and the
    shutdown message (``offline``, with the birth's ``seq``).

    Which of two messages is newer is decided in one place, `order`: by
    (``boot_time``, ``seq``), because ``seq`` counts connections of one process and
    starts again at 1 when the process restarts (with a newer ``boot_time``). With the
    same key, ``offline`` ends that connection and a later ``online`` is a stale copy.
    """

    status: StateStatus
    seq: int
    boot_time: str = ""  # ISO; "" (or not ISO) orders before every real boot
    device: str | None = None
    site: str | None = None
    room: str | None = None
    version: str | None = None
    profile: str | None = None
    display_name: str | None = None
    connected_at: str | None = None
    disconnected_at: str | None = None
    reason: str | None = None

    @property
    def online(self) -> bool:
        return self.status == "online"

    @property
    def key(self) -> tuple[float, int]:
        """(boot epoch, seq): the ordering key."""
        boot = iso_epoch(self.boot_time)
        return (boot if boot is not None else 0.0, self.seq)

    def order(self, current: DeviceState | None) -> StateOrder:
        """The newer-than rule: how this message relates to ``current`` (the held one)."""
        if current is None:
            return StateOrder.NEWER
        mine, theirs = self.key, current.key
        if mine != theirs:
            return StateOrder.NEWER if mine > theirs else StateOrder.STALE
        if self.status == current.status:
            return StateOrder.SAME
        return StateOrder.NEWER if self.status == "offline" else StateOrder.STALE

    def newer_than(self, current: DeviceState | None) -> bool:
        return self.order(current) is StateOrder.NEWER

    def to_dict(self) -> dict[str, Any]:
        """The payload (only the fields that are set; ``seq`` last, as always)."""
        payload: dict[str, Any] = {"status": self.status}
        for name in ("device", "site", "room", "version", "profile", "boot_time"):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value
        for name in ("display_name", "connected_at", "disconnected_at", "reason"):
            value = getattr(self, name)
            if value:
                payload[name] = value
        payload["seq"] = self.seq
        return payload

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, lenient_seq: bool = False) -> DeviceState:
        """The state in ``data`` or `ContractError`. Optional fields of the wrong type
        are dropped and long texts cut, as consumers always did; ``lenient_seq`` reads a
        missing or mistyped ``seq`` as 0 (presence never refused such a birth)."""
        status = data.get("status")
        if status not in STATUSES:
            raise ContractError(f"status must be 'online' or 'offline', got {str(status)[:40]!r}")
        seq = data.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            if not lenient_seq:
                raise ContractError("seq must be a non-negative integer")
            seq = 0
        boot = data.get("boot_time")
        return cls(
            status="online" if status == "online" else "offline",
            seq=seq,
            boot_time=boot if isinstance(boot, str) else "",
            device=_text(data.get("device"), 200),
            site=_text(data.get("site"), 63),
            room=_text(data.get("room"), 63),
            version=_text(data.get("version"), 40),
            profile=_text(data.get("profile"), 60),
            display_name=(_text(data.get("display_name"), 200) or "").strip()[:80] or None,
            connected_at=_text(data.get("connected_at"), 40),
            disconnected_at=_text(data.get("disconnected_at"), 40),
            reason=_text(data.get("reason"), 80),
        )


# -- alert --------------------------------------------------------------------------------

ALERT_SCHEMA_VERSION = 1
Severity = Literal["warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("warning", "critical")
AlertState = Literal["raised", "cleared"]


@dataclass(frozen=True, slots=True)
class Alert:
    """``{prefix}/{site}/{room}/alert``: one raised or cleared event (QoS 1, stored and
    forwarded; ``delayed`` is true when it comes from the store after an outage)."""

    id: str
    device: str
    rule: str
    severity: Severity
    state: AlertState
    since: float
    at: float
    message: str
    delayed: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)
    v: int = ALERT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "id": self.id,
            "device": self.device,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "since": round(self.since, 3),
            "at": round(self.at, 3),
            "message": self.message,
            "delayed": self.delayed,
            "details": dict(self.details),
        }


# -- commands -----------------------------------------------------------------------------

RESULT_SCHEMA_VERSION = 1
MAX_REQUEST_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """``{prefix}/{site}/{room}/cmd/{name}``: ``{"id", "args"}`` (validated by
    `agent.sync.commands`, whose refusals name the request id when it is known)."""

    id: str
    args: Any = None

    FIELDS: ClassVar[frozenset[str]] = frozenset({"id", "args"})


@dataclass(frozen=True, slots=True)
class CommandResult:
    """``.../cmd/{name}/result``: ``id`` is None when the request's id was unreadable."""

    id: str | None
    command: str
    ok: bool
    result: Mapping[str, Any] | None = None
    error: str | None = None
    at: float = field(default_factory=time.time)
    v: int = RESULT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "id": self.id,
            "command": self.command,
            "ok": self.ok,
            "result": dict(self.result) if self.ok and self.result is not None else None,
            "error": None if self.ok else self.error,
            "at": round(self.at, 3),
        }


# -- lesson announcement -----------------------------------------------------------------

MAX_ANNOUNCEMENT_BYTES = 16 * 1024


class AnnouncementInvalid(ContractError):
    """A lesson announcement that fails validation (the text says why)."""


def precedes(a: Announcement, b: Announcement) -> bool:
    """Which of two live lessons of one group stands: the earlier start, then the lower
    device id. Both main rooms and every receiving room apply the same rule, so a
    misconfigured second main room never splits a group."""
    return (a.started_at, a.main) < (b.started_at, b.main)


@dataclass(frozen=True, slots=True)
class Announcement:
    """The retained ``{prefix}/lesson/{group}`` payload (contracts v1)."""

    lesson_id: str
    group: str
    main: str
    expected: tuple[str, ...]
    subject: str = ""
    joined: tuple[str, ...] = ()
    started_at: float = field(default_factory=time.time)
    state: str = "live"

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "lesson_id": self.lesson_id,
            "group": self.group,
            "subject": self.subject,
            "main": self.main,
            "expected": list(self.expected),
            "joined": list(self.joined),
            "started_at": round(self.started_at, 3),
            "state": self.state,
        }

    @classmethod
    def parse(cls, group: str, payload: bytes) -> Announcement | None:
        """The announcement, None for an empty payload (lesson ended), or
        `AnnouncementInvalid`."""
        if not payload:
            return None
        if len(payload) > MAX_ANNOUNCEMENT_BYTES:
            raise AnnouncementInvalid(f"{len(payload)} bytes, more than {MAX_ANNOUNCEMENT_BYTES}")
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AnnouncementInvalid("not UTF-8 JSON") from None
        if not isinstance(data, dict) or data.get("v") != 1:
            raise AnnouncementInvalid("not a version 1 announcement object")

        def text(name: str, default: str | None = None) -> str:
            value = data.get(name, default)
            if not isinstance(value, str):
                raise AnnouncementInvalid(f"{name} must be a string")
            return value

        def devices(name: str) -> tuple[str, ...]:
            value = data.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(v, str) and is_device_id(v) for v in value
            ):
                raise AnnouncementInvalid(f"{name} must be a list of device ids")
            return tuple(value)

        lesson_id, main = text("lesson_id"), text("main")
        if not is_lesson_id(lesson_id):
            raise AnnouncementInvalid("lesson_id is malformed")
        if not is_device_id(main):
            raise AnnouncementInvalid("main is not a device id")
        if text("group") != group:
            raise AnnouncementInvalid(f"group {data.get('group')!r} is not the topic's {group!r}")
        started = data.get("started_at", 0.0)
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise AnnouncementInvalid("started_at must be a number")
        return cls(
            lesson_id=lesson_id,
            group=group,
            main=main,
            expected=devices("expected"),
            subject=text("subject", "")[:200],
            joined=devices("joined"),
            started_at=float(started),
            state=text("state"),
        )


# -- health -------------------------------------------------------------------------------

HEALTH_SCHEMA_VERSION = 1


class SystemSection(TypedDict):
    """``health.system`` (agent.health.system)."""

    cpu_percent: float
    load1: float
    memory_percent: float
    disk_percent: float
    disk_free_mb: float
    temperature_c: float | None
    uptime_s: float
    clock_synced: bool | None


class MqttSection(TypedDict):
    """``health.mqtt``: the link's figures plus the store-and-forward backlog."""

    connected: bool
    seq: int
    connects: int
    disconnects: int
    publish_rtt_ms: float | None
    ping_rtt_ms: float | None
    queued: int


class AudioProcessingStages(TypedDict):
    """``health.capture.audio.processing.stages``: each stage as running now (configured,
    and the processing active)."""

    echo_cancellation: bool
    noise_suppression: bool
    high_pass_filter: bool
    auto_gain_control: bool
    linear_canceller: bool  # the linear stage ahead of AEC3 (configured, mono microphone)


ReferenceState = Literal["playing", "idle", "none"]  # the loudspeaker reference; idle:
# nothing played for a second; none: no playback in this agent


class AudioProcessingSection(TypedDict):
    """``health.capture.audio.processing``: the microphone's processing stage
    (agent.capture.processing); absent when ``capture.audio.processing.mode`` is off."""

    engine: str
    mode: Literal["auto", "on", "off"]  # as configured
    active: bool  # processing now ('auto': while loudspeakers feed the reference)
    stages: AudioProcessingStages
    reference: ReferenceState
    cancelling: bool  # the canceller has a live reference now
    echo_delay_ms: float | None  # reference to its echo, as the canceller is handed them
    echo_path_ms: float | None  # loudspeaker (by its stamps) to microphone
    echo_confidence: float | None  # normalised correlation at that delay (0-1)
    realignments: int  # times the reference was moved (delay out of range, or a jump)
    alignment_ms: float  # how far the reference is shifted from its stamps
    erle_db: float | None  # microphone over output power while the room hears only echo
    linear_engaged: bool  # the linear stage's output goes to AEC3 (it has converged)
    linear_erle_db: float | None  # microphone over the linear stage's output, last second
    echo_return_loss_db: float | None  # loudspeaker reference over microphone power
    input_level_dbfs: float | None  # the raw microphone, last second
    gain_db: float | None  # the gain control's current gain
    frames: int
    errors: int
    cpu_percent: float  # of one core


class CaptureSection(TypedDict):
    """``health.capture``: each hub's ``describe()``."""

    video: dict[str, Any]
    audio: dict[str, Any]


class AgentSection(TypedDict):
    """``health.agent``: the process and its services."""

    version: str
    profile: str
    cpu_percent: float
    rss_mb: float
    uptime_s: float
    services: dict[str, str]


class ActiveAlertEntry(TypedDict):
    """An entry of ``health.alerts.active``."""

    id: str
    rule: str
    severity: Severity
    since: float
    message: str


class AlertsSection(TypedDict):
    active: list[ActiveAlertEntry]


class _StreamCore(TypedDict):
    lesson: str | None
    role: Literal["main", "receiving"]
    peers: dict[str, dict[str, Any]]


class StreamSection(_StreamCore, total=False):
    """``health.stream`` of a room in (or ready for) a lesson; the rest depends on the role."""

    rooms: dict[str, dict[str, Any]]
    state: str
    reason: str
    main_online: bool | None
    hand_up: bool
    received: dict[str, dict[str, Any]]
    playback: dict[str, Any]
    recording: dict[str, Any]


class SensingSection(TypedDict):
    """``health.sensing`` while the sensing service exists (``null`` when it is off)."""

    state: Literal["starting", "loading", "running", "failed", "stopped"]
    reason: str
    models: list[str]
    target_fps: float
    fps: float
    latency_ms: dict[str, float]  # mean per stage: detect, track, align, embed
    samples: int
    skipped: int
    embeddings: int
    head_count: int
    enrolled: int
    in_lesson: bool
    published: int
    talk: SensingTalk
    hands: SensingHands
    errors: int  # samples whose analysis raised


class SensingTalk(TypedDict):
    """``health.sensing.talk``: the live talk analysis (no audio, no spans)."""

    state: Literal["off", "starting", "idle", "listening", "failed", "stopped"]
    reason: str
    role: Literal["main", "receiving"] | None  # of the lesson being analysed
    heard_s: float  # microphone audio analysed in this lesson
    reference: bool  # what the loudspeakers played was used in this lesson
    dropped: int  # microphone chunks the analysis fell too far behind to take
    lessons: int  # S-T results published


class SensingHands(TypedDict):
    """``health.sensing.hands``: hand raising (counts only, never who)."""

    state: Literal["off", "starting", "running", "failed", "stopped"]
    reason: str
    min_s: float  # sensing.hand_min_s
    regions_per_sample: float  # body regions read per sample, recent mean
    ms_per_region: float
    events: int  # hand raises counted since the service started
    room_hands: int  # times a raise raised the room's hand (sensing.raise_room_hand)


class SensingMinute(TypedDict):
    """``{prefix}/{site}/{room}/sensing`` each minute: counts only, never who."""

    v: int
    ts: float
    device: str
    lesson: str | None
    kind: Literal["minute"]
    minute_start: float
    samples: int
    head_count: int
    head_count_max: int
    head_up_rate: float | None  # faces turned to the front over the head count, mean
    present: int
    unknown: int
    hand_raises: int | None  # None: hand raising measured nothing this minute


class SensingAttendance(TypedDict):
    """``{prefix}/{site}/{room}/sensing`` at a lesson's end, and again after each teacher
    correction on the panel: attendance counts only. The newest (by ``ts``) holds."""

    v: int
    ts: float
    device: str
    lesson: str | None
    kind: Literal["attendance"]
    present: int
    late: int
    left_early: int
    absent: int
    unknown: int
    enrolled: int
    head_count: int  # median of the per-minute head counts
    head_count_max: int
    head_up_rate: float | None  # mean of the per-minute rates
    hand_raises: int | None  # the lesson's; None: not measured
    # Teacher corrections counted in the figures above: 0 at the lesson's end; the room
    # sends the message again, with the corrected counts, after each panel correction.
    corrections: int


StMode = Literal["practice", "lecture", "dialogue", "mixed"]  # by the S-T thresholds
ST_MODES: tuple[StMode, ...] = get_args(StMode)


class SensingSt(TypedDict):
    """``{prefix}/{site}/{room}/sensing`` at a lesson's end: its S-T figures, aggregates of
    the talk analysis only (never audio or who spoke when)."""

    v: int
    ts: float
    device: str
    lesson: str | None
    kind: Literal["st"]
    role: Literal["main", "receiving"]
    samples: str  # one T or S per interval
    interval_s: float
    n: int
    n_t: int
    runs: int
    rt: float
    ch: float
    mode: StMode


class ProfilesSection(TypedDict):
    """``health.profiles`` when the room pins IT keys: what is in effect (the full answer is
    on ``config/reported``)."""

    effective: dict[str, int]  # layer -> version
    keys_version: int
    applied: int
    dropped_messages: int


class _HealthCore(TypedDict):
    v: int
    ts: float
    n: int
    device: str
    system: SystemSection
    mqtt: MqttSection
    capture: CaptureSection
    agent: AgentSection
    alerts: AlertsSection
    stream: StreamSection | None
    sensing: SensingSection | None


class HealthMessage(_HealthCore, total=False):
    """``{prefix}/{site}/{room}/health`` (every ``health.interval_s``)."""

    profiles: ProfilesSection  # only when the room pins IT keys
