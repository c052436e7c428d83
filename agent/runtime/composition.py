"""The composition table: every part of the agent, what config it reads, how it is built.

One entry per part (`Part`): its name, the config it reads (a section such as
``"health"``, a field such as ``"health.interval_s"``, or one of the runtime inputs
``"runtime.broker_url"`` / ``"runtime.profile"``), the parts it holds references to, how
it is built, and whether the live lesson depends on it. A part whose object has
``reconfigure(new_config)`` takes a change in place; any other is rebuilt and its
service restarted alone, and so is every part that needs it. Adding a service is one
entry in `PARTS`; if it reports health it contributes its own section (`HealthSource`).

`plan` compares the running and the new effective config (frozen models: comparing
values is enough) and says what to touch; the daemon applies the plan, building the new
parts before the old ones stop (see ``daemon.py``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from agent import __version__
from agent.broker import embedded_password_file
from agent.capture import AudioHub, CaptureService, FrameHub, open_audio_source, open_video_source
from agent.config import AgentConfig
from agent.health import (
    AlertEngine,
    HealthReporter,
    HomeAssistantDiscovery,
    MetricsServer,
    SelftestThresholds,
    SystemMetrics,
    selftest_handler,
)
from agent.panel import PanelServer, load_or_create_token, token_path
from agent.runtime.profiles import ProfileListener, ProfileManager
from agent.sensing import LessonReports, SensingService, announce_correction, sensing_service
from agent.stream import (
    FanOutSink,
    FrameObserver,
    LatestFrames,
    ProbeSink,
    StreamService,
    open_playback,
)
from agent.sync import (
    CommandService,
    MqttLink,
    Outbox,
    ReliablePublisher,
    callable_handler,
    ping_handler,
)


@runtime_checkable
class Reconfigurable(Protocol):
    """A part that takes a new config in place (it reads what it needs from it)."""

    def reconfigure(self, config: AgentConfig) -> None: ...


@runtime_checkable
class HealthSource(Protocol):
    """A part that contributes one section of the health message."""

    health_section_name: str

    def health_section(self) -> dict[str, Any] | None: ...


class Host(Protocol):
    """What builders see: the running config, the runtime inputs and the other parts."""

    config: AgentConfig
    broker_url: str | None
    profile: str

    def part(self, name: str) -> Any: ...

    def in_lesson(self) -> bool: ...

    def health_sections(self) -> dict[str, Any]: ...

    def lesson_commands(self) -> Mapping[str, tuple[Any, dict[str, type], float]]: ...

    def profile_manager(self) -> ProfileManager | None: ...


@dataclass(frozen=True)
class Part:
    name: str
    reads: tuple[str, ...]
    build: Callable[[Host], Any]  # None: disabled by this config
    needs: tuple[str, ...] = ()
    live: bool = False  # the live lesson runs on it: a restart waits for the lesson end
    # What its ``reconfigure`` takes in place; a change to any other input rebuilds it.
    in_place: tuple[str, ...] = ()


# -- builders -------------------------------------------------------------------------------


def _capture(host: Host) -> CaptureService:
    capture = host.config.capture
    video = FrameHub(open_video_source(capture.video), capture)
    audio = AudioHub(open_audio_source(capture.audio), capture)
    return CaptureService(video, audio)


def _link(host: Host) -> MqttLink:
    config = host.config
    broker = config.broker
    if host.broker_url is not None:  # the embedded broker: this room's generated password
        broker = broker.model_copy(
            update={
                "username": None,
                "password": None,
                "password_file": embedded_password_file(config),
            }
        )
    return MqttLink(
        broker,
        config.identity,
        software_version=__version__,
        profile_name=host.profile,
        url_override=host.broker_url,
    )


def _publisher(host: Host) -> ReliablePublisher:
    # Alerts and events survive broker outages (and restarts) in an on-disk outbox.
    config = host.config
    outbox = Outbox(
        config.supervisor.state_dir / "outbox.db", max_rows=config.health.store_max_rows
    )
    return ReliablePublisher(host.part("mqtt"), outbox)


def _alerts(host: Host) -> AlertEngine:
    # A silent microphone matters only while a lesson is live in this room.
    return AlertEngine(host.config.health, in_lesson=host.in_lesson)


def _health(host: Host) -> HealthReporter:
    return HealthReporter(
        host.part("mqtt"),
        host.config.health,
        host.health_sections,
        system=SystemMetrics(host.config.supervisor.state_dir),
        alerts=host.part("alerts"),
        publisher=host.part("publisher"),
    )


def _stream(host: Host) -> StreamService:
    config = host.config
    capture: CaptureService = host.part("capture")
    # Received media: stamps read (glass-to-glass in health), the newest frame of each
    # room kept for the panel's tiles and the kiosk, sound to the speakers.
    received = ProbeSink()
    board = LatestFrames()
    playback = open_playback(config.stream.playback)
    observers: list[FrameObserver] = [received, board]
    if playback is not None:
        observers.append(playback)
    return StreamService(
        host.part("mqtt"),
        capture.video,
        capture.audio,
        config.stream,
        host_addresses=config.stream.ice_host_addresses,
        sink=FanOutSink(observers),
        media_timeout_s=config.stream.media_timeout_s,
        playback=playback,
        received=received,
        board=board,
    )


def room_hand_raiser(stream: StreamService) -> Callable[[], Awaitable[None]]:
    """Sensing's hand raise (``sensing.raise_room_hand``) -> the room's hand in its live
    lesson, through the joiner's ``set_hand`` as the panel's /api/hand does; nothing in a
    room that joins no lesson now, or whose hand is already up."""

    async def raise_hand() -> None:
        joiner = stream.joiner
        if joiner is None or joiner.lesson is None or joiner.hand_up:
            return
        await joiner.set_hand(True)

    return raise_hand


def _sensing(host: Host) -> SensingService | None:
    stream: StreamService = host.part("stream")
    capture: CaptureService = host.part("capture")
    topics = host.part("mqtt").topics
    return sensing_service(
        host.config,
        capture.video,
        host.part("publisher"),
        topics.sensing,
        stream.live_lesson,
        audio=capture.audio,
        raise_hand=room_hand_raiser(stream),
    )


def _commands(host: Host) -> CommandService:
    config = host.config
    link: MqttLink = host.part("mqtt")
    capture: CaptureService = host.part("capture")
    stream: StreamService = host.part("stream")
    commands = CommandService(link)
    commands.register(
        "ping", ping_handler(link, version=__version__, started_monotonic=time.monotonic()), args={}
    )
    commands.register(
        "selftest",
        selftest_handler(
            capture.video,
            capture.audio,
            state_dir=config.supervisor.state_dir,
            link=link,
            thresholds=SelftestThresholds.from_health(config.health),
            # The room's loudspeakers, for the echo-path check (none: it is skipped).
            speaker=stream.playback,
        ),
        args={},
        timeout_s=60,
    )
    commands.register("restart-capture", callable_handler(capture.restart), args={}, timeout_s=30)
    manager = host.profile_manager()
    if manager is not None and config.profiles.trusted_keys:
        # The device's answer to pushed profiles, on request (the same as config/reported).
        async def report() -> dict[str, Any]:
            return manager.book.reported_document()

        commands.register("config-report", callable_handler(report), args={})
    for name, (handler, args, timeout_s) in host.lesson_commands().items():
        commands.register(name, handler, args=args, timeout_s=timeout_s)
    return commands


def _panel(host: Host) -> PanelServer | None:
    config = host.config
    if not config.stream.panel_enabled:
        return None
    stream: StreamService = host.part("stream")
    capture: CaptureService = host.part("capture")
    return PanelServer(
        stream,
        config.stream,
        config.identity,
        token=load_or_create_token(token_path(config)),
        board=stream.board,
        audio=capture.audio,
        ui=config.ui,
        # The lesson reports sensing leaves in its store (read even with sensing off now).
        reports=LessonReports.of(config),
        corrected=_correction_announcer(host),
    )


def _correction_announcer(host: Host) -> Callable[[dict[str, Any]], Awaitable[None]]:
    publisher: ReliablePublisher = host.part("publisher")
    topic = host.part("mqtt").topics.sensing
    device = host.config.identity.device_id

    async def announce(report: dict[str, Any]) -> None:
        await announce_correction(publisher, topic, device, report)

    return announce


def _discovery(host: Host) -> HomeAssistantDiscovery | None:
    config = host.config
    if not config.health.home_assistant_discovery:
        return None
    return HomeAssistantDiscovery(
        host.part("mqtt"),
        software_version=__version__,
        model=host.profile,
        health_interval_s=config.health.interval_s,
    )


def _profiles(host: Host) -> ProfileListener | None:
    # Pushed profiles: the manager (the daemon's) outlives reloads; its listener follows
    # the link. No pinned keys: nothing to listen for.
    manager = host.profile_manager()
    if manager is None or not host.config.profiles.trusted_keys:
        return None
    return ProfileListener(host.part("mqtt"), manager)


def _metrics(host: Host) -> MetricsServer | None:
    config = host.config
    if not config.health.metrics_enabled:
        return None
    health: HealthReporter = host.part("health")
    # The last published message, not a fresh measurement: a scrape must not reset the
    # CPU-percent readings the health topic reports.
    return MetricsServer(
        lambda: health.last_message,
        config.identity,
        host=config.health.metrics_bind,
        port=config.health.metrics_port,
    )


PARTS: tuple[Part, ...] = (
    Part("capture", ("capture",), _capture, live=True),
    Part(
        "mqtt",
        ("broker", "identity", "runtime.broker_url", "runtime.profile", "supervisor.state_dir"),
        _link,
        live=True,
    ),
    Part(
        "publisher",
        ("supervisor.state_dir", "health.store_max_rows"),
        _publisher,
        needs=("mqtt",),
    ),
    Part("alerts", ("health",), _alerts, in_place=("health",)),
    Part(
        "health",
        ("health.interval_s", "supervisor.state_dir"),
        _health,
        needs=("mqtt", "publisher", "alerts"),
        in_place=("health.interval_s",),
    ),
    Part("stream", ("stream", "identity"), _stream, needs=("mqtt", "capture"), live=True),
    Part(
        "sensing",
        ("sensing", "identity", "supervisor.state_dir"),
        _sensing,
        needs=("capture", "publisher", "stream", "mqtt"),
    ),
    Part(
        "commands",
        ("health", "supervisor.state_dir"),
        _commands,
        needs=("mqtt", "capture", "stream"),
    ),
    Part(
        "panel",
        (
            "stream",
            "identity",
            "supervisor.state_dir",
            "ui",
            "sensing.roster_dir",
            "sensing.key_file",
        ),
        _panel,
        needs=("stream", "capture", "publisher"),
        live=True,
    ),
    Part(
        "discovery",
        ("health.home_assistant_discovery", "health.interval_s", "runtime.profile"),
        _discovery,
        needs=("mqtt",),
    ),
    Part("profiles", ("identity", "profiles"), _profiles, needs=("mqtt",)),
    Part(
        "metrics",
        ("health.metrics_enabled", "health.metrics_bind", "health.metrics_port", "identity"),
        _metrics,
        needs=("health",),
    ),
)


# -- planning a reload ------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Everything a part may read: the effective config and the runtime inputs."""

    config: AgentConfig
    broker_url: str | None
    profile: str

    def value(self, path: str) -> Any:
        if path == "runtime.broker_url":
            return self.broker_url
        if path == "runtime.profile":
            return self.profile
        value: Any = self.config
        for key in path.split("."):
            value = getattr(value, key)
        return value


Action = Literal["reconfigure", "restart"]


@dataclass(frozen=True)
class Plan:
    """What a reload touches: parts reconfigured in place and parts rebuilt."""

    actions: dict[str, Action] = field(default_factory=dict)
    changed: tuple[str, ...] = ()  # the config paths that differ
    live: tuple[str, ...] = ()  # rebuilt parts that the live lesson runs on

    @property
    def empty(self) -> bool:
        return not self.actions

    @property
    def restarts(self) -> list[str]:
        return [name for name, action in self.actions.items() if action == "restart"]

    @property
    def reconfigures(self) -> list[str]:
        return [name for name, action in self.actions.items() if action == "reconfigure"]

    def describe(self) -> str:
        if self.empty:
            return "nothing changes"
        parts = []
        if self.reconfigures:
            parts.append("reconfigure " + ", ".join(self.reconfigures))
        if self.restarts:
            parts.append("restart " + ", ".join(self.restarts))
        return "; ".join(parts)


def plan(
    running: Inputs,
    new: Inputs,
    objects: Mapping[str, Any],
    parts: tuple[Part, ...] = PARTS,
) -> Plan:
    """Which parts a change from ``running`` to ``new`` touches, and how."""
    changed: set[str] = set()
    actions: dict[str, Action] = {}
    for part in parts:  # the table is in dependency order: needs come first
        touched = [path for path in part.reads if running.value(path) != new.value(path)]
        changed.update(touched)
        if any(actions.get(need) == "restart" for need in part.needs):
            actions[part.name] = "restart"
        elif touched:
            in_place = isinstance(objects.get(part.name), Reconfigurable) and all(
                path in part.in_place for path in touched
            )
            actions[part.name] = "reconfigure" if in_place else "restart"
    live = tuple(part.name for part in parts if part.live and actions.get(part.name) == "restart")
    return Plan(actions, tuple(sorted(changed)), live)
