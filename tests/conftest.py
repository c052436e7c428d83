"""Shared fixtures: a real Mosquitto per test (see tests/brokers.py) and a leak guard.

The leak guard (like Home Assistant's ``verify_cleanup``) fails any test that leaves
behind an asyncio task, a scheduled event-loop timer or a thread: each of those must
have an owner that stops it, or a daemon would slowly fill with orphans (a reader
thread holding a camera, a consent check every 5 s on a closed connection).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.brokers import mosquitto, mosquitto_tls, tls_material  # noqa: F401  (fixtures)

THREAD_GRACE_S = 2.0
"""How long a thread that is finishing (told to stop, not yet out of its last read)
may take after the test before it counts as leaked."""
TIMER_GRACE_S = 0.1
"""How long the loop runs after the test for tasks and timers that are finishing."""


def _thread_leaks(before: set[threading.Thread]) -> list[threading.Thread]:
    # Daemon threads are checked too, deliberately: every thread the agent starts
    # (hub readers, the MQTT connect thread, playback, the recorder) is a daemon only so
    # that a read stuck in a driver cannot hold up interpreter exit, and each still has
    # an owner that must stop it; ignoring daemons would let exactly those leak.
    # Nothing is exempt by name: an event loop's default executor threads
    # (asyncio.to_thread, "asyncio_N") are joined when pytest-asyncio's runner closes
    # the test's loop, before this runs (the async guard depends on this fixture, so
    # this one is torn down last), and threads of session-wide fixtures exist before
    # the test starts, so they are in ``before``.
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running, after a grace for finishing ones."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    for thread in _thread_leaks(before):
        thread.join(max(0.0, deadline - time.monotonic()))
    leaked = _thread_leaks(before)
    if leaked:
        names = ", ".join(
            sorted(f"{t.name} (daemon={t.daemon}, target={_target(t)})" for t in leaked)
        )
        pytest.fail(f"test leaked {len(leaked)} thread(s): {names}")


def _target(thread: threading.Thread) -> str:
    """What the thread runs, for the failure message (``Thread._target`` is private
    but the only place the callable is kept; '?' if it is gone)."""
    target = getattr(thread, "_target", None)
    return getattr(target, "__qualname__", repr(target)) if target is not None else "?"


def _live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    """Timers still scheduled on ``loop``. asyncio has no public view of its scheduled
    callbacks; ``BaseEventLoop._scheduled`` (a heap of TimerHandles, cancelled ones
    included until they are purged) is what Home Assistant's guard reads too."""
    scheduled: list[asyncio.TimerHandle] = list(getattr(loop, "_scheduled", ()))
    return [handle for handle in scheduled if not handle.cancelled()]


@pytest.fixture(autouse=True)
async def _no_leaked_tasks(_no_leaked_threads: None) -> AsyncIterator[None]:
    """Fail any test that leaves asyncio tasks running or timers scheduled: every task
    and every ``call_later``/``call_at`` must have an owner that ends it.

    Depends on the thread guard so that the thread check runs last, after this loop
    (and its default executor) is closed."""
    yield
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + TIMER_GRACE_S
    while True:  # let tasks and timers that are already finishing finish
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if (not leaked and not _live_timers(loop)) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    for task in leaked:
        task.cancel()
    if leaked:  # a cancelled task's own timers (its sleep) go with it: not reported twice
        await asyncio.wait(leaked, timeout=1.0)
    timers = _live_timers(loop)
    for timer in timers:
        timer.cancel()
    problems = []
    if leaked:
        names = ", ".join(sorted(t.get_name() for t in leaked))
        problems.append(f"{len(leaked)} asyncio task(s): {names}")
    if timers:
        names = ", ".join(sorted(repr(timer) for timer in timers))
        problems.append(f"{len(timers)} scheduled timer(s): {names}")
    if problems:
        pytest.fail("test leaked " + "; ".join(problems))
