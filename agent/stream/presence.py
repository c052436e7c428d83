"""Presence: another room's online/offline state from its retained birth / Last Will."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

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
    ignored: messages are ordered by (``boot_time``, ``seq``), because ``seq`` restarts
    with the process.
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
        self._latest_online: tuple[str, int] | None = None

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
        status = data.get("status")
        seq = data.get("seq", 0)
        boot = data.get("boot_time", "")
        key = (
            boot if isinstance(boot, str) else "",
            seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        )
        self.known.set()
        name = data.get("display_name")
        if status == "online" and isinstance(name, str) and name.strip():
            self.display_name = name.strip()[:80]
        if status == "online":
            if self._latest_online is None or key >= self._latest_online:
                self._latest_online = key
            online: bool | None = True
        elif status == "offline":
            if self._latest_online is not None and key < self._latest_online:
                log.debug(
                    "stale Last Will of %s ignored (%s < %s)", self.device, key, self._latest_online
                )
                return False
            online = False
            reason = data.get("reason")
            self.reason = reason[:80] if isinstance(reason, str) else ""
        else:
            online = None
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
