"""The daemon: wires capture, the MQTT link and health reporting under one supervisor.

Lifecycle: start the embedded broker if none is configured, start every service, tell
systemd READY, pet the watchdog while the loop is healthy, reload the site files on
SIGHUP (an invalid file is rejected and the running config kept), and on SIGTERM or
SIGINT stop everything within ``supervisor.shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.broker import MosquittoBroker
from agent.capture import (
    AudioHub,
    AudioSource,
    CaptureError,
    DeviceState,
    FrameHub,
    VideoSource,
    open_audio_source,
    open_video_source,
)
from agent.config import AgentConfig, ConfigError, LoadedConfig, load_config
from agent.health import (
    AlertEngine,
    HealthReporter,
    HomeAssistantDiscovery,
    ProcessMetrics,
    SystemMetrics,
)
from agent.health.prometheus import MetricsServer
from agent.health.selftest import SelftestThresholds, selftest_handler
from agent.panel import PanelServer, load_or_create_token
from agent.panel.server import token_path
from agent.runtime.sdnotify import Notifier, WatchdogService
from agent.runtime.supervisor import Service, ServiceFailed, Supervisor, cancel_and_wait
from agent.stream import LessonConflict, LessonHost, ProbeSink, StreamService
from agent.stream.playback import open_playback
from agent.stream.sinks import FanOutSink, FrameObserver, LatestFrames
from agent.sync import (
    CommandService,
    LinkAuthError,
    LinkConfigError,
    MqttLink,
    Outbox,
    ReliablePublisher,
)
from agent.sync.commands import CommandError, callable_handler, ping_handler

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
RELOAD_RECHECK_S = 1.0  # how soon a reload held back by a lesson follows its end


def preflight_media_files(config: AgentConfig) -> None:
    """Open and close file sources once: a bad file is a config error, not a lost device.

    Cameras and microphones are not checked here: hardware comes and goes, and the hubs
    report and retry it; a file named in the config that cannot be read never will be.
    """
    sources: list[VideoSource | AudioSource] = []
    if config.capture.video.source == "file":
        sources.append(open_video_source(config.capture.video))
    if config.capture.audio.source == "file":
        sources.append(open_audio_source(config.capture.audio))
    for source in sources:
        try:
            source.open()
        finally:
            source.close()


class CaptureService:
    """Runs the video and audio hubs together, and restarts them on command.

    The supervisor restarts what fails; this restarts what an operator asks for
    (``cmd/restart-capture``), e.g. after re-seating a USB camera.
    """

    name = "capture"

    def __init__(self, video: FrameHub, audio: AudioHub) -> None:
        self.video = video
        self.audio = audio
        self._restart = asyncio.Event()

    async def run(self) -> None:
        while True:
            async with asyncio.TaskGroup() as group:
                hubs = [
                    group.create_task(self.video.run(), name=self.video.name),
                    group.create_task(self.audio.run(), name=self.audio.name),
                ]
                await self._restart.wait()
                self._restart.clear()
                log.info("restarting capture on request")
                for hub in hubs:
                    hub.cancel()

    async def restart(self) -> dict[str, str]:
        """Reopen both devices; return their states once they have settled (<= 20 s)."""
        requested = time.time()
        self._restart.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            video, audio = self.video.stats(), self.audio.stats()
            settled = [(video.since_wall, video.state), (audio.since_wall, audio.state)]
            if all(
                since >= requested and state != DeviceState.STARTING for since, state in settled
            ):
                break
            await asyncio.sleep(0.1)
        return {"video": self.video.stats().state.value, "audio": self.audio.stats().state.value}


class Agent:
    """One configuration's worth of services; rebuilt from scratch on reload."""

    def __init__(self, loaded: LoadedConfig, broker_url: str | None) -> None:
        config = loaded.config
        self.config = config
        self.video = FrameHub(open_video_source(config.capture.video), config.capture)
        self.audio = AudioHub(open_audio_source(config.capture.audio), config.capture)
        self.capture = CaptureService(self.video, self.audio)
        self.link = MqttLink(
            config.broker,
            config.identity,
            software_version=__version__,
            profile_name=loaded.profile,
            url_override=broker_url,
        )
        self.profile = loaded.profile
        # Alerts and events survive broker outages (and restarts) in an on-disk outbox.
        self.outbox = Outbox(
            config.supervisor.state_dir / "outbox.db", max_rows=config.health.store_max_rows
        )
        self.publisher = ReliablePublisher(self.link, self.outbox)
        # A silent microphone matters only while a lesson is live in this room.
        self.alerts = AlertEngine(config.health, in_lesson=self.in_lesson)
        self.process = ProcessMetrics()
        # Filled in by the daemon once the supervisor exists.
        self.service_states: Callable[[], dict[str, str]] = dict
        self.health = HealthReporter(
            self.link,
            config.health,
            self.health_sections,
            system=SystemMetrics(config.supervisor.state_dir),
            alerts=self.alerts,
            publisher=self.publisher,
        )
        # Received media: stamps read (glass-to-glass in health), the newest frame of
        # each room kept for the panel's tiles and the kiosk, sound to the speakers.
        self.received = ProbeSink()
        self.board = LatestFrames()
        self.playback = open_playback(config.stream.playback)
        observers: list[FrameObserver] = [self.received, self.board]
        if self.playback is not None:
            observers.append(self.playback)
        self.stream = StreamService(
            self.link,
            self.video,
            self.audio,
            config.stream,
            host_addresses=config.stream.ice_host_addresses,
            sink=FanOutSink(observers),
            media_timeout_s=config.stream.media_timeout_s,
            playback=self.playback,
        )
        self.commands = CommandService(self.link)
        self.commands.register(
            "ping",
            ping_handler(self.link, version=__version__, started_monotonic=time.monotonic()),
            args={},
        )
        self.commands.register(
            "selftest",
            selftest_handler(
                self.video,
                self.audio,
                state_dir=config.supervisor.state_dir,
                link=self.link,
                thresholds=SelftestThresholds.from_health(config.health),
            ),
            args={},
            timeout_s=60,
        )
        self.commands.register(
            "restart-capture", callable_handler(self.capture.restart), args={}, timeout_s=30
        )
        if self.stream.hosts:
            # The one button, until the panel lands: IT or a presenter key sends these.
            self.commands.register(
                "lesson-start",
                self.start_lesson,
                args={"group": str, "subject": str},
                timeout_s=15,
            )
            self.commands.register("lesson-end", self.end_lesson, args={"group": str}, timeout_s=15)
        self.optional: list[Service] = []
        self.panel: PanelServer | None = None
        if config.stream.panel_enabled:
            self.panel = PanelServer(
                self.stream,
                config.stream,
                config.identity,
                token=load_or_create_token(token_path(config)),
                board=self.board,
                audio=self.audio,
            )
            self.optional.append(self.panel)
        if config.health.home_assistant_discovery:
            self.optional.append(
                HomeAssistantDiscovery(
                    self.link,
                    software_version=__version__,
                    model=loaded.profile,
                    health_interval_s=config.health.interval_s,
                )
            )
        if config.health.metrics_enabled:
            # The last published message, not a fresh measurement: a scrape must not
            # reset the CPU-percent readings the health topic reports.
            self.optional.append(
                MetricsServer(
                    lambda: self.health.last_message,
                    config.identity,
                    host=config.health.metrics_bind,
                    port=config.health.metrics_port,
                )
            )

    def health_sections(self) -> dict[str, Any]:
        """What the health topic carries; sections are filled by their owners."""
        return {
            "capture": {
                "video": self.video.stats().to_dict(),
                "audio": self.audio.stats().to_dict(),
            },
            "stream": self.stream_section(),
            "agent": self.process.section(
                version=__version__, profile=self.profile, services=self.service_states()
            ),
        }

    def in_lesson(self) -> bool:
        # Asked on every alert evaluation: no need to build the whole stream section.
        return self.stream.live_lesson() is not None

    def stream_section(self) -> dict[str, Any] | None:
        section = self.stream.stats()
        if section is not None:
            section["received"] = self.received.summary()
        return section

    def _host(self, args: dict[str, Any]) -> LessonHost:
        try:
            return self.stream.host_for(args.get("group") or None)
        except LookupError as exc:
            raise CommandError(str(exc)) from None

    async def start_lesson(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            announcement = await self._host(args).start_lesson(args.get("subject", ""))
        except LessonConflict as exc:
            raise CommandError(str(exc)) from None
        return {"lesson_id": announcement.lesson_id, "group": announcement.group}

    async def end_lesson(self, args: dict[str, Any]) -> dict[str, Any]:
        host = self._host(args)
        await host.end_lesson()
        return {"group": host.group}

    def services(self) -> list[Service]:
        return [
            self.capture,
            self.link,
            self.publisher,
            self.health,
            self.stream,
            self.commands,
            *self.optional,
        ]

    def summary(self) -> str:
        video = self.video.stats()
        mqtt = "up" if self.link.is_connected else "down"
        return f"video {video.state} {video.fps:.0f} fps; mqtt {mqtt}"


class Daemon:
    def __init__(
        self, loaded: LoadedConfig, site_files: Sequence[Path], profile: str | None
    ) -> None:
        self.loaded = loaded
        self.site_files = list(site_files)
        self.profile = profile
        self.notifier = Notifier.from_environment()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._supervisor: Supervisor | None = None

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        broker: MosquittoBroker | None = None
        try:
            await asyncio.to_thread(preflight_media_files, self.loaded.config)
        except CaptureError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        try:
            broker_url = None
            if self.loaded.config.broker.url is None:
                broker = MosquittoBroker()
                await broker.start()
                broker_url = broker.url
                log.info("no broker configured: started the embedded Mosquitto at %s", broker_url)
            return await self._serve(broker_url)
        finally:
            if broker is not None:
                await broker.stop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _serve(self, broker_url: str | None) -> int:
        while True:
            config = self.loaded.config
            agent = Agent(self.loaded, broker_url)
            watchdog = WatchdogService(self.notifier, self._healthy)
            supervisor = self._supervisor = Supervisor(
                [*agent.services(), watchdog],
                restart_budget=config.supervisor.restart_budget,
                restart_window_s=config.supervisor.restart_window_s,
                fatal=(LinkAuthError, LinkConfigError),
            )
            agent.service_states = self._service_states
            running = asyncio.create_task(supervisor.run(), name="supervisor")
            await supervisor.wait_started()
            self.notifier.ready()
            self.notifier.status(f"running as {config.identity.device_id}")
            log.info(
                "agent running",
                extra={
                    "fields": {
                        "device": config.identity.device_id,
                        "profile": self.loaded.profile,
                        "version": __version__,
                    }
                },
            )
            outcome = await self._wait(running, agent)
            if outcome == "failed":
                return self._exit_code(running)
            if outcome == "stop":
                # Only on the final stop: systemd treats STOPPING=1 as "deactivating",
                # and a READY=1 after it would not bring the unit back.
                self.notifier.stopping()
            stopped_in = await self._shutdown(running, config.supervisor.shutdown_timeout_s)
            if outcome == "stop":
                log.info("stopped cleanly in %.2f s", stopped_in)
                return EXIT_OK
            # outcome == "reload": the new config was validated in _wait.
            log.info("reloaded configuration", extra={"fields": {"layers": self.loaded.layers}})

    def _service_states(self) -> dict[str, str]:
        if self._supervisor is None:
            return {}
        return {status.name: status.state.value for status in self._supervisor.status()}

    def _healthy(self) -> bool:
        """Withhold watchdog pings once a service has failed for good."""
        return self._supervisor is None or self._supervisor.healthy()

    async def _wait(self, running: asyncio.Task[None], agent: Agent) -> str:
        pending: LoadedConfig | None = None  # a valid reload held back by a live lesson
        while True:
            stop = asyncio.create_task(self._stop.wait(), name="wait-stop")
            reload = asyncio.create_task(self._reload.wait(), name="wait-reload")
            done, waiting = await asyncio.wait(
                {running, stop, reload},
                return_when=asyncio.FIRST_COMPLETED,
                timeout=RELOAD_RECHECK_S if pending is not None else 30,
            )
            for task in waiting - {running}:
                task.cancel()
            await asyncio.gather(*(waiting - {running}), return_exceptions=True)
            if running in done:
                return "failed"
            if stop in done:
                return "stop"
            if reload in done:
                self._reload.clear()
                self.notifier.reloading()
                try:
                    candidate = load_config(self.site_files, profile=self.profile)
                    await asyncio.to_thread(preflight_media_files, candidate.config)
                except (ConfigError, CaptureError) as exc:
                    # Keep the last good state: the running agent is untouched.
                    problems = exc.issues if isinstance(exc, ConfigError) else [exc]
                    log.error(
                        "rejected new configuration; keeping the running one: %s",
                        "; ".join(str(problem) for problem in problems),
                    )
                    self.notifier.ready()
                    continue
                pending = candidate
                if agent.in_lesson():
                    # Rebuilding the services would cut every room out of the lesson.
                    log.warning("configuration is valid; applying it when the live lesson ends")
                    self.notifier.ready()
                    self.notifier.status("new configuration waits for the lesson to end")
            if pending is not None and not agent.in_lesson():
                self.loaded = pending
                return "reload"
            self.notifier.status(agent.summary())

    async def _shutdown(self, running: asyncio.Task[None], grace_s: float) -> float:
        started = time.monotonic()
        if not await cancel_and_wait(running, grace_s):
            log.error("services did not stop within %.1f s", grace_s)
        return time.monotonic() - started

    def _exit_code(self, running: asyncio.Task[None]) -> int:
        error = running.exception()
        if isinstance(error, (LinkAuthError, LinkConfigError)):
            log.error("%s", error)
            return EXIT_CONFIG
        if isinstance(error, ServiceFailed):
            log.error("%s", error)
            return EXIT_FAILURE
        log.error("supervisor stopped unexpectedly: %r", error)
        return EXIT_FAILURE


def run_daemon(loaded: LoadedConfig, site_files: Sequence[Path], profile: str | None) -> int:
    """Run until SIGTERM/SIGINT; the exit code tells systemd whether to restart."""
    daemon = Daemon(loaded, site_files, profile)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(daemon.main())
    return EXIT_OK
