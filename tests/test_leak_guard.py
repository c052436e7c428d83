"""The leak guard in tests/conftest.py fails a test that leaves a task, a timer or a
thread behind, naming it, and lets clean tests and finishing threads pass.

Runs the guard on small throwaway test files in a pytester sandbox, in process.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SANDBOX_CONFTEST = """
from tests.conftest import _no_leaked_tasks, _no_leaked_threads  # noqa: F401
"""

LEAKY = """
import asyncio
import threading
import time

stop = threading.Event()


def test_clean_thread() -> None:
    thread = threading.Thread(target=lambda: None, name="finishes-at-once")
    thread.start()


def test_finishing_thread() -> None:
    threading.Thread(target=time.sleep, args=(0.3,), name="finishing", daemon=True).start()


def test_leaky_daemon_thread() -> None:
    threading.Thread(target=stop.wait, name="orphan-reader", daemon=True).start()


async def test_leaky_timer() -> None:
    asyncio.get_running_loop().call_later(30, print, "late")


async def test_cancelled_timer() -> None:
    asyncio.get_running_loop().call_later(30, print, "late").cancel()


async def test_executor_thread_is_the_loops() -> None:
    await asyncio.to_thread(time.sleep, 0.01)


async def test_leaky_task() -> None:
    asyncio.create_task(asyncio.sleep(30), name="orphan-task")


def test_zz_release() -> None:
    stop.set()
"""


def test_the_guard_names_leaked_threads_timers_and_tasks(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(SANDBOX_CONFTEST)
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=8, errors=3)  # teardown errors: the test ran
    output = result.stdout.str()
    assert "ERROR at teardown of test_leaky_daemon_thread" in output
    assert "leaked 1 thread(s): orphan-reader (daemon=True" in output
    assert "ERROR at teardown of test_leaky_timer" in output
    assert "1 scheduled timer(s): <TimerHandle" in output
    assert "ERROR at teardown of test_leaky_task" in output
    assert "1 asyncio task(s): orphan-task" in output
