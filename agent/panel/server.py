"""The room's local web panel: the one button, the tiles, the kiosk and the watch page.

``GET /``                 the panel: Start/End lesson, the receiving rooms as live tiles
                          with their state and raised hands (main room); the lesson full
                          screen with a slate that says when it is waiting or
                          reconnecting (receiving room); mute camera / microphone
``GET /watch``            the lesson picture and sound for remote inspection
``GET /api/status``       what the panel shows, as JSON
``POST /api/lesson/start``  ``{"group"?, "subject"?}``  the one button
``POST /api/lesson/end``    ``{"group"?}``
``POST /api/controls``      ``{"camera_muted"?, "microphone_muted"?}``
``POST /api/hand``          ``{"up"}`` (receiving room)   ``/api/hand/lower`` ``{"room"}`` (main)
``POST /api/view``          ``{"source", "sdp"}``: a browser's WebRTC offer -> ``{"sdp"}``
``GET /report``             the lesson report page (``#lesson=ID``, ``#token=...``)
``GET /api/reports``        the room's lesson reports: one row each, newest first
``GET /api/reports/{lesson}``  one report: its data and its page (``?language=``)
``POST /api/reports/{lesson}/corrections``  ``{"student", "status"}``: the teacher sets a
                          student present, late or absent -> the corrected report

Who may call: anyone on this machine (the touch screen, ``classroom-agent lesson``);
from another host only with ``Authorization: Bearer <token>`` (the token file named by
``stream.watch_token_file``; the watch page reads it from its URL fragment, which
browsers never send to a server). POSTs must be JSON from the page's own origin, so a
web page elsewhere cannot press the button (no CORS is ever granted).

The lesson report holds students' names and attendance, so it is data, not a page: the
``/report`` page is only the frame (like ``/watch``), and its script asks
``/api/reports/...`` for the report under the rules above (the token from the page's URL
fragment when it is opened from another host). The server renders the report's HTML
(SVG charts, `agent.sensing.render_html`) and the page inserts it; its stylesheet is
``/report.css`` (the CSP allows no inline style). A signed short-lived link was the
other choice: it would put a bearer secret in a URL that browsers keep in history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import locales
from agent.capture import AudioHub
from agent.config import (
    DEVICE_ID_PATTERN,
    SLUG_PATTERN,
    AgentConfig,
    IdentityConfig,
    StreamConfig,
    UiConfig,
)
from agent.contracts import is_lesson_id
from agent.logs import RejectionLog
from agent.panel.viewers import FrameBoard, Picture, ViewerRefused, Viewers
from agent.sensing import (
    CORRECTABLE,
    REPORT_CSS,
    Correctable,
    CorrectionRefused,
    LessonReports,
    ReportNotFound,
    RosterError,
    effective_status,
    render_html,
)
from agent.stream import MAX_MESSAGE_BYTES, JoinState, LessonConflict, LessonHost, StreamService
from agent.web import expected_hosts, guard, is_loopback, request_logger, same_origin

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
RETRY_LISTEN_S = 30.0
TILE_WIDTH = 480  # tiles: small and 15 fps (several on one screen)
TILE_FPS = 15.0
KIOSK_WIDTH = 1280  # the lesson full screen: as the main room sends it
KIOSK_FPS = 30.0
JOIN_LABELS = {
    JoinState.WAITING: "Waiting for the lesson",
    JoinState.JOINING: "Joining the lesson...",
    JoinState.RECONNECTING: "Reconnecting...",
    JoinState.LIVE: "Reconnecting...",  # live but no picture for a while
}
ROOM_LABELS = {
    "joining": "Joining...",
    "reconnecting": "Reconnecting...",
    "gone": "Left the lesson",
    "live": "Reconnecting...",
}


class PanelError(RuntimeError):
    """A request the panel refuses; the text names the field and the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StartRequest(_Request):
    group: str | None = Field(default=None, max_length=64)
    subject: str = Field(default="", max_length=200)


class EndRequest(_Request):
    group: str | None = Field(default=None, max_length=64)


class ControlsRequest(_Request):
    camera_muted: bool | None = None
    microphone_muted: bool | None = None


class HandRequest(_Request):
    up: bool


class LowerHandRequest(_Request):
    room: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]


class ViewRequest(_Request):
    source: Annotated[str, Field(pattern=r"^(lesson|room:[a-z0-9][a-z0-9_.-]{0,130})$")]
    sdp: str = Field(min_length=10, max_length=MAX_MESSAGE_BYTES)
    type: Literal["offer"] = "offer"


class CorrectionRequest(_Request):
    student: Annotated[
        str,
        Field(
            pattern=SLUG_PATTERN,
            max_length=64,
            description="The student's pseudonymous id, one of the report's attendance rows",
        ),
    ]
    status: Correctable = Field(description="What the teacher saw: present, late or absent")


REPORT_CSS_URL = "/report.css"


def panel_url(bind: str, port: int) -> str:
    """The URL this machine reaches a panel bound to ``bind``:``port`` at."""
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def token_path(config: AgentConfig) -> Path:
    """Where the panel's token lives: ``stream.watch_token_file`` or the state dir."""
    return config.stream.watch_token_file or config.supervisor.state_dir / "panel-token"


def load_or_create_token(path: Path) -> str:
    """The panel's bearer token; created (0600) on first use so a fresh room is never
    open to the network."""
    try:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 16:
            return token
        log.warning("%s holds no usable token (under 16 characters): replacing it", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read the panel token %s (%s): creating a new one", path, exc)
    token = secrets.token_urlsafe(24)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        temporary.replace(path)
    except OSError as exc:
        # The panel still works on this machine; only remote viewers need the file.
        log.error(
            "cannot write the panel token %s (%s): the watch page works from this machine "
            "only until stream.watch_token_file names a writable file",
            path,
            exc.strerror or exc,
        )
    return token


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for issue in exc.errors():
        where = ".".join(str(p) for p in issue["loc"]) or "body"
        text = issue["msg"]
        if issue["type"] == "extra_forbidden":
            text = "unknown field; remove it"
        parts.append(f"{where}: {text}")
    return "; ".join(parts)


class PanelServer:
    """The panel as a supervisor service. A port already taken is logged (naming
    ``stream.panel_port``) and retried: the lesson itself never depends on the panel."""

    name = "panel"

    def __init__(
        self,
        stream: StreamService,
        config: StreamConfig,
        identity: IdentityConfig,
        *,
        token: str,
        board: FrameBoard | None = None,
        audio: AudioHub | None = None,
        ui: UiConfig | None = None,
        reports: LessonReports | None = None,
        corrected: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.stream = stream
        self.reports = reports
        # Told each corrected report (the composition sends its counts to the fleet).
        self.corrected = corrected
        self.ui = ui or UiConfig()
        self.config = config
        self.identity = identity
        self.board = board
        self.audio = audio
        self._token = token
        self.viewers = Viewers(tuple(config.ice_servers))
        self._hosts = expected_hosts(config.panel_bind)
        self.bad_requests = RejectionLog(log, "bad request to the panel")
        self._bound: tuple[str, int] | None = None
        self._ready = asyncio.Event()

    @property
    def url(self) -> str:
        host, port = self._bound or (self.config.panel_bind, self.config.panel_port)
        return panel_url(host, port)

    def watch_url(self) -> str:
        return f"{self.url}watch#token={self._token}"

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            logger=request_logger(self.bad_requests),
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        try:
            await self._listen(runner)
            what = "teacher panel" if self.stream.hosts else "lesson kiosk"
            log.info("%s at %s", what, self.url, extra={"fields": {"url": self.url}})
            self._ready.set()
            await asyncio.Future()
        finally:
            self._ready.clear()
            await self.viewers.close_all()
            await runner.cleanup()
            self._bound = None

    async def _listen(self, runner: web.AppRunner) -> None:
        while True:
            site = web.TCPSite(runner, self.config.panel_bind, self.config.panel_port)
            try:
                await site.start()
            except OSError as exc:
                log.error(
                    "teacher panel cannot listen on %s:%d (%s); set stream.panel_port to a "
                    "free port. Retrying in %.0f s; lessons still start over MQTT",
                    self.config.panel_bind,
                    self.config.panel_port,
                    exc.strerror or exc,
                    RETRY_LISTEN_S,
                )
                await asyncio.sleep(RETRY_LISTEN_S)
                continue
            address = runner.addresses[0]
            self._bound = (str(address[0]), int(address[1]))
            return

    # -- the app ------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[guard(self._hosts, self.bad_requests), self._authorise],
            client_max_size=128 * 1024,
        )
        app.router.add_get("/", self._page("panel.html"))
        app.router.add_get("/watch", self._page("watch.html"))
        app.router.add_get("/api/status", self._status)
        app.router.add_post("/api/lesson/start", self._json(StartRequest, self._start))
        app.router.add_post("/api/lesson/end", self._json(EndRequest, self._end))
        app.router.add_post("/api/controls", self._json(ControlsRequest, self._controls))
        app.router.add_post("/api/hand", self._json(HandRequest, self._hand))
        app.router.add_post("/api/hand/lower", self._json(LowerHandRequest, self._lower_hand))
        app.router.add_post("/api/view", self._json(ViewRequest, self._view))
        app.router.add_get("/report", self._page("report.html"))
        app.router.add_get(REPORT_CSS_URL, self._report_css)
        app.router.add_get("/api/reports", self._reports)
        app.router.add_get("/api/reports/{lesson}", self._report)
        app.router.add_post(
            "/api/reports/{lesson}/corrections", self._json(CorrectionRequest, self._correct)
        )
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        locales.add_routes(app)
        return app

    def _page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def page(request: web.Request) -> web.StreamResponse:
            # The texts travel inside the page (ui.language decides, or the browser).
            return locales.page_response(STATIC_DIR / name, self.ui.language)

        return page

    def _local(self, request: web.Request) -> bool:
        return is_loopback(request.remote or "")

    @web.middleware
    async def _authorise(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if not self._local(request):
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._token.encode()
            ):
                return _error(
                    "this panel answers other hosts only with its token "
                    "(Authorization: Bearer, see stream.watch_token_file)",
                    401,
                )
        if request.method == "POST":
            if not same_origin(request):
                return _error("cross-origin request refused", 403)
            if request.content_type != "application/json":
                return _error("send the request body as application/json", 415)
        return await handler(request)

    def _json(
        self,
        model: type[_Request],
        action: Callable[[Any, web.Request], Awaitable[dict[str, Any]]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body = await request.json()
            except ValueError:
                return _error("the body is not valid JSON")
            if not isinstance(body, dict):
                return _error("the body must be a JSON object")
            try:
                parsed = model.model_validate(body)
            except ValidationError as exc:
                return _error(_validation_message(exc))
            try:
                result = await action(parsed, request)
            except PanelError as exc:
                log.warning("panel request %s refused: %s", request.path, exc)
                return _error(str(exc), exc.status)
            except ViewerRefused as exc:
                log.warning("viewer refused: %s", exc)
                return _error(str(exc), exc.status)
            return web.json_response({"ok": True, **result})

        return handle

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the panel page and ``classroom-agent lesson status`` show."""
        hosting = []
        for group, host in self.stream.hosts.items():
            lesson = host.lesson
            rooms = {}
            if lesson is not None:
                rooms = {
                    room: dataclasses.asdict(state) for room, state in host.room_states().items()
                }
            hosting.append(
                {
                    "group": group,
                    "expected": list(host.expected),
                    "lesson": None if lesson is None else lesson.to_dict(),
                    "rooms": rooms,
                }
            )
        joining = None
        joiner = self.stream.joiner
        if joiner is not None:
            lesson = joiner.lesson
            session = joiner.session
            joining = {
                "groups": list(joiner.groups),
                "state": str(joiner.state),
                "since": joiner.since,
                "reason": joiner.reason,
                "lesson": None if lesson is None else lesson.to_dict(),
                "hand_up": joiner.hand_up,
                "peer": None if session is None else session.describe(),
            }
        return {
            "v": 1,
            "device": self.identity.device_id,
            "name": self.identity.display_name or self.identity.device_id,
            "controls": self.stream.controls.to_dict(),
            "hosting": hosting,
            "joining": joining,
            "viewers": self.viewers.count,
        }

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    # -- actions --------------------------------------------------------------------------

    def _host(self, group: str | None) -> LessonHost:
        try:
            return self.stream.host_for(group)
        except LookupError as exc:
            raise PanelError(str(exc), 409 if group is None else 404) from None

    async def _start(self, body: StartRequest, request: web.Request) -> dict[str, Any]:
        host = self._host(body.group)
        try:
            lesson = await host.start_lesson(body.subject)
        except LessonConflict as exc:
            raise PanelError(str(exc), 409) from None
        except Exception as exc:
            raise PanelError(f"could not start the lesson: {exc}", 503) from exc
        log.info("lesson start pressed on the panel", extra={"fields": {"group": host.group}})
        return {"lesson_id": lesson.lesson_id, "group": lesson.group}

    async def _end(self, body: EndRequest, request: web.Request) -> dict[str, Any]:
        host = self._host(body.group)
        await host.end_lesson()
        return {"group": host.group}

    async def _controls(self, body: ControlsRequest, request: web.Request) -> dict[str, Any]:
        self.stream.controls.set(
            camera_muted=body.camera_muted, microphone_muted=body.microphone_muted
        )
        log.info("media controls: %s", self.stream.controls.to_dict())
        return {"controls": self.stream.controls.to_dict()}

    async def _hand(self, body: HandRequest, request: web.Request) -> dict[str, Any]:
        joiner = self.stream.joiner
        if joiner is None:
            raise PanelError("only a receiving room raises its hand", 409)
        if joiner.lesson is None:
            raise PanelError("no lesson is live for this room", 409)
        await joiner.set_hand(body.up)
        return {"hand_up": joiner.hand_up}

    async def _lower_hand(self, body: LowerHandRequest, request: web.Request) -> dict[str, Any]:
        for host in self.stream.hosts.values():
            if body.room in host.expected:
                host.lower_hand(body.room)
                return {"room": body.room}
        raise PanelError(f"room: {body.room} is not a receiving room of this room's groups", 404)

    async def _view(self, body: ViewRequest, request: web.Request) -> dict[str, Any]:
        picture = self._picture(body.source)
        host_addresses = (
            ("127.0.0.1",) if self._local(request) else tuple(self.config.ice_host_addresses)
        )
        sdp = await self.viewers.answer(body.sdp, picture, host_addresses)
        return {"sdp": sdp, "type": "answer"}

    def _picture(self, source: str) -> Picture:
        if source == "lesson":
            if self.stream.hosts and self.stream.encoder is not None:
                return Picture(encoder=self.stream.encoder, audio=self.audio)
            joiner = self.stream.joiner
            if joiner is None or self.board is None:
                raise PanelError("source: this room has no lesson picture to show", 404)

            def main_room() -> str | None:
                lesson = joiner.lesson
                return None if lesson is None else lesson.main

            def label() -> str:
                reason = joiner.reason
                if joiner.state is JoinState.WAITING and reason:
                    return str(reason)[:60]
                return JOIN_LABELS.get(joiner.state, "Waiting for the lesson")

            return Picture(
                board=self.board,
                source=main_room,
                label=label,
                max_width=KIOSK_WIDTH,
                fps=KIOSK_FPS,
            )
        room = source.removeprefix("room:")
        hosts = [h for h in self.stream.hosts.values() if room in h.expected]
        if not hosts or self.board is None:
            raise PanelError(f"source: {room} is not a receiving room of this room's groups", 404)
        host = hosts[0]

        def room_source() -> str | None:
            return room if host.lesson is not None else None

        def room_label() -> str:
            if host.lesson is None:
                return "No lesson"
            state = host.room_states().get(room)
            return ROOM_LABELS.get("joining" if state is None else state.state, "Joining...")

        return Picture(
            board=self.board,
            source=room_source,
            label=room_label,
            max_width=TILE_WIDTH,
            fps=TILE_FPS,
        )

    # -- lesson reports -------------------------------------------------------------------

    async def _report_css(self, request: web.Request) -> web.Response:
        return web.Response(text=REPORT_CSS, content_type="text/css")

    def _report_shelf(self) -> LessonReports:
        if self.reports is None:
            raise PanelError("this panel keeps no lesson reports (no sensing store)", 404)
        return self.reports

    def _report_language(self, request: web.Request) -> locales.Language:
        """The room's ``ui.language``; with ``auto``, the page's (``?language=``, which
        the page's lookup chose from the browser), Chinese when it names none."""
        if self.ui.language != "auto":
            return self.ui.language
        asked = request.query.get("language", "zh-CN")
        for language in locales.LANGUAGES:
            if asked == language:
                return language
        raise PanelError(f"language: {asked[:20]!r} is not one of {', '.join(locales.LANGUAGES)}")

    async def _reports(self, request: web.Request) -> web.Response:
        # No store, or none yet: an empty list (the panel then shows no report link).
        try:
            rows = [] if self.reports is None else await asyncio.to_thread(self.reports.rows)
        except (RosterError, OSError) as exc:
            log.error("lesson reports cannot be listed: %s", exc)
            return _error(f"the lesson reports cannot be opened: {exc}", 503)
        return web.json_response({"ok": True, "reports": rows})

    @staticmethod
    def _lesson(request: web.Request) -> str:
        lesson = request.match_info["lesson"]
        if not is_lesson_id(lesson):
            raise PanelError(
                f"lesson: {lesson[:80]!r} is not a lesson id (1-64 letters, digits, - and _; "
                "GET /api/reports lists them)"
            )
        return lesson

    async def _report(self, request: web.Request) -> web.Response:
        try:
            lesson = self._lesson(request)
            shelf = self._report_shelf()
            language = self._report_language(request)

            def view() -> dict[str, Any]:
                return _report_view(*shelf.read(lesson), language)

            return web.json_response({"ok": True, **await self._report_call(view)})
        except PanelError as exc:
            return _error(str(exc), exc.status)

    async def _correct(self, body: CorrectionRequest, request: web.Request) -> dict[str, Any]:
        lesson = self._lesson(request)
        shelf = self._report_shelf()
        language = self._report_language(request)
        by = "loopback" if self._local(request) else "panel-token"
        source = request.remote or "unknown"

        def corrected() -> dict[str, Any]:
            report, names = shelf.correct(
                lesson, body.student, body.status, at=time.time(), by=by, source=source
            )
            return _report_view(report, names, language)

        view = await self._report_call(corrected)
        if self.corrected is not None:
            try:
                await self.corrected(view["report"])
            except Exception as exc:  # the correction itself is saved: it must not fail
                log.error(
                    "lesson %s: corrected counts not sent to the fleet: %s",
                    lesson,
                    exc,
                    extra={"fields": {"lesson": lesson, "error": str(exc)}},
                )
        return view

    async def _report_call(self, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a report's file work (decrypting, sealing, rendering) off the event loop;
        its failures as PanelErrors that say what to do."""
        try:
            return await asyncio.to_thread(work)
        except ReportNotFound as exc:
            raise PanelError(str(exc), 404) from None
        except CorrectionRefused as exc:
            raise PanelError(str(exc), 400) from None
        except (RosterError, OSError) as exc:
            log.error("lesson report unusable: %s", exc)
            raise PanelError(f"the lesson report cannot be opened: {exc}", 503) from None


def _report_view(
    report: dict[str, Any], names: dict[str, str], language: locales.Language
) -> dict[str, Any]:
    """What the report page shows: the page's HTML, each student's status now (for the
    correction menus) and the report's data."""
    students = report["attendance"]["students"]
    return {
        "lesson": report["lesson"],
        "language": language,
        "html": render_html(report, names, language, css=REPORT_CSS_URL),
        "statuses": {student: effective_status(report, student)[0] for student in students},
        "correctable": list(CORRECTABLE),
        "report": report,
    }
