"""The daemon: the parts of the composition table under one supervisor, reloaded in place.

Lifecycle: start the embedded broker if none is configured, build every part
(``composition.py``), start the services and tell systemd READY once they report
started, pet the watchdog while the loop is healthy, and on SIGTERM or SIGINT stop
everything within ``supervisor.shutdown_timeout_s``.

A reload (SIGHUP now, a profile pushed by IT next) validates the new config, computes
what it touches and applies only that: parts reconfigured in place, parts rebuilt and
restarted alone, everything else left running. The new parts are built before the old
ones stop; if building or starting them fails, the old ones are put back and the error
is reported. A change that would restart what the live lesson runs on (capture, the
link, the stream, the panel) waits for the lesson to end and says so (journal and
sd_notify STATUS); any other change applies at once.

The embedded broker follows ``broker.url``: a reload that sets it stops the embedded
Mosquitto once the link has moved to the configured broker; a reload that clears it
starts an embedded one and moves the link there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent import __version__
from agent.broker import RoomBroker
from agent.capture import (
    AudioSource,
    CaptureError,
    CaptureService,
    DeviceState,
    VideoSource,
    open_audio_source,
    open_video_source,
)
from agent.config import AgentConfig, ConfigError, ConfigSources, Layer, LoadedConfig
from agent.contracts import FleetTopics
from agent.health import ProcessMetrics
from agent.runtime.composition import PARTS, HealthSource, Inputs, Part, Plan, plan
from agent.runtime.profiles import ApplyResult, Outcome, ProfileManager
from agent.runtime.sdnotify import Notifier, WatchdogService
from agent.runtime.supervisor import (
    Service,
    ServiceFailed,
    ServiceState,
    Supervisor,
    cancel_and_wait,
)
from agent.stream import LessonConflict, LessonHost, StreamService
from agent.sync import CommandError, LinkAuthError, LinkConfigError, MqttLink, ProfileBook

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
RELOAD_RECHECK_S = 1.0  # how soon a reload held back by a lesson follows its end
READY_WAIT_S = 20.0  # READY=1 after this long even if a service is still starting
START_WAIT_S = 15.0  # a reloaded service that has not started by then is rolled back
CHECK_POLL_S = 0.2  # how often a pushed profile's check looks at what it touched


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


class ReloadFailed(Exception):
    """A new configuration could not be applied; the running one was kept."""


def _is_service(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "run") and hasattr(obj, "name")


class _Staging:
    """What builders see while a reload builds new parts: new config, new parts first."""

    def __init__(self, agent: Agent, loaded: LoadedConfig, broker_url: str | None) -> None:
        self.agent = agent
        self.config = loaded.config
        self.profile = loaded.profile
        self.broker_url = broker_url
        self.objects: dict[str, Any] = {}

    def part(self, name: str) -> Any:
        return self.objects[name] if name in self.objects else self.agent.part(name)

    # Late-bound to the agent: what these read is the agent's state after the switch.
    def in_lesson(self) -> bool:
        return self.agent.in_lesson()

    def health_sections(self) -> dict[str, Any]:
        return self.agent.health_sections()

    def lesson_commands(self) -> Mapping[str, tuple[Any, dict[str, type], float]]:
        return self.agent.lesson_commands()

    def profile_manager(self) -> ProfileManager | None:
        return self.agent.profile_manager()


class Agent:
    """The running parts of one room, built from the composition table."""

    def __init__(
        self,
        loaded: LoadedConfig,
        broker_url: str | None,
        parts: tuple[Part, ...] = PARTS,
        *,
        profiles: ProfileManager | None = None,
    ) -> None:
        self.loaded = loaded
        self._profiles = profiles
        self.config = loaded.config
        self.profile = loaded.profile
        self.broker_url = broker_url
        self.parts = parts
        self.process = ProcessMetrics()
        # Filled in by the daemon once the supervisor exists.
        self.service_states: Callable[[], dict[str, str]] = dict
        self._objects: dict[str, Any] = {}
        for part in parts:
            self._objects[part.name] = part.build(self)

    # -- what builders and parts read -------------------------------------------------

    def part(self, name: str) -> Any:
        return self._objects[name]

    def profile_manager(self) -> ProfileManager | None:
        return self._profiles

    @property
    def stream(self) -> StreamService:
        stream: StreamService = self._objects["stream"]
        return stream

    @property
    def link(self) -> MqttLink:
        link: MqttLink = self._objects["mqtt"]
        return link

    def services(self) -> list[Service]:
        return [obj for obj in self._objects.values() if _is_service(obj)]

    def health_sections(self) -> dict[str, Any]:
        """What the health topic carries: each part that reports health adds its section."""
        sections: dict[str, Any] = {
            obj.health_section_name: obj.health_section()
            for obj in self._objects.values()
            if isinstance(obj, HealthSource)
        }
        sections["agent"] = self.process.section(
            version=__version__, profile=self.profile, services=self.service_states()
        )
        return sections

    def in_lesson(self) -> bool:
        # Asked on every alert evaluation: no need to build the whole stream section.
        return self.stream.live_lesson() is not None

    def lesson_commands(self) -> Mapping[str, tuple[Any, dict[str, type], float]]:
        if not self.stream.hosts:
            return {}
        # The one button from IT or a presenter key, beside the panel.
        return {
            "lesson-start": (self.start_lesson, {"group": str, "subject": str}, 15.0),
            "lesson-end": (self.end_lesson, {"group": str}, 15.0),
        }

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

    def summary(self) -> str:
        capture: CaptureService = self._objects["capture"]
        video = capture.video.stats()
        mqtt = "up" if self.link.is_connected else "down"
        return f"video {video.state} {video.fps:.0f} fps; mqtt {mqtt}"

    # -- reload -------------------------------------------------------------------------

    def inputs(self) -> Inputs:
        return Inputs(self.config, self.broker_url, self.profile)

    def plan(self, loaded: LoadedConfig, broker_url: str | None) -> Plan:
        new = Inputs(loaded.config, broker_url, loaded.profile)
        return plan(self.inputs(), new, self._objects, self.parts)

    async def apply(
        self, change: Plan, loaded: LoadedConfig, broker_url: str | None, supervisor: Supervisor
    ) -> None:
        """Apply ``change`` (planned from this agent to ``loaded``); `ReloadFailed` keeps
        the running parts (the old ones are put back if a new one did not start)."""
        staging = _Staging(self, loaded, broker_url)
        rebuilt = [part for part in self.parts if change.actions.get(part.name) == "restart"]
        for part in rebuilt:
            try:
                staging.objects[part.name] = part.build(staging)
            except Exception as exc:
                raise ReloadFailed(f"cannot build {part.name}: {exc}") from exc
        old_objects = dict(self._objects)
        old_state = (self.loaded, self.config, self.profile, self.broker_url)
        try:
            await self._switch(rebuilt, staging.objects, supervisor)
            self.loaded, self.config = loaded, loaded.config
            self.profile, self.broker_url = loaded.profile, broker_url
            for name in change.reconfigures:
                self._objects[name].reconfigure(loaded.config)
            started = [
                self._objects[part.name].name
                for part in rebuilt
                if _is_service(self._objects[part.name])
            ]
            late = await supervisor.wait_started(started, timeout=START_WAIT_S)
            if not late:
                supervisor.end_trial(started)
                return
            reason = f"{', '.join(late)} did not start with the new configuration"
        except Exception as exc:
            log.exception("applying the new configuration failed; putting the old one back")
            reason = f"applying it failed: {exc}"
        # Put the old parts back: their services run again, with the old config.
        old = {p.name: old_objects[p.name] for p in rebuilt}
        await self._switch(rebuilt, old, supervisor, trial=False)
        self.loaded, self.config, self.profile, self.broker_url = old_state
        for name in change.reconfigures:
            self._objects[name].reconfigure(self.config)
        raise ReloadFailed(reason)

    async def _switch(
        self,
        rebuilt: list[Part],
        objects: dict[str, Any],
        supervisor: Supervisor,
        *,
        trial: bool = True,
    ) -> None:
        """Stop the rebuilt parts' services (dependants first), then start the new ones."""
        for part in reversed(rebuilt):
            running: Any = self._objects.get(part.name)
            if _is_service(running) and running.name in supervisor.names():
                await supervisor.replace(running.name, None)
        for part in rebuilt:
            self._objects[part.name] = objects[part.name]
            if _is_service(objects[part.name]):
                await supervisor.replace(objects[part.name].name, objects[part.name], trial=trial)


class Daemon:
    def __init__(
        self, loaded: LoadedConfig, sources: ConfigSources, book: ProfileBook | None = None
    ) -> None:
        self.loaded = loaded
        self.sources = sources
        self.profiles = (
            None
            if book is None
            else ProfileManager(book, self, FleetTopics(loaded.config.broker.topic_prefix))
        )
        self._apply_lock = asyncio.Lock()
        self.notifier = Notifier.from_environment()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._brokers = RoomBroker()  # the embedded broker, when broker.url is empty
        self.agent: Agent | None = None
        self._announced: AgentConfig | None = None  # the config said to wait for the lesson

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await asyncio.to_thread(preflight_media_files, self.loaded.config)
        except CaptureError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        try:
            return await self._serve(await self._brokers.start_for(self.loaded.config))
        finally:
            await self._brokers.keep_only(None)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _serve(self, broker_url: str | None) -> int:
        config = self.loaded.config
        agent = self.agent = Agent(self.loaded, broker_url, profiles=self.profiles)
        watchdog = WatchdogService(self.notifier, self._healthy)
        owned: list[Service] = [watchdog] if self.profiles is None else [watchdog, self.profiles]
        supervisor = self._supervisor = Supervisor(
            [*agent.services(), *owned],
            restart_budget=config.supervisor.restart_budget,
            restart_window_s=config.supervisor.restart_window_s,
            fatal=(LinkAuthError, LinkConfigError),
        )
        agent.service_states = self._service_states
        running = asyncio.create_task(supervisor.run(), name="supervisor")
        late = await self._first_of(running, supervisor.wait_started(timeout=READY_WAIT_S))
        if running.done():
            return self._exit_code(running)
        if late:
            log.warning("ready while still starting: %s", ", ".join(late))
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
        outcome = await self._wait(running, agent, supervisor)
        if outcome == "failed":
            return self._exit_code(running)
        # systemd treats STOPPING=1 as "deactivating".
        self.notifier.stopping()
        stopped_in = await self._shutdown(running, self.loaded.config.supervisor.shutdown_timeout_s)
        log.info("stopped cleanly in %.2f s", stopped_in)
        return EXIT_OK

    @staticmethod
    async def _first_of(running: asyncio.Task[None], started: Any) -> list[str]:
        """``started``'s result, unless the supervisor stops first (then [])."""
        waiter: asyncio.Task[list[str]] = asyncio.ensure_future(started)
        await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            return []
        return waiter.result()

    def _service_states(self) -> dict[str, str]:
        if self._supervisor is None:
            return {}
        return {status.name: status.state.value for status in self._supervisor.status()}

    def _healthy(self) -> bool:
        """Withhold watchdog pings once a service has failed for good."""
        return self._supervisor is None or self._supervisor.healthy()

    async def _wait(self, running: asyncio.Task[None], agent: Agent, supervisor: Supervisor) -> str:
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
                candidate = await self._validate()
                if candidate is not None:
                    pending = candidate
                else:
                    self.notifier.ready()
            if pending is not None:
                with contextlib.suppress(ConfigError):  # pushed layers may have changed since
                    pending = self.sources.load()
                pending = await self.reconfigure(agent, supervisor, pending)
            if pending is None:
                self.notifier.status(agent.summary())

    async def _validate(self) -> LoadedConfig | None:
        """The new config from the site files, or None (rejected, the reason logged)."""
        try:
            candidate = self.sources.load()
        except ConfigError as exc:
            # Keep the last good state: the running agent is untouched. (Media files are
            # checked where every change is applied: `apply_config`.)
            log.error(
                "rejected new configuration; keeping the running one: %s",
                "; ".join(str(issue) for issue in exc.issues),
            )
            return None
        return candidate

    async def reconfigure(
        self, agent: Agent, supervisor: Supervisor, candidate: LoadedConfig
    ) -> LoadedConfig | None:
        """Apply the site files' ``candidate`` now, or return it when it must wait for the
        lesson's end (see `apply_config`)."""
        result = await self.apply_config(candidate, origin="the site files")
        return candidate if result.outcome is Outcome.WAITING else None

    # -- the one path for every config change (ConfigTarget, for pushed profiles) -----------

    def load_with(self, pushed: tuple[Layer, ...]) -> LoadedConfig:
        return dataclasses.replace(self.sources, pushed=pushed).load()

    def set_pushed(self, pushed: tuple[Layer, ...]) -> None:
        """The pushed layers now in effect: a SIGHUP reload keeps them."""
        self.sources = dataclasses.replace(self.sources, pushed=pushed)

    async def apply_config(
        self, candidate: LoadedConfig, *, origin: str, lesson_may_delay: bool = True
    ) -> ApplyResult:
        """Apply ``candidate`` (the site files on SIGHUP, a pushed profile, a rollback).

        Only what it touches changes; a change that would restart what the live lesson
        runs on waits for its end (``WAITING``, the rest applied at once) unless
        ``lesson_may_delay`` is false (a rollback puts the last good config back now).
        """
        agent, supervisor = self.agent, self._supervisor
        if agent is None or supervisor is None:
            return ApplyResult(Outcome.FAILED, "the agent is not running")
        async with self._apply_lock:
            try:
                if candidate.config != self._announced:  # not checked already, waiting
                    await asyncio.to_thread(preflight_media_files, candidate.config)
            except CaptureError as exc:
                log.error(
                    "rejected new configuration; keeping the running one: %s (from %s)", exc, origin
                )
                self.notifier.ready()
                return ApplyResult(Outcome.REJECTED, str(exc))
            url = self._brokers.url_for(candidate.config)
            moving_to_embedded = url == RoomBroker.PENDING
            change = agent.plan(candidate, url)
            if change.live and agent.in_lesson() and lesson_may_delay:
                await self._apply_what_the_lesson_allows(agent, supervisor, candidate)
                reason = (
                    f"a live lesson runs on {', '.join(change.live)}; the change applies "
                    "when it ends"
                )
                if self._announced != candidate.config:  # once per new config
                    log.warning(
                        "configuration is valid; applying it when the live lesson ends: %s "
                        "(the lesson runs on %s; from %s)",
                        change.describe(),
                        ", ".join(change.live),
                        origin,
                        extra={"fields": {"changed": list(change.changed)}},
                    )
                    self._announced = candidate.config
                    self.notifier.ready()
                    self.notifier.status(
                        f"new configuration waits for the lesson to end ({', '.join(change.live)})"
                    )
                return ApplyResult(Outcome.WAITING, reason)
            self._announced = None
            started = time.monotonic()
            try:
                if moving_to_embedded:
                    url = await self._brokers.start_for(candidate.config)
                    change = agent.plan(candidate, url)
                await agent.apply(change, candidate, url, supervisor)
            except Exception as exc:
                if not isinstance(exc, ReloadFailed):
                    log.exception("new configuration not applied: %s", exc)
                log.error(
                    "new configuration not applied; keeping the running one: %s (from %s)",
                    exc,
                    origin,
                )
                await self._reloaded(agent)
                return ApplyResult(Outcome.FAILED, str(exc))
            previous = self.loaded.config
            self.loaded = candidate
            if self.profiles is not None and (
                previous.profiles != candidate.config.profiles
                or previous.identity.groups != candidate.config.identity.groups
            ):
                log.warning(
                    "the pinned IT keys or the lesson groups changed: pushed profiles keep the "
                    "old ones until the agent restarts (systemctl restart classroom-agent)"
                )
            await self._brokers.keep_only(agent.broker_url)
            log.info(
                "reloaded configuration in %.3f s: %s (from %s)",
                time.monotonic() - started,
                change.describe(),
                origin,
                extra={"fields": {"layers": self.loaded.layers, "changed": list(change.changed)}},
            )
            self.notifier.ready()
            return ApplyResult(Outcome.APPLIED, "", tuple(change.restarts), tuple(change.actions))

    async def check_applied(self, result: ApplyResult, timeout_s: float) -> str | None:
        """Whether what the change touched works: the camera delivers frames (in its new
        mode), the microphone opens, the link is connected, every restarted service runs.
        None when it does within ``timeout_s``; otherwise what does not."""
        deadline = time.monotonic() + timeout_s
        while True:
            problems = self._problems(result)
            if not problems:
                return None
            if time.monotonic() >= deadline:
                return f"after {timeout_s:.0f} s: " + "; ".join(problems)
            await asyncio.sleep(CHECK_POLL_S)

    def _problems(self, result: ApplyResult) -> list[str]:
        agent, supervisor = self.agent, self._supervisor
        if agent is None or supervisor is None:
            return ["the agent is not running"]
        problems = []
        if "capture" in result.restarted:
            capture: CaptureService = agent.part("capture")
            for stats in (capture.video.stats(), capture.audio.stats()):
                if stats.state is not DeviceState.OK:
                    problems.append(f"{stats.name} is {stats.state.value}: {stats.reason}")
        if "mqtt" in result.restarted and not agent.link.is_connected:
            error = agent.link.stats().last_error or "no answer"
            problems.append(f"the broker {agent.link.url} is not connected ({error})")
        states = {status.name: status.state for status in supervisor.status()}
        for name in result.restarted:
            obj = agent.part(name)
            if _is_service(obj) and states.get(obj.name) is not ServiceState.RUNNING:
                problems.append(f"{obj.name} is {states.get(obj.name, 'missing')}")
        return problems

    async def _apply_what_the_lesson_allows(
        self, agent: Agent, supervisor: Supervisor, candidate: LoadedConfig
    ) -> None:
        """Apply now the sections of ``candidate`` that the live lesson does not run on
        (health, alerts, metrics...); the rest waits for the lesson end."""
        running = agent.config
        now: dict[str, Any] = {}
        for name in AgentConfig.model_fields:
            value = getattr(candidate.config, name)
            if value == getattr(running, name):
                continue
            alone = dataclasses.replace(
                agent.loaded, config=running.model_copy(update={name: value})
            )
            if not agent.plan(alone, agent.broker_url).live:
                now[name] = value
        if not now:
            return
        partial = dataclasses.replace(agent.loaded, config=running.model_copy(update=now))
        change = agent.plan(partial, agent.broker_url)
        try:
            await agent.apply(change, partial, agent.broker_url, supervisor)
        except ReloadFailed as exc:
            log.error("the part of the new configuration that could apply now did not: %s", exc)
            return
        log.info(
            "applied the part of the new configuration the lesson does not run on (%s): %s",
            ", ".join(now),
            change.describe(),
        )

    async def _reloaded(self, agent: Agent) -> None:
        """After a reload that did not apply: only the broker the link uses stays up."""
        await self._brokers.keep_only(agent.broker_url)
        self.notifier.ready()

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


def run_daemon(
    loaded: LoadedConfig, sources: ConfigSources, book: ProfileBook | None = None
) -> int:
    """Run until SIGTERM/SIGINT; the exit code tells systemd whether to restart."""
    daemon = Daemon(loaded, sources, book)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(daemon.main())
    return EXIT_OK
