"""The maintenance dashboard's web server: one page, a JSON snapshot, live WebSocket pushes.

One asyncio process holds a read-only `MqttLink` (``announce=False``: no birth, no Last
Will, so the dashboard never appears in the fleet), a `FleetModel` fed by six
subscriptions, and an aiohttp server:

``GET /``             the page (static HTML/CSS/JS from ``static/``; nothing from the internet)
``GET /api/fleet``    the whole fleet as JSON (`FleetModel.snapshot`)
``GET /api/stats``    counters: messages, refused payloads, pushes, clients, the link
``GET /api/ws``       WebSocket: first a ``snapshot`` message, then ``update`` messages
                      carrying only the rooms that changed (and the lessons, or the
                      lessons' sensing figures, when they did)

Updates are coalesced: the model marks rooms dirty, and the push loop sends at most one
update per ``push_interval_s`` (4 per second by default) to every client, serialised
once. A client that falls behind does not make the server buffer without bound: its
backlog is dropped and it gets a fresh snapshot instead.

The page has no login and shows the fleet's state, so the server listens on loopback by
default, answers only to expected ``Host`` names (DNS rebinding) and refuses WebSocket
handshakes from other origins (another site open in the same browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent import __version__, locales
from agent.config import IdentityConfig
from agent.contracts import FleetTopics
from agent.dashboard.config import DashboardConfig
from agent.dashboard.model import FleetModel
from agent.logs import RejectionLog
from agent.sync import Message, MqttLink, Subscription
from agent.web import expected_hosts, guard, request_logger, same_origin

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TICK_S = 1.0  # staleness and broker-status checks
SUBSCRIBE_WAIT_S = 10.0  # start-up: how long ready waits for the broker's SUBACKs
RECONNECT_SETTLE_S = 5.0  # after a reconnect, retained announcements not re-sent are over
SEND_TIMEOUT_S = 10.0  # a client that cannot take one message in this long is dropped
MAX_BACKLOG = 16  # messages queued per client before it is resynchronised instead
STATE_QUEUE = 50_000  # retained states of a large fleet arrive in one burst: never drop them
TELEMETRY_QUEUE = 10_000


class DashboardError(RuntimeError):
    """The dashboard cannot start (e.g. its port is taken); the text says what to fix."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Client:
    """One WebSocket client: a bounded backlog and the event that wakes its sender."""

    def __init__(self, ws: web.WebSocketResponse, remote: str | None) -> None:
        self.ws = ws
        self.remote = remote or "?"
        self.backlog: list[str] = []
        self.wake = asyncio.Event()
        self.resync = False
        self.sent = 0

    def offer(self, text: str) -> bool:
        """Queue one update; False when the backlog overflowed (a snapshot follows)."""
        self.wake.set()
        if len(self.backlog) < MAX_BACKLOG:
            self.backlog.append(text)
            return True
        self.backlog.clear()
        self.resync = True  # its sender sends a fresh snapshot instead of the backlog
        return False


class DashboardServer:
    """The dashboard as a supervisor-style service: ``run()`` until cancelled.

    ``url_override`` replaces ``config.broker.url`` (an embedded broker's URL).
    """

    name = "dashboard"

    def __init__(
        self,
        config: DashboardConfig,
        *,
        model: FleetModel | None = None,
        url_override: str | None = None,
    ) -> None:
        self.config = config
        self.prefix = config.broker.topic_prefix
        self.model = model or FleetModel(
            self.prefix,
            default_interval_s=config.health_interval_s,
            stale_intervals=config.stale_after_intervals,
            max_rooms=config.max_rooms,
        )
        self._wake = asyncio.Event()
        self.model.on_change = self._wake.set
        client = config.client_id or uuid.uuid4().hex[:10]
        self.link = MqttLink(
            config.broker,
            IdentityConfig(site="dashboard", room=client),
            software_version=__version__,
            profile_name="dashboard",
            url_override=url_override,
            announce=False,
        )
        self._clients: set[_Client] = set()
        self._sent_lessons: dict[str, dict[str, Any]] = {}  # as last pushed, by group
        self._ready = asyncio.Event()
        self._bound: tuple[str, int] | None = None
        self._broker_connected = False
        self._broker_since = time.time()
        self._broker_dirty = False
        self.pushes = 0
        self.push_bytes = 0
        self.resyncs = 0
        self.clients_dropped = 0
        self._hosts = expected_hosts(config.bind, config.allowed_hosts)
        self.bad_requests = RejectionLog(logger, "bad request to the dashboard")

    # -- public -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The page's URL (the bound port once running)."""
        host, port = self._bound or (self.config.bind, self.config.port)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    async def wait_ready(self) -> None:
        """Until the page is served and the subscriptions are in place."""
        await self._ready.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.model.stats.to_dict(),
            "server": {
                "clients": len(self._clients),
                "pushes": self.pushes,
                "push_bytes": self.push_bytes,
                "resyncs": self.resyncs,
                "clients_dropped": self.clients_dropped,
            },
            "link": self.link.stats().as_dict(),
            "rooms": len(self.model.rooms),
        }

    async def run(self) -> None:
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            logger=request_logger(self.bad_requests),
            handle_signals=False,
            shutdown_timeout=2.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.bind, self.config.port)
            try:
                await site.start()
            except OSError as exc:
                raise DashboardError(
                    f"dashboard: cannot listen on {self.config.bind}:{self.config.port} "
                    f"({exc.strerror or exc}); choose another --port or --bind"
                ) from exc
            address = runner.addresses[0]
            self._bound = (str(address[0]), int(address[1]))
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="dashboard-link")
                await self._subscribe(tasks)
                tasks.create_task(self._tick(), name="dashboard-tick")
                tasks.create_task(self._push_loop(), name="dashboard-push")
                logger.info("maintenance dashboard at %s (broker %s)", self.url, self.link.url)
                self._ready.set()
        finally:
            self._ready.clear()
            await runner.cleanup()
            self._bound = None

    # -- MQTT ---------------------------------------------------------------------------

    async def _subscribe(self, tasks: asyncio.TaskGroup) -> None:
        fleet = FleetTopics(self.prefix)
        filters = (
            (fleet.state_all, 1, STATE_QUEUE),
            (fleet.lesson_all, 1, STATE_QUEUE),
            (fleet.alert_all, 1, TELEMETRY_QUEUE),
            (fleet.health_all, 0, TELEMETRY_QUEUE),
            (fleet.config_reported_all, 1, STATE_QUEUE),
            (fleet.sensing_all, 1, TELEMETRY_QUEUE),  # counts only, once a minute a room
        )
        # "Ready" means subscribed (SUBACKs in): nothing published after it is missed.
        # A broker that is down at start delays that by at most SUBSCRIBE_WAIT_S.
        entered = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                await self.link.wait_connected()
        for topic_filter, qos, size in filters:
            subscription = self.link.subscribe(topic_filter, qos, maxsize=size)
            kind = topic_filter.rsplit("/", 1)[-1].strip("+") or "lesson"
            done = asyncio.Event()
            entered.append(done)
            tasks.create_task(self._consume(subscription, done), name=f"dashboard-sub-{kind}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                for done in entered:
                    await done.wait()

    async def _consume(self, subscription: Subscription, entered: asyncio.Event) -> None:
        async with subscription as messages:
            entered.set()
            async for message in messages:
                self._apply(message)

    def _apply(self, message: Message) -> None:
        try:
            self.model.apply(message.topic, message.payload, retained=message.retain)
        except Exception:  # the model refuses bad input itself; this is a bug, not input
            logger.exception("dashboard: message on %s broke the fleet model", message.topic)

    async def _tick(self) -> None:
        """Once a second: stale rooms, the broker's status, lessons ended while away."""
        connects = 0
        settle_at: float | None = None
        reconnected_after = 0.0
        previous_tick = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            self.model.check_stale()
            connected = self.link.is_connected
            if connected != self._broker_connected:
                self._broker_connected = connected
                self._broker_since = time.time()
                self._broker_dirty = True
                self._wake.set()
                if not connected:
                    logger.warning("dashboard: lost the broker; the page shows the last figures")
            current = self.link.stats().connects
            if current > connects:
                if connects > 0:
                    # Reconnected since the previous tick: the broker re-sends every
                    # retained announcement; whatever it does not re-send has ended.
                    reconnected_after = previous_tick
                    settle_at = time.monotonic() + RECONNECT_SETTLE_S
                connects = current
            if settle_at is not None and time.monotonic() >= settle_at:
                settle_at = None
                gone = self.model.forget_lessons_before(reconnected_after)
                if gone:
                    logger.info("lessons that ended while the dashboard was away: %s", gone)
            previous_tick = time.monotonic()

    # -- pushes -------------------------------------------------------------------------

    def _broker_view(self) -> dict[str, Any]:
        stats = self.link.stats()
        return {
            "url": self.link.url,
            "connected": stats.connected,
            "ever_connected": stats.connects > 0,
            "since": round(self._broker_since, 3),
        }

    def _snapshot(self) -> dict[str, Any]:
        snapshot = self.model.snapshot()
        snapshot["type"] = "snapshot"
        snapshot["broker"] = self._broker_view()
        snapshot["push_interval_s"] = self.config.push_interval_s
        return snapshot

    async def _push_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.push_interval_s
        last = float("-inf")
        while True:
            await self._wake.wait()
            delay = last + interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # coalesce whatever else changes meanwhile
            self._wake.clear()
            last = loop.time()
            changes = self.model.take_changes()
            broker = self._broker_dirty
            self._broker_dirty = False
            if not self._clients:
                self._sent_lessons = {}
                continue
            if not (changes.rooms or changes.lessons or changes.sensing or broker):
                continue
            update: dict[str, Any] = {
                "type": "update",
                "generated_at": round(time.time(), 3),
                "counts": self.model.counts(),
                "rooms": self.model.rooms_view(changes.rooms),
            }
            if changes.lessons:
                changed, removed = self._lesson_changes()
                if changed or removed:
                    update["lessons"] = changed
                    update["lessons_removed"] = removed
            if changes.sensing:
                update["sensing"] = self.model.sensing_view()  # a short list: sent whole
            if broker:
                update["broker"] = self._broker_view()
            text = _dumps(update)
            self.pushes += 1
            for client in self._clients:
                if not client.offer(text):
                    self.resyncs += 1

    def _lesson_changes(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Lessons whose view differs from the last push, and groups gone since.

        Any member room's health touches its lesson; most of the time its view is the
        same, and a fleet's lessons list is too big to resend four times a second.
        """
        current = {view["group"]: view for view in self.model.lessons_view()}
        changed = [view for group, view in current.items() if self._sent_lessons.get(group) != view]
        removed = [group for group in self._sent_lessons if group not in current]
        self._sent_lessons = current
        return changed, removed

    async def _send_loop(self, client: _Client) -> None:
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                if client.resync:
                    client.resync = False
                    batch = [_dumps(self._snapshot())]
                else:
                    batch, client.backlog = client.backlog, []
                for text in batch:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await client.ws.send_str(text)
                    client.sent += 1
                    self.push_bytes += len(text)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            # A dead or stuck client: closing wakes its handler, which forgets it.
            self.clients_dropped += 1
            logger.info("dashboard: dropping client %s (%s)", client.remote, exc or "timeout")
            await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"too slow")

    # -- HTTP ---------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[guard(self._hosts, self.bad_requests)], client_max_size=64 * 1024
        )
        app.router.add_get("/", self._index)
        app.router.add_get("/api/fleet", self._fleet)
        app.router.add_get("/api/stats", self._stats)
        app.router.add_get("/api/ws", self._websocket)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        locales.add_routes(app)
        app.on_shutdown.append(self._close_clients)
        return app

    async def _index(self, request: web.Request) -> web.StreamResponse:
        # The texts travel inside the page (--language decides, or the browser).
        return locales.page_response(STATIC_DIR / "index.html", self.config.language)

    async def _fleet(self, request: web.Request) -> web.Response:
        snapshot = self._snapshot()
        snapshot["type"] = "fleet"
        return web.json_response(snapshot, dumps=_dumps)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            # Another site open in the same browser must not read the fleet through us.
            return web.Response(status=403, text="cross-origin WebSocket refused\n")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
        await ws.prepare(request)
        client = _Client(ws, request.remote)
        self._clients.add(client)
        client.resync = True  # the first message is the snapshot
        client.wake.set()
        sender = asyncio.create_task(self._send_loop(client), name="dashboard-ws-send")
        try:
            async for message in ws:  # the page sends nothing; this waits for the close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._clients.discard(client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await ws.close()
        return ws

    async def _close_clients(self, app: web.Application) -> None:
        for client in list(self._clients):
            await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dashboard stopping")


async def serve_dashboard(config: DashboardConfig, *, url_override: str | None = None) -> None:
    """Serve the dashboard until cancelled (the CLI's ``classroom-agent dashboard``)."""
    await DashboardServer(config, url_override=url_override).run()
