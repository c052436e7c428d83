"""Periodic health telemetry on ``{prefix}/{site}/{room}/health``.

The reporter knows nothing about capture or streaming: the runtime hands it a callable
that returns the current sections (``capture``, ``agent``, later ``stream`` and
``sensing``), each owned by the part of the agent that measures it. Messages are
versioned (``v``) so dashboards can evolve with the schema.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.config.models import HealthConfig
from agent.sync.link import LinkError, MqttLink

log = logging.getLogger(__name__)

HEALTH_SCHEMA_VERSION = 1
Sections = Callable[[], dict[str, Any]]


class HealthReporter:
    """A supervisor service that publishes one health message every ``interval_s``."""

    name = "health"

    def __init__(self, link: MqttLink, config: HealthConfig, sections: Sections) -> None:
        self._link = link
        self._interval = config.interval_s
        self._sections = sections
        self._sent = 0

    def message(self) -> dict[str, Any]:
        return {
            "v": HEALTH_SCHEMA_VERSION,
            "ts": round(time.time(), 3),
            "n": self._sent,
            "mqtt": self._link.stats().as_dict(),
            **self._sections(),
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if self._link.is_connected:
                try:
                    await self._link.publish(self._link.topics.health, self.message(), qos=0)
                    self._sent += 1
                except LinkError as exc:  # telemetry is best effort; the link logs outages
                    log.debug("health not sent: %s", exc)
            # Fixed-rate schedule: a slow publish does not drift the period.
            next_at += self._interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
