"""The supervisor: owns every service as a named asyncio task and restarts what fails.

A service is anything with a ``name`` and an ``async run()`` that runs until cancelled.
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
from typing import Any, Protocol

from agent.backoff import backoff_delay

log = logging.getLogger(__name__)


class Service(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


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

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run(self) -> None:
        """Run every service until cancelled, or until one exhausts its restart budget."""
        try:
            async with asyncio.TaskGroup() as group:
                for name, slot in self._slots.items():
                    group.create_task(self._keep_running(slot), name=f"service:{name}")
                self._started.set()
        except* ServiceFailed as failed:
            raise failed.exceptions[0] from None
        except* self._fatal as fatal:
            raise fatal.exceptions[0] from None

    async def _keep_running(self, slot: _Slot) -> None:
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
                slot.set(ServiceState.FAILED)
                raise
            except Exception as exc:
                slot.last_error = f"{type(exc).__name__}: {exc}"
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
