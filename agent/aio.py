"""Small asyncio helpers the daemon's packages share: wait for the first of several
things, and leave no task behind whichever way the wait ends (cancelled included)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_done(*waitables: Awaitable[Any], timeout: float | None = None) -> None:  # noqa: ASYNC109
    """Until the first of ``waitables`` finishes (or ``timeout``), leaving no task behind."""
    futures = [asyncio.ensure_future(w) for w in waitables]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)


async def wait_first(
    *events: asyncio.Event,
    timeout: float | None = None,  # noqa: ASYNC109
) -> asyncio.Event | None:
    """The first of ``events`` to be set (or None after ``timeout``), with no task left."""
    if not any(event.is_set() for event in events):
        await first_done(*(event.wait() for event in events), timeout=timeout)
    return next((event for event in events if event.is_set()), None)
