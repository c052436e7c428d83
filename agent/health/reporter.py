"""Periodic health telemetry on ``{prefix}/{site}/{room}/health``, and the alerts it drives.

The reporter knows nothing about capture or streaming: the runtime hands it a callable
that returns the sections owned by other parts of the agent (``capture``, ``agent``, and
``stream`` / ``sensing`` once they exist; both default to ``null``). The reporter adds
what it owns: ``v``, ``ts``, ``n``, ``device``, ``system`` (`SystemMetrics`), ``mqtt``
(the link's stats and the store-and-forward backlog ``queued``) and ``alerts`` (the
`AlertEngine`'s active set). The message is docs/contracts.md's, validated by
``schemas/health.v1.json`` in the tests.

Every tick, connected or not, it builds the snapshot, lets the alert engine evaluate it
and hands the engine's events to the `ReliablePublisher` (QoS 1, stored while the broker
is away, so ``broker_unreachable`` raised offline arrives later flagged ``delayed``);
then, if connected, it publishes the health message at QoS 0 (telemetry is best effort:
the next one is ten seconds away, and a backlog of stale telemetry helps nobody).

``n`` counts ticks since the reporter started: a gap in ``n`` at a subscriber means
messages were not sent (the link was down) or lost. The engine's active alerts are saved
in the outbox's state table after every change and restored at start, so a restart or a
config reload keeps one incident id for one continuous condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, HealthConfig
from agent.contracts import HEALTH_SCHEMA_VERSION
from agent.health.alerts import AlertEngine, AlertEvent
from agent.health.system import SystemMetrics
from agent.sync import LinkError, MqttLink, OutboxError, ReliablePublisher

log = logging.getLogger(__name__)

ACTIVE_ALERTS_KEY = "alerts.active"
Sections = Callable[[], dict[str, Any]]
_OWNED = frozenset({"v", "ts", "n", "device", "system", "mqtt", "alerts"})


class HealthReporter:
    """A supervisor service that publishes one health message every ``interval_s``.

    ``system`` defaults to `SystemMetrics` of ``/`` (pass the state directory's), ``alerts``
    to an `AlertEngine` of ``config`` with no lesson hook, and without a ``publisher``
    alert events are published directly at QoS 1 and lost while the link is down.
    """

    name = "health"

    def __init__(
        self,
        link: MqttLink,
        config: HealthConfig,
        sections: Sections,
        *,
        system: SystemMetrics | None = None,
        alerts: AlertEngine | None = None,
        publisher: ReliablePublisher | None = None,
    ) -> None:
        self._link = link
        self._interval = config.interval_s
        self._sections = sections
        self.system = system if system is not None else SystemMetrics(Path("/"))
        self.alerts = alerts if alerts is not None else AlertEngine(config)
        self.publisher = publisher
        self._rescheduled = asyncio.Event()
        self._n = 0
        self._restored = False
        self.last_message: dict[str, Any] | None = None

    async def message(self) -> dict[str, Any]:
        """The health message of this moment (alerts as of the last evaluation)."""
        stats = self._link.stats().as_dict()
        stats["queued"] = self.publisher.queued if self.publisher is not None else 0
        message: dict[str, Any] = {
            "v": HEALTH_SCHEMA_VERSION,
            "ts": round(time.time(), 3),
            "n": self._n,
            "device": self._link.identity.device_id,
            "system": await self.system.read(),
            "mqtt": stats,
        }
        for key, value in self._sections().items():
            if key in _OWNED:
                log.debug("health section %r is the reporter's own; ignoring the runtime's", key)
                continue
            message[key] = value
        message["alerts"] = self.alerts.section()
        message.setdefault("stream", None)
        message.setdefault("sensing", None)
        return message

    async def tick(self) -> dict[str, Any]:
        """One period's work: snapshot, alert events, health message. Returns the message."""
        if not self._restored:
            await self._restore()
        message = await self.message()
        events = self.alerts.evaluate(message)
        message["alerts"] = self.alerts.section()
        for event in events:
            await self._send_alert(event)
        if events:
            await self._save_active()
        self._n += 1
        self.last_message = message
        if self._link.is_connected:
            try:
                await self._link.publish(self._link.topics.health, message, qos=0)
            except LinkError as exc:  # best effort; the link logs outages
                log.debug("health not sent: %s", exc)
        return message

    def reconfigure(self, config: AgentConfig) -> None:
        """A new ``health.interval_s`` takes effect at once: the next tick comes now."""
        if config.health.interval_s != self._interval:
            self._interval = config.health.interval_s
            self._rescheduled.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.tick()
            # Fixed-rate schedule: a slow tick does not drift the period; after a long
            # stall (a suspended machine) skip the missed ticks rather than burst.
            next_at = max(next_at + self._interval, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_at - loop.time()):
                    await self._rescheduled.wait()
            if self._rescheduled.is_set():
                self._rescheduled.clear()
                next_at = loop.time()

    async def _send_alert(self, event: AlertEvent) -> None:
        payload = event.to_message(self._link.identity.device_id)
        topic = self._link.topics.alert
        if self.publisher is not None:
            await self.publisher.send(topic, payload, kind="alert")
            return
        try:
            await self._link.publish(topic, payload, qos=1)
        except LinkError as exc:
            log.warning("alert %s %s not sent: %s", event.rule, event.state, exc)

    async def _restore(self) -> None:
        self._restored = True
        if self.publisher is None:
            return
        try:
            saved = await self.publisher.outbox.get_state(ACTIVE_ALERTS_KEY)
        except OutboxError as exc:
            log.warning("active alerts not restored: %s", exc)
            return
        if not saved:
            return
        try:
            entries = json.loads(saved)
        except ValueError:
            log.warning("stored active alerts are not JSON; starting without them")
            return
        if isinstance(entries, list):
            adopted = self.alerts.restore(e for e in entries if isinstance(e, dict))
            if adopted:
                log.info("restored %d active alert(s) from before the restart", adopted)

    async def _save_active(self) -> None:
        if self.publisher is None:
            return
        state = json.dumps([alert.to_dict() for alert in self.alerts.active()])
        try:
            await self.publisher.outbox.set_state(ACTIVE_ALERTS_KEY, state)
        except OutboxError as exc:
            log.warning("active alerts not saved: %s", exc)
