"""Subscriptions: topic filters, their bounded queues, and delivery to them.

The link keeps one broker subscription per filter however many `Subscription` objects
share it; MQTT 5 subscription identifiers route each message to its filters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from agent.sync.messages import Message, Traffic


def validate_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise ValueError("topic filter must not be empty")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(
                f"invalid topic filter {topic_filter!r}: '#' must be a whole last level"
            )
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic_filter!r}: '+' must be a whole level")


# -- subscriptions ----------------------------------------------------------------------


class SubscriptionOwner(Protocol):
    """What a `Subscription` needs from the link that made it (`MqttLink`)."""

    _traffic: Traffic

    async def _add_subscription(self, sub: Subscription) -> None: ...

    def _remove_subscription(self, sub: Subscription) -> None: ...


class Subscription:
    """Messages matching one topic filter; use as ``async with`` + ``async for``.

    ::

        async with link.subscribe("edu/lesson/+") as messages:
            async for message in messages:
                ...

    Entering subscribes (and, when connected, waits for the SUBACK); the subscription
    survives reconnects (the link subscribes again after each); leaving unsubscribes
    when no other `Subscription` of the link uses the same filter. The queue is
    bounded: when the consumer falls behind the oldest message is dropped and counted
    in ``dropped``. After a reconnect the broker sends retained messages again
    (``Message.retain`` is set on them).
    """

    def __init__(self, link: SubscriptionOwner, topic_filter: str, qos: int, maxsize: int) -> None:
        validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.topic_filter = topic_filter
        self.qos = qos
        self.dropped = 0
        self._link = link
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize)
        self._active = False

    async def __aenter__(self) -> Self:
        await self._link._add_subscription(self)
        self._active = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        self._link._remove_subscription(self)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def get(self) -> Message:
        """The next message (waits for one)."""
        if not self._active:
            raise RuntimeError("use 'async with link.subscribe(...)' before reading messages")
        return await self._queue.get()

    def _deliver(self, message: Message) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            self._link._traffic.dropped_messages += 1
        self._queue.put_nowait(message)


@dataclass
class Filter:
    topic_filter: str
    sub_id: int
    qos: int
    subscribers: list[Subscription]


# -- one connection ---------------------------------------------------------------------
