"""Alert rules over the health snapshot: pure logic, driven by the health reporter's tick.

`AlertEngine.evaluate(snapshot)` looks at the same dict the reporter publishes on the
health topic (see docs/contracts.md) and returns the alert events of this tick. Each rule
is a function ``snapshot -> Observation`` plus a severity and a hold time; the engine adds
the hysteresis, so no rule has to remember anything:

- *raise*: the condition has held for the rule's hold time (measured by the engine's
  clock from the first tick that saw it, or longer when the source itself says how long
  it has held, as the capture hubs do with ``state_for_s``);
- *clear*: the condition has been false for ``health.alert_clear_s`` (an alert does not
  flap with a condition that comes and goes within that time).

A raised alert gets an incident id (uuid4) that its ``cleared`` event repeats; ``since``
is when the condition began, not when the hold time ran out. A rule that cannot tell
(section missing) counts as "condition false".

The engine never sleeps or reads the time itself: it takes ``clock`` (monotonic, for
durations) and ``wall_clock`` (epoch, for ``since``/``at``), so tests drive it with a fake
clock, and the active set can be exported and restored so that a restart or a config
reload does not open a second incident for one continuous condition.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from agent.config import AgentConfig, HealthConfig
from agent.contracts import ActiveAlertEntry, Alert

log = logging.getLogger(__name__)

Snapshot = Mapping[str, Any]


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


RULE_NAMES = (
    "camera_lost",
    "camera_frozen",
    "camera_black",
    "mic_silent",
    "disk_full",
    "temperature_high",
    "broker_unreachable",
    "clock_unsynced",
)


@dataclass(frozen=True)
class Observation:
    """One rule's verdict on one snapshot."""

    active: bool
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    # How long the source itself says the condition has held, and since when (epoch),
    # when it knows (the hubs' state_for_s / since); otherwise the engine measures.
    held_s: float | None = None
    began_at: float | None = None


INACTIVE = Observation(False)


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    hold_s: float  # the condition must hold this long before the alert is raised
    check: Callable[[Snapshot], Observation]


@dataclass(frozen=True)
class AlertEvent:
    """A ``raised`` or ``cleared`` event (the payload of the alert topic, less the device)."""

    id: str
    rule: str
    severity: Severity
    state: Literal["raised", "cleared"]
    since: float
    at: float
    message: str
    details: Mapping[str, Any]

    def to_message(self, device: str, *, delayed: bool = False) -> dict[str, Any]:
        """The alert topic's JSON (docs/contracts.md); ``delayed`` is set by the store."""
        return Alert(
            id=self.id,
            device=device,
            rule=self.rule,
            severity="critical" if self.severity is Severity.CRITICAL else "warning",
            state=self.state,
            since=self.since,
            at=self.at,
            message=self.message,
            delayed=delayed,
            details=self.details,
        ).to_dict()


@dataclass(frozen=True)
class ActiveAlert:
    id: str
    rule: str
    severity: Severity
    since: float
    message: str
    details: Mapping[str, Any]

    def summary(self) -> ActiveAlertEntry:
        """An entry of the health message's ``alerts.active``."""
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": "critical" if self.severity is Severity.CRITICAL else "warning",
            "since": round(self.since, 3),
            "message": self.message,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, for `AlertEngine.restore` after a restart."""
        return {**self.summary(), "details": dict(self.details)}


@dataclass
class _Track:
    rule: Rule
    pending_since: float | None = None  # engine clock when the condition was first seen
    pending_began_at: float | None = None  # epoch when it began (for ``since``)
    clear_since: float | None = None  # engine clock when the condition was first false
    active: ActiveAlert | None = None


# -- reading the snapshot ----------------------------------------------------------------


def _dig(snapshot: Snapshot, *path: str) -> Any:
    node: Any = snapshot
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- the rules ---------------------------------------------------------------------------


def _camera_lost(snapshot: Snapshot) -> Observation:
    video = _dig(snapshot, "capture", "video")
    if not isinstance(video, Mapping) or video.get("state") != "lost":
        return INACTIVE
    reason = str(video.get("reason") or "no frames")
    return Observation(
        True,
        f"camera lost: {reason}",
        {"reason": reason, "reopen_attempts": video.get("reopen_attempts")},
        held_s=_number(video.get("state_for_s")),
        began_at=_number(video.get("since")),
    )


def _camera_frozen(snapshot: Snapshot) -> Observation:
    video = _dig(snapshot, "capture", "video")
    if not isinstance(video, Mapping) or video.get("state") != "degraded":
        return INACTIVE
    reason = str(video.get("reason") or "")
    if not reason.startswith("frozen"):
        return INACTIVE
    return Observation(
        True,
        f"camera picture {reason}",
        {"reason": reason},
        held_s=_number(video.get("state_for_s")),
        began_at=_number(video.get("since")),
    )


def _camera_black(config: HealthConfig) -> Callable[[Snapshot], Observation]:
    def check(snapshot: Snapshot) -> Observation:
        video = _dig(snapshot, "capture", "video")
        if not isinstance(video, Mapping) or video.get("state") not in ("ok", "degraded"):
            return INACTIVE
        luma = _number(video.get("mean_luma"))
        if luma is None or luma >= config.black_luma_max:
            return INACTIVE
        return Observation(
            True,
            f"camera picture is black (mean luma {luma:.1f} < {config.black_luma_max:g})",
            {"mean_luma": luma, "threshold": config.black_luma_max},
        )

    return check


def _mic_silent(
    config: HealthConfig, in_lesson: Callable[[], bool]
) -> Callable[[Snapshot], Observation]:
    def check(snapshot: Snapshot) -> Observation:
        audio = _dig(snapshot, "capture", "audio")
        if not isinstance(audio, Mapping) or audio.get("state") != "ok":
            return INACTIVE
        level = _number(audio.get("level_dbfs"))
        processing = audio.get("processing")
        if isinstance(processing, Mapping) and processing.get("active"):
            # What is sent is silent whenever the room is quiet or hears only the
            # loudspeakers (the canceller removes them, the suppressor the hum): a dead
            # or muted microphone shows on the raw input, which the stage reports.
            level = _number(processing.get("input_level_dbfs"))
        if level is None or level >= config.mic_silent_dbfs:
            return INACTIVE
        try:
            live = in_lesson()
        except Exception:
            log.exception("in_lesson() failed; treating as no lesson")
            return INACTIVE
        if not live:
            return INACTIVE  # an empty room between lessons is silent, and that is fine
        return Observation(
            True,
            f"microphone silent during the lesson ({level:.0f} dBFS < "
            f"{config.mic_silent_dbfs:g} dBFS)",
            {"level_dbfs": level, "threshold_dbfs": config.mic_silent_dbfs},
        )

    return check


def _disk_full(config: HealthConfig) -> Callable[[Snapshot], Observation]:
    def check(snapshot: Snapshot) -> Observation:
        percent = _number(_dig(snapshot, "system", "disk_percent"))
        if percent is None or percent < config.disk_alert_percent:
            return INACTIVE
        free = _number(_dig(snapshot, "system", "disk_free_mb"))
        return Observation(
            True,
            f"state disk {percent:.0f}% full (alert at {config.disk_alert_percent:g}%)",
            {"disk_percent": percent, "disk_free_mb": free},
        )

    return check


def _temperature_high(config: HealthConfig) -> Callable[[Snapshot], Observation]:
    def check(snapshot: Snapshot) -> Observation:
        celsius = _number(_dig(snapshot, "system", "temperature_c"))
        if celsius is None or celsius <= config.temperature_alert_c:
            return INACTIVE
        return Observation(
            True,
            f"CPU at {celsius:.0f} °C (alert above {config.temperature_alert_c:g} °C)",
            {"temperature_c": celsius},
        )

    return check


def _broker_unreachable(snapshot: Snapshot) -> Observation:
    if _dig(snapshot, "mqtt", "connected") is not False:
        return INACTIVE
    error = _dig(snapshot, "mqtt", "last_error")
    detail = f" ({error})" if error else ""
    return Observation(True, f"broker unreachable{detail}", {"last_error": error})


def _clock_unsynced(snapshot: Snapshot) -> Observation:
    if _dig(snapshot, "system", "clock_synced") is not False:
        return INACTIVE  # True, or None: cannot tell
    return Observation(True, "system clock is not NTP-synchronised", {})


def default_rules(config: HealthConfig, in_lesson: Callable[[], bool]) -> list[Rule]:
    """The rules of docs/contracts.md with their thresholds from ``config``."""
    return [
        Rule("camera_lost", Severity.CRITICAL, config.camera_lost_alert_s, _camera_lost),
        Rule("camera_frozen", Severity.WARNING, config.frozen_alert_s, _camera_frozen),
        Rule("camera_black", Severity.WARNING, config.black_alert_s, _camera_black(config)),
        Rule(
            "mic_silent",
            Severity.WARNING,
            config.mic_silent_alert_s,
            _mic_silent(config, in_lesson),
        ),
        Rule("disk_full", Severity.CRITICAL, 0.0, _disk_full(config)),
        Rule(
            "temperature_high",
            Severity.CRITICAL,
            config.temperature_alert_s,
            _temperature_high(config),
        ),
        Rule(
            "broker_unreachable",
            Severity.WARNING,
            config.broker_unreachable_alert_s,
            _broker_unreachable,
        ),
        Rule("clock_unsynced", Severity.WARNING, config.clock_unsynced_alert_s, _clock_unsynced),
    ]


def _never_in_lesson() -> bool:
    return False


class AlertEngine:
    """Evaluates the rules on each health tick and turns conditions into incidents."""

    def __init__(
        self,
        config: HealthConfig,
        *,
        in_lesson: Callable[[], bool] = _never_in_lesson,
        rules: Sequence[Rule] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.clear_after_s = config.alert_clear_s
        chosen = default_rules(config, in_lesson) if rules is None else list(rules)
        self._in_lesson = in_lesson if rules is None else None
        self._tracks = {rule.name: _Track(rule) for rule in chosen}
        self._clock = clock
        self._wall = wall_clock
        self._new_id = new_id

    @property
    def rules(self) -> list[Rule]:
        return [track.rule for track in self._tracks.values()]

    def reconfigure(self, config: AgentConfig) -> None:
        """New thresholds in place: raised alerts stay raised, with their ids and timers."""
        self.clear_after_s = config.health.alert_clear_s
        if self._in_lesson is None:
            return  # custom rules (tests): nothing derived from the config
        for rule in default_rules(config.health, self._in_lesson):
            track = self._tracks.get(rule.name)
            if track is not None:
                track.rule = rule

    def active(self) -> list[ActiveAlert]:
        """The raised alerts not yet cleared, oldest first."""
        alerts = [t.active for t in self._tracks.values() if t.active is not None]
        return sorted(alerts, key=lambda a: a.since)

    def section(self) -> dict[str, Any]:
        """The health message's ``alerts`` section."""
        return {"active": [alert.summary() for alert in self.active()]}

    def restore(self, alerts: Iterable[Mapping[str, Any]]) -> int:
        """Adopt alerts raised before a restart (`ActiveAlert.to_dict` form).

        They stay active, with their ids, until their condition has been false for the
        clear time, so a condition that outlives a restart keeps one incident id.
        """
        adopted = 0
        for entry in alerts:
            try:
                alert = ActiveAlert(
                    id=str(entry["id"]),
                    rule=str(entry["rule"]),
                    severity=Severity(entry["severity"]),
                    since=float(entry["since"]),
                    message=str(entry["message"]),
                    details=dict(entry.get("details") or {}),
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring a stored alert that does not parse: %s", exc)
                continue
            track = self._tracks.get(alert.rule)
            if track is None:
                log.info("dropping stored alert %s of unknown rule %r", alert.id, alert.rule)
                continue
            track.active = alert
            track.pending_since = track.clear_since = None
            adopted += 1
        return adopted

    def evaluate(self, snapshot: Snapshot) -> list[AlertEvent]:
        """This tick's events: rules whose hold time ran out, alerts whose condition ended."""
        now, wall = self._clock(), self._wall()
        events: list[AlertEvent] = []
        for track in self._tracks.values():
            try:
                seen = track.rule.check(snapshot)
            except Exception:
                # A buggy rule must not take the others down; it keeps its state.
                log.exception("alert rule %s failed", track.rule.name)
                continue
            event = self._step(track, seen, now, wall)
            if event is not None:
                events.append(event)
        return events

    def _step(self, track: _Track, seen: Observation, now: float, wall: float) -> AlertEvent | None:
        rule = track.rule
        if seen.active:
            track.clear_since = None
            if track.active is not None:
                return None  # the incident goes on
            if track.pending_since is None:
                track.pending_since = now
                began = seen.began_at
                if began is None:
                    began = wall - (seen.held_s or 0.0)
                track.pending_began_at = min(began, wall)
            held = max(now - track.pending_since, seen.held_s or 0.0)
            if held < rule.hold_s:
                return None
            since = track.pending_began_at if track.pending_began_at is not None else wall
            alert = ActiveAlert(
                self._new_id(), rule.name, rule.severity, since, seen.message, dict(seen.details)
            )
            track.active = alert
            track.pending_since = track.pending_began_at = None
            log.warning(
                "alert raised: %s: %s",
                rule.name,
                seen.message,
                extra={"fields": {"alert": alert.id, "rule": rule.name}},
            )
            return AlertEvent(
                alert.id, rule.name, rule.severity, "raised", since, wall, seen.message,
                alert.details,
            )  # fmt: skip
        track.pending_since = track.pending_began_at = None
        if track.active is None:
            return None
        if track.clear_since is None:
            track.clear_since = now
        if now - track.clear_since < self.clear_after_s:
            return None
        alert, track.active, track.clear_since = track.active, None, None
        message = f"cleared: {alert.message}"
        log.info(
            "alert cleared: %s after %.0f s",
            rule.name,
            max(0.0, wall - alert.since),
            extra={"fields": {"alert": alert.id, "rule": rule.name}},
        )
        return AlertEvent(
            alert.id, rule.name, alert.severity, "cleared", alert.since, wall, message,
            {"duration_s": round(max(0.0, wall - alert.since), 1)},
        )  # fmt: skip
