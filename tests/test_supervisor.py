"""The supervisor restarts failing services within a budget and cancels cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.runtime.supervisor import ServiceFailed, ServiceState, Supervisor


class Flaky:
    """A service that fails its first ``failures`` runs, then runs until cancelled."""

    def __init__(self, name: str, failures: int) -> None:
        self.name = name
        self.failures = failures
        self.runs = 0
        self.cancelled = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError(f"boom {self.runs}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_restarts_a_failing_service_and_keeps_the_others_running() -> None:
    flaky, steady = Flaky("flaky", failures=2), Flaky("steady", failures=0)
    supervisor = Supervisor(
        [flaky, steady], restart_budget=5, backoff_min_s=0.01, backoff_max_s=0.02
    )
    task = asyncio.create_task(supervisor.run())
    await wait_for(lambda: flaky.runs == 3)
    status = {s.name: s for s in supervisor.status()}
    assert status["flaky"].restarts == 2
    assert status["flaky"].last_error == "RuntimeError: boom 2"
    assert status["steady"].restarts == 0
    assert supervisor.healthy()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flaky.cancelled.is_set()
    assert steady.cancelled.is_set()


async def test_gives_up_when_the_budget_is_exhausted_and_stops_the_rest() -> None:
    broken, steady = Flaky("broken", failures=100), Flaky("steady", failures=0)
    supervisor = Supervisor(
        [broken, steady],
        restart_budget=3,
        restart_window_s=60,
        backoff_min_s=0.001,
        backoff_max_s=0.002,
    )
    with pytest.raises(ServiceFailed, match="'broken' failed 4 times within 60 s"):
        await asyncio.wait_for(supervisor.run(), timeout=10)
    assert broken.runs == 4
    assert steady.cancelled.is_set()
    assert not supervisor.healthy()
    assert {s.name: s.state for s in supervisor.status()}["broken"] is ServiceState.FAILED


async def test_a_service_that_returns_is_finished_not_restarted() -> None:
    class OneShot:
        name = "oneshot"
        runs = 0

        async def run(self) -> None:
            OneShot.runs += 1

    supervisor = Supervisor([OneShot()])
    await asyncio.wait_for(supervisor.run(), timeout=5)
    assert OneShot.runs == 1
    assert supervisor.status()[0].state is ServiceState.FINISHED


async def test_fatal_errors_stop_at_once_without_restarts() -> None:
    class BadCredentialsError(Exception):
        pass

    class Refused:
        name = "mqtt"
        runs = 0

        async def run(self) -> None:
            Refused.runs += 1
            raise BadCredentialsError("refused")

    steady = Flaky("steady", failures=0)
    supervisor = Supervisor([Refused(), steady], fatal=(BadCredentialsError,))
    with pytest.raises(BadCredentialsError):
        await asyncio.wait_for(supervisor.run(), timeout=5)
    assert Refused.runs == 1
    assert steady.cancelled.is_set()
