"""Shared fixtures: a real Mosquitto per test (see tests/brokers.py) and a task-leak guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.brokers import mosquitto, mosquitto_tls, tls_material  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail any test that leaves asyncio tasks running: every task must have an owner."""
    yield
    current = asyncio.current_task()
    for _ in range(5):  # let tasks that are already finishing finish
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leaked:
            return
        await asyncio.sleep(0.01)
    for task in leaked:
        task.cancel()
    names = ", ".join(sorted(t.get_name() for t in leaked))
    pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {names}")
