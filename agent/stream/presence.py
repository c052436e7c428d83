"""Presence: another room's online/offline state from its retained birth / Last Will."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from agent.contracts import ContractError, DeviceState, StateOrder
from agent.sync import MqttLink, Topics

log = logging.getLogger(__name__)


def state_topic(prefix: str, device: str) -> str | None:
    """``{prefix}/{site}/{room}/state`` of a device id (None if it cannot be a topic)."""
    site, _, room = device.partition(".")
    try:
        return Topics(prefix, site, room).state
    except ValueError:
        return None


class Presence:
    """Another room's online/offline state, read from its retained state topic.

    ``online`` is None until a message arrives (the ACL may not let us read it: then we
    never hold back). A Last Will that arrives late, after a newer birth, is stale and
    ignored, as is a copy of a birth whose connection has ended: the one newer-than rule
    of `DeviceState.order` (``boot_time``, then ``seq``, which restarts with the process).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.online: bool | None = None
        self.since = time.time()
        self.reason = ""
        self.known = asyncio.Event()
        self.changed = asyncio.Event()
        self.messages = 0
        self.display_name: str | None = None  # from its birth message, for the panel
        self._current: DeviceState | None = None

    @property
    def offline(self) -> bool:
        """Known to be offline (unknown counts as online: never hold back on a guess)."""
        return self.online is False

    def update(self, payload: bytes) -> bool:
        """Apply one state message; True if ``online`` changed."""
        self.messages += 1
        try:
            data = json.loads(payload.decode("utf-8")) if payload else {}
        except (UnicodeDecodeError, ValueError):
            return False
        if not isinstance(data, dict):
            return False
        self.known.set()
        try:
            state: DeviceState | None = DeviceState.parse(data, lenient_seq=True)
        except ContractError:
            state = None  # cleared or unreadable: unknown, never a reason to hold back
        online: bool | None = None
        if state is not None:
            order = state.order(self._current)
            if order is StateOrder.STALE:
                log.debug(
                    "stale state of %s ignored (%s, %s < %s)",
                    self.device,
                    state.status,
                    state.key,
                    self._current.key if self._current is not None else None,
                )
                return False
            self._current = state
            online = state.online
            if state.online and state.display_name:
                self.display_name = state.display_name
            if not state.online:
                self.reason = state.reason or ""
        if online is self.online:
            return False
        self.online = online
        self.since = time.time()
        self.changed.set()
        return True


async def watch_presence(link: MqttLink, presence: Presence, on_change: Callable[[], None]) -> None:
    topic = state_topic(link.topics.prefix, presence.device)
    if topic is None:
        presence.known.set()
        return
    async with link.subscribe(topic, qos=1) as messages:
        async for message in messages:
            if presence.update(message.payload):
                log.info(
                    "%s is %s",
                    presence.device,
                    {True: "online", False: "offline", None: "unknown"}[presence.online],
                )
                on_change()
