"""The supervisor: owns every service as a named asyncio task and restarts what fails.

A service is anything with a ``name`` and an ``async run()`` that runs until cancelled;
one that also has ``async wait_ready()`` (a bound port, an opened device) is counted
as started only once that returns, so READY=1 means the services work, not that their
tasks exist. A reload swaps single services (`Supervisor.replace`) while the others
keep running.
A service that raises is restarted after a jittered, growing delay, within a budget
(like Frigate's watchdog, mirrored by systemd's StartLimitBurst): more than
``restart_budget`` failures within ``restart_window_s`` means something is really
broken, so the supervisor gives up and the process exits non-zero for systemd to act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from agent.aio import first_done
from agent.backoff import backoff_delay

log = logging.getLogger(__name__)


class Service(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


@runtime_checkable
class Startable(Protocol):
    """A service that can say when it has really started (its port bound, its device open)."""

    async def wait_ready(self) -> None: ...


class ServiceState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    restarts: int
    last_error: str | None
    since: float  # time.time() of the last state change


class ServiceFailed(Exception):
    """A service failed more often than its restart budget allows."""

    def __init__(self, name: str, failures: int, window_s: float, last_error: str) -> None:
        super().__init__(
            f"service {name!r} failed {failures} times within {window_s:g} s; "
            f"last error: {last_error}"
        )
        self.service = name


class _Slot:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.state = ServiceState.STARTING
        self.restarts = 0
        self.last_error: str | None = None
        self.since = time.time()
        self.failures: deque[float] = deque()
        self.failed_once = asyncio.Event()  # set by the first failure of this service
        self.gate = asyncio.Event()  # a replacement waits for its predecessor to stop
        self.gate.set()
        # A replacement on trial (a reload is checking that it starts): an error that is
        # fatal for the process (refused credentials) fails only this service, so the
        # reload can put the old one back.
        self.on_trial = False

    def set(self, state: ServiceState) -> None:
        self.state = state
        self.since = time.time()

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            self.service.name, self.state, self.restarts, self.last_error, self.since
        )


class Supervisor:
    def __init__(
        self,
        services: Iterable[Service],
        *,
        restart_budget: int = 5,
        restart_window_s: float = 60.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 10.0,
        rng: random.Random | None = None,
        fatal: tuple[type[Exception], ...] = (),
    ) -> None:
        self._slots = {service.name: _Slot(service) for service in services}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._budget = restart_budget
        self._window = restart_window_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._rng = rng or random.Random()
        self._started = asyncio.Event()
        # Errors a restart cannot fix (refused credentials, bad config): stop at once.
        self._fatal = fatal

    def status(self) -> list[ServiceStatus]:
        return [slot.status() for slot in self._slots.values()]

    def healthy(self) -> bool:
        """False once any service has failed for good: the watchdog then stops petting."""
        return all(slot.state is not ServiceState.FAILED for slot in self._slots.values())

    def names(self) -> list[str]:
        return list(self._slots)

    async def wait_started(
        self,
        names: Iterable[str] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[str]:
        """Wait until the services (all, or ``names``) have started; return those that have
        not within ``timeout`` (failed, or still starting), so the caller can say which."""
        await self._started.wait()
        chosen = [self._slots[name] for name in (self._slots if names is None else names)]
        waits = {
            slot.service.name: asyncio.ensure_future(self._slot_started(slot)) for slot in chosen
        }
        try:
            await asyncio.wait(waits.values(), timeout=timeout)
        finally:
            for future in waits.values():
                future.cancel()
            await asyncio.gather(*waits.values(), return_exceptions=True)
        return [
            name
            for name, future in waits.items()
            if future.cancelled() or future.exception() is not None or not future.result()
        ]

    async def _slot_started(self, slot: _Slot) -> bool:
        """True once the slot's service started; False as soon as it fails instead."""
        service = slot.service
        if not isinstance(service, Startable):
            await slot.gate.wait()
            return not slot.failed_once.is_set()
        await first_done(service.wait_ready(), slot.failed_once.wait())
        return not slot.failed_once.is_set()

    async def replace(
        self,
        name: str,
        service: Service | None,
        *,
        grace_s: float = 10.0,
        trial: bool = False,
    ) -> None:
        """Stop the running service ``name`` (if any) and run ``service`` in its place
        (``None`` removes it). The others keep running; the new one starts only once the
        old one has stopped (it may need the same port or device). With ``trial``, a fatal
        error fails only the new service until `end_trial`."""
        if self._group is None:
            raise RuntimeError("the supervisor is not running")
        slot: _Slot | None = None
        if service is not None:
            if service.name != name:
                raise ValueError(f"service {service.name!r} cannot replace {name!r}")
            slot = _Slot(service)
            slot.on_trial = trial
            slot.gate.clear()
            self._slots[name] = slot  # same key: keeps the status order
            new_task = self._group.create_task(self._keep_running(slot), name=f"service:{name}")
        old = self._tasks.pop(name, None)
        if service is None:
            self._slots.pop(name, None)
        else:
            self._tasks[name] = new_task
        if old is not None and not await cancel_and_wait(old, grace_s):
            log.error("service %s did not stop within %.1f s", name, grace_s)
        if slot is not None:
            slot.gate.set()

    def end_trial(self, names: Iterable[str]) -> None:
        """The reload kept these services: from now on their fatal errors stop the process."""
        for name in names:
            if name in self._slots:
                self._slots[name].on_trial = False

    async def run(self) -> None:
        """Run every service until cancelled, or until one exhausts its restart budget."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for name, slot in self._slots.items():
                    self._tasks[name] = group.create_task(
                        self._keep_running(slot), name=f"service:{name}"
                    )
                self._started.set()
        except* ServiceFailed as failed:
            raise failed.exceptions[0] from None
        except* self._fatal as fatal:
            raise fatal.exceptions[0] from None
        finally:
            self._group = None

    async def _keep_running(self, slot: _Slot) -> None:
        await slot.gate.wait()
        name = slot.service.name
        attempt = 0
        while True:
            slot.set(ServiceState.RUNNING)
            started = time.monotonic()
            try:
                await slot.service.run()
            except asyncio.CancelledError:
                raise
            except self._fatal as exc:
                slot.last_error = f"{type(exc).__name__}: {exc}"
                slot.failed_once.set()
                slot.set(ServiceState.FAILED)
                if slot.on_trial:
                    log.error("service %s cannot start: %s", name, slot.last_error)
                    return
                raise
            except Exception as exc:
                slot.last_error = f"{type(exc).__name__}: {exc}"
                slot.failed_once.set()
                now = time.monotonic()
                slot.failures.append(now)
                while slot.failures and slot.failures[0] < now - self._window:
                    slot.failures.popleft()
                if len(slot.failures) > self._budget:
                    slot.set(ServiceState.FAILED)
                    log.error(
                        "service %s exhausted its restart budget",
                        name,
                        extra={"fields": {"service": name, "error": slot.last_error}},
                    )
                    raise ServiceFailed(
                        name, len(slot.failures), self._window, slot.last_error
                    ) from exc
                # A service that ran for a while before failing starts its backoff afresh.
                attempt = 0 if now - started > self._window else attempt + 1
                delay = backoff_delay(attempt, *self._backoff, self._rng)
                slot.restarts += 1
                slot.set(ServiceState.BACKOFF)
                log.warning(
                    "service %s failed; restarting in %.1f s",
                    name,
                    delay,
                    exc_info=exc,
                    extra={"fields": {"service": name, "restarts": slot.restarts}},
                )
                await asyncio.sleep(delay)
            else:
                slot.set(ServiceState.FINISHED)
                log.info("service %s finished", name)
                return


async def cancel_and_wait(task: asyncio.Task[Any], grace_s: float) -> bool:
    """Cancel a task and wait for it up to ``grace_s``; True if it ended in time."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if task in done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        return True
    return False
