"""Live dual-teacher lessons: the main room hosts, the group's receiving rooms join.

The main room's :class:`LessonHost` publishes a retained announcement on
``{prefix}/lesson/{group}`` (``docs/contracts.md``) when the teacher starts a lesson and
answers the offers of the group's receiving rooms; every room gets the same
encode-once video and its own Opus audio, and sends its own camera and microphone back.
Ending the lesson clears the announcement (empty retained payload) and says ``bye``.

A receiving room's :class:`LessonJoiner` needs nobody: it watches its groups'
announcements, offers to the main room as soon as a lesson naming it is live, and keeps
trying (capped, jittered backoff) while the lesson stays announced: a failed
connection, a ``bye`` or media that stops for ``media_timeout_s`` starts a fresh
session. Its :attr:`LessonJoiner.state` is what the room's screen shows: ``waiting``
for a lesson, ``joining``, ``live``, ``reconnecting``.

Both are supervisor services; cancelling ``run()`` closes every peer connection (the
host also ends its lesson). Neither trusts the network: announcements and signalling
are validated, and a bad message is logged and dropped without touching the lesson.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from agent.backoff import backoff_delay
from agent.capture import AudioHub
from agent.stream.encoder import SharedH264Encoder
from agent.stream.peer import IceSettings, PeerSession, wait_first
from agent.stream.signalling import (
    LessonInbox,
    Signal,
    Signalling,
    SignalType,
    is_device_id,
    is_lesson_id,
)
from agent.stream.sinks import MediaSink
from agent.sync import LinkError, MqttLink

log = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES = 16 * 1024
BYE_TIMEOUT_S = 2.0
CLEAR_TIMEOUT_S = 5.0
START_WAIT_S = 5.0


class AnnouncementInvalid(ValueError):
    """A lesson announcement that fails validation (the text says why)."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """The retained ``{prefix}/lesson/{group}`` payload (contracts v1)."""

    lesson_id: str
    group: str
    main: str
    expected: tuple[str, ...]
    subject: str = ""
    joined: tuple[str, ...] = ()
    started_at: float = field(default_factory=time.time)
    state: str = "live"

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "lesson_id": self.lesson_id,
            "group": self.group,
            "subject": self.subject,
            "main": self.main,
            "expected": list(self.expected),
            "joined": list(self.joined),
            "started_at": round(self.started_at, 3),
            "state": self.state,
        }

    @classmethod
    def parse(cls, group: str, payload: bytes) -> Announcement | None:
        """The announcement, None for an empty payload (lesson ended), or
        `AnnouncementInvalid`."""
        if not payload:
            return None
        if len(payload) > MAX_ANNOUNCEMENT_BYTES:
            raise AnnouncementInvalid(f"{len(payload)} bytes, more than {MAX_ANNOUNCEMENT_BYTES}")
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AnnouncementInvalid("not UTF-8 JSON") from None
        if not isinstance(data, dict) or data.get("v") != 1:
            raise AnnouncementInvalid("not a version 1 announcement object")

        def text(name: str, default: str | None = None) -> str:
            value = data.get(name, default)
            if not isinstance(value, str):
                raise AnnouncementInvalid(f"{name} must be a string")
            return value

        def devices(name: str) -> tuple[str, ...]:
            value = data.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(v, str) and is_device_id(v) for v in value
            ):
                raise AnnouncementInvalid(f"{name} must be a list of device ids")
            return tuple(value)

        lesson_id, main = text("lesson_id"), text("main")
        if not is_lesson_id(lesson_id):
            raise AnnouncementInvalid("lesson_id is malformed")
        if not is_device_id(main):
            raise AnnouncementInvalid("main is not a device id")
        if text("group") != group:
            raise AnnouncementInvalid(f"group {data.get('group')!r} is not the topic's {group!r}")
        started = data.get("started_at", 0.0)
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise AnnouncementInvalid("started_at must be a number")
        return cls(
            lesson_id=lesson_id,
            group=group,
            main=main,
            expected=devices("expected"),
            subject=text("subject", "")[:200],
            joined=devices("joined"),
            started_at=float(started),
            state=text("state"),
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def new_lesson_id() -> str:
    return uuid.uuid4().hex[:16]


# -- the main room ------------------------------------------------------------------------


class LessonHost:
    """The main room's side of one group's lessons (a supervisor service).

    :meth:`start_lesson` / :meth:`end_lesson` are the one button; they need ``run()``
    to be running. Offers are accepted only from ``expected`` (the group's receiving
    rooms) and only for the current lesson; a room that offers again (it reconnected)
    replaces its previous connection.
    """

    def __init__(
        self,
        link: MqttLink,
        signalling: Signalling,
        group: str,
        expected: Sequence[str],
        *,
        encoder: SharedH264Encoder | None,
        audio: AudioHub | None,
        ice: IceSettings | None = None,
        sink: MediaSink | None = None,
        connect_timeout_s: float = 15.0,
    ) -> None:
        self.name = f"stream.lesson.{group}"
        self.link = link
        self.signalling = signalling
        self.group = group
        self.me = link.identity.device_id
        self.expected = tuple(dict.fromkeys(d for d in expected if d != self.me))
        for device in self.expected:
            if not is_device_id(device):
                raise ValueError(f"expected room {device!r} is not a device id (site.room)")
        self.topic = link.topics.lesson(group)
        self.encoder = encoder
        self.audio = audio
        self.ice = ice or IceSettings()
        self.sink = sink
        self.connect_timeout_s = connect_timeout_s
        self._lesson: Announcement | None = None
        self._serving: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._button = asyncio.Lock()
        self._started: set[str] = set()  # lessons this run announced (never "stale")
        self._finished: set[str] = set()
        self._sessions: dict[str, PeerSession] = {}
        self._peer_tasks: dict[str, asyncio.Task[None]] = {}
        self._joined: list[str] = []

    @property
    def lesson(self) -> Announcement | None:
        return self._lesson

    @property
    def joined(self) -> tuple[str, ...]:
        return tuple(self._joined)

    def sessions(self) -> dict[str, PeerSession]:
        return dict(self._sessions)

    async def run(self) -> None:
        self._running.set()
        try:
            await self._clear_stale()
            await asyncio.Future()  # start/end come from outside; run() owns the lesson
        finally:
            self._running.clear()
            serving = self._serving
            if serving is not None:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    async def _clear_stale(self) -> None:
        """Clear an announcement a previous run of this room left behind (a crash)."""
        await self.link.wait_connected()
        async with self.link.subscribe(self.topic, qos=1) as messages:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    message = await messages.get()
                    try:
                        old = Announcement.parse(self.group, message.payload)
                    except AnnouncementInvalid:
                        old = None
                    if (
                        message.retain
                        and old is not None
                        and old.main == self.me
                        and old.lesson_id not in self._started
                    ):
                        log.warning(
                            "clearing lesson %s left announced by a previous run", old.lesson_id
                        )
                        with contextlib.suppress(LinkError):
                            await self.link.publish(self.topic, b"", qos=1, retain=True)

    async def start_lesson(self, subject: str = "") -> Announcement:
        """Announce a new lesson (or return the live one). Raises the link's errors."""
        try:
            async with asyncio.timeout(START_WAIT_S):
                await self._running.wait()  # a button pressed while the agent starts up
        except TimeoutError:
            raise RuntimeError(f"{self.name} is not running") from None
        async with self._button:  # a double press must not announce two lessons
            return await self._start(subject)

    async def _start(self, subject: str) -> Announcement:
        if self._lesson is not None:
            return self._lesson
        lesson = Announcement(
            lesson_id=new_lesson_id(),
            group=self.group,
            main=self.me,
            expected=self.expected,
            subject=subject[:200],
        )
        inbox = self.signalling.open(lesson.lesson_id, self.expected)
        self._started.add(lesson.lesson_id)
        try:
            await self.link.publish(self.topic, lesson.to_dict(), qos=1, retain=True)
        except BaseException:
            inbox.close()
            raise
        self._lesson = lesson
        self._joined = []
        log.info(
            "lesson %s of group %s started, expecting %s",
            lesson.lesson_id,
            self.group,
            ", ".join(self.expected) or "nobody",
            extra={"fields": {"lesson": lesson.lesson_id, "group": self.group}},
        )
        self._serving = asyncio.create_task(
            self._serve(lesson, inbox), name=f"stream-host-{self.group}"
        )
        return lesson

    async def end_lesson(self) -> None:
        """End the live lesson: clear the announcement, say bye, close every peer."""
        async with self._button:
            lesson, serving = self._lesson, self._serving
            if lesson is None or serving is None:
                return
            await self._finish(lesson)
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    async def _serve(self, lesson: Announcement, inbox: LessonInbox) -> None:
        try:
            while True:
                signal = await inbox.get()
                if signal.type is SignalType.OFFER:
                    await self._replace_peer(signal.sender)
                    self._peer_tasks[signal.sender] = asyncio.create_task(
                        self._host_peer(lesson, signal), name=f"stream-peer-{signal.sender}"
                    )
                elif signal.type is SignalType.BYE:
                    log.info("%s left lesson %s", signal.sender, lesson.lesson_id)
                    await self._replace_peer(signal.sender)
                else:
                    log.warning("unexpected %s from %s ignored", signal.type, signal.sender)
        finally:
            inbox.close()
            await self._finish(lesson)
            tasks = list(self._peer_tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._peer_tasks.clear()
            self._lesson = None
            self._serving = None
            self._joined = []
            log.info("lesson %s of group %s ended", lesson.lesson_id, self.group)

    async def _replace_peer(self, room: str) -> None:
        task = self._peer_tasks.pop(room, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _finish(self, lesson: Announcement) -> None:
        """Clear the announcement, then say bye: rooms see 'ended', not 'failed'."""
        if lesson.lesson_id in self._finished:
            return
        self._finished.add(lesson.lesson_id)
        try:
            async with asyncio.timeout(CLEAR_TIMEOUT_S):
                await self.link.publish(self.topic, b"", qos=1, retain=True)
        except (LinkError, TimeoutError) as exc:
            log.error(
                "could not clear the announcement of lesson %s (%s): rooms keep trying "
                "until this room's next start clears it",
                lesson.lesson_id,
                exc,
            )
        rooms = list(self._sessions)

        async def bye(room: str) -> None:
            with contextlib.suppress(LinkError, TimeoutError):
                async with asyncio.timeout(BYE_TIMEOUT_S):
                    await self.signalling.send(room, lesson.lesson_id, SignalType.BYE)

        await asyncio.gather(*(bye(room) for room in rooms))

    async def _announce(self, lesson: Announcement) -> None:
        if self._lesson is not lesson or lesson.lesson_id in self._finished:
            return
        update = replace(lesson, joined=tuple(self._joined))
        with contextlib.suppress(LinkError):
            await self.link.publish(self.topic, update.to_dict(), qos=1, retain=True)

    async def _host_peer(self, lesson: Announcement, offer: Signal) -> None:
        room = offer.sender
        session = PeerSession(room, lesson.lesson_id, self.ice, self.sink)
        self._sessions[room] = session
        try:
            answer = await session.make_answer(offer.sdp or "", self.encoder, self.audio)
            await self.signalling.send(room, lesson.lesson_id, SignalType.ANSWER, answer)
            if not await session.wait_connected(self.connect_timeout_s):
                log.warning(
                    "%s did not connect to lesson %s: %s",
                    room,
                    lesson.lesson_id,
                    session.end_reason or "timed out",
                )
                return
            log.info("%s joined lesson %s", room, lesson.lesson_id)
            self._joined.append(room)
            await self._announce(lesson)
            await session.ended.wait()
            log.info("%s dropped out of lesson %s: %s", room, lesson.lesson_id, session.end_reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad offer or a failed send ends this peer only
            log.warning(
                "offer from %s for lesson %s failed: %s", room, lesson.lesson_id, _describe(exc)
            )
        finally:
            # Book-keeping first: it must hold even if this task is cancelled again.
            if self._sessions.get(room) is session:
                del self._sessions[room]
            left = room in self._joined
            if left:
                self._joined.remove(room)
            await session.close()
            if left:
                await self._announce(lesson)

    def stats(self) -> dict[str, Any]:
        lesson = self._lesson
        return {
            "lesson": None if lesson is None else lesson.lesson_id,
            "role": "main",
            "group": self.group,
            "peers": {room: s.describe() for room, s in self._sessions.items()},
        }


# -- a receiving room ---------------------------------------------------------------------


class JoinState(StrEnum):
    WAITING = "waiting"  # no lesson for this room is announced
    JOINING = "joining"  # first attempt at the announced lesson
    LIVE = "live"
    RECONNECTING = "reconnecting"  # lost it while it is still announced; retrying


StateListener = Callable[[JoinState, Announcement | None], None]


class LessonJoiner:
    """A receiving room: joins its groups' lessons by itself (a supervisor service)."""

    name = "stream.lesson.join"

    def __init__(
        self,
        link: MqttLink,
        signalling: Signalling,
        groups: Sequence[str],
        *,
        encoder: SharedH264Encoder | None,
        audio: AudioHub | None,
        ice: IceSettings | None = None,
        sink: MediaSink | None = None,
        answer_timeout_s: float = 10.0,
        connect_timeout_s: float = 15.0,
        media_timeout_s: float = 6.0,
        retry_min_s: float = 0.5,
        retry_max_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.link = link
        self.signalling = signalling
        self.groups = tuple(dict.fromkeys(groups))
        self.me = link.identity.device_id
        self.encoder = encoder
        self.audio = audio
        self.ice = ice or IceSettings()
        self.sink = sink
        self.answer_timeout_s = answer_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.media_timeout_s = media_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._rng = rng or random.Random()
        self._announced: dict[str, Announcement] = {}
        self._chosen: Announcement | None = None
        self._choice_changed = asyncio.Event()
        self._state = JoinState.WAITING
        self._session: PeerSession | None = None
        self._listeners: list[StateListener] = []
        self.sessions_started = 0
        self.since = time.time()

    # -- what the room's screen shows ---------------------------------------------------

    @property
    def state(self) -> JoinState:
        return self._state

    @property
    def lesson(self) -> Announcement | None:
        return self._chosen

    @property
    def session(self) -> PeerSession | None:
        return self._session

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: JoinState) -> None:
        if state is self._state:
            return
        self._state = state
        self.since = time.time()
        lesson = self._chosen
        log.info(
            "lesson: %s%s",
            state,
            "" if lesson is None else f" (lesson {lesson.lesson_id} from {lesson.main})",
            extra={"fields": {"state": str(state), "lesson": lesson and lesson.lesson_id}},
        )
        for listener in list(self._listeners):
            try:
                listener(state, lesson)
            except Exception:
                log.exception("lesson state listener failed")

    # -- announcements ------------------------------------------------------------------

    async def _watch(self, group: str) -> None:
        async with self.link.subscribe(self.link.topics.lesson(group), qos=1) as messages:
            async for message in messages:
                try:
                    lesson = Announcement.parse(group, message.payload)
                except AnnouncementInvalid as exc:
                    log.warning("ignored an invalid announcement for group %s: %s", group, exc)
                    continue
                if lesson is not None and self.me not in lesson.expected:
                    log.info(
                        "lesson %s of group %s does not expect this room", lesson.lesson_id, group
                    )
                    lesson = None
                if lesson is not None and (lesson.main == self.me or lesson.state != "live"):
                    lesson = None
                if lesson is None:
                    self._announced.pop(group, None)
                else:
                    self._announced[group] = lesson
                self._choose()

    def _choose(self) -> None:
        chosen = next((self._announced[g] for g in self.groups if g in self._announced), None)
        previous = self._chosen
        self._chosen = chosen
        same = (
            previous is not None and chosen is not None and previous.lesson_id == chosen.lesson_id
        )
        if not same and (previous is not None or chosen is not None):
            self._choice_changed.set()
            session = self._session
            if session is not None:
                session.end("lesson ended" if chosen is None else "another lesson started")

    def _still(self, lesson: Announcement) -> bool:
        chosen = self._chosen
        return chosen is not None and chosen.lesson_id == lesson.lesson_id

    # -- the service ----------------------------------------------------------------------

    async def run(self) -> None:
        # A restart (supervisor) starts from what the broker says now, not from before.
        self._announced.clear()
        self._chosen = None
        try:
            async with asyncio.TaskGroup() as tasks:
                for group in self.groups:
                    tasks.create_task(self._watch(group), name=f"stream-watch-{group}")
                tasks.create_task(self._attend_forever(), name="stream-attend")
        finally:
            self._set_state(JoinState.WAITING)

    async def _attend_forever(self) -> None:
        while True:
            self._choice_changed.clear()
            lesson = self._chosen
            if lesson is None:
                self._set_state(JoinState.WAITING)
                await self._choice_changed.wait()
                continue
            await self._attend(lesson)

    async def _attend(self, lesson: Announcement) -> None:
        attempt = 0
        while self._still(lesson):
            lesson = self._chosen or lesson
            self._set_state(JoinState.JOINING if attempt == 0 else JoinState.RECONNECTING)
            reason, was_live = await self._one_session(lesson)
            if not self._still(lesson):
                return
            if was_live:
                attempt = 0
            delay = backoff_delay(attempt, self.retry_min_s, self.retry_max_s, self._rng)
            attempt += 1
            log.warning("lesson %s: %s; reconnecting in %.1f s", lesson.lesson_id, reason, delay)
            self._set_state(JoinState.RECONNECTING)
            self._choice_changed.clear()
            await wait_first(self._choice_changed, timeout=delay)

    async def _one_session(self, lesson: Announcement) -> tuple[str, bool]:
        """One offer/answer/connection with the main room; returns (why it ended, was it
        live)."""
        main = lesson.main
        session = PeerSession(main, lesson.lesson_id, self.ice, self.sink)
        self._session = session
        self.sessions_started += 1
        was_live = False
        say_bye = True
        inbox = self.signalling.open(lesson.lesson_id, {main})
        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(self.answer_timeout_s):
                await self.signalling.wait_ready()
            offer = await session.make_offer(self.encoder, self.audio)
            await self.signalling.send(main, lesson.lesson_id, SignalType.OFFER, offer)
            answer = await self._answer(inbox, session)
            if answer is None:
                say_bye = session.end_reason != "bye from the main room"
                return session.end_reason or "no answer", False
            await session.accept_answer(answer)
            reader = asyncio.create_task(self._read(inbox, session), name="stream-join-inbox")
            if not await session.wait_connected(self.connect_timeout_s):
                session.end(session.end_reason or "connection timed out")
                return session.end_reason, False
            was_live = True
            self._set_state(JoinState.LIVE)
            await self._watch_media(session)
            say_bye = session.end_reason not in ("bye from the main room", "lesson ended")
            return session.end_reason, True
        except TimeoutError:
            return f"no answer from {main} within {self.answer_timeout_s:g} s", was_live
        except LinkError as exc:
            return f"signalling failed: {exc}", was_live
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # aiortc refusing the answer, and the like
            return f"session failed: {_describe(exc)}", was_live
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            inbox.close()
            if say_bye and self._still(lesson):
                with contextlib.suppress(LinkError, TimeoutError):
                    async with asyncio.timeout(BYE_TIMEOUT_S):
                        await self.signalling.send(main, lesson.lesson_id, SignalType.BYE)
            self._session = None
            await session.close()

    async def _answer(self, inbox: LessonInbox, session: PeerSession) -> str | None:
        async with asyncio.timeout(self.answer_timeout_s):
            while True:
                getter = asyncio.ensure_future(inbox.get())
                ended = asyncio.ensure_future(session.ended.wait())
                try:
                    await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for future in (getter, ended):
                        future.cancel()
                    await asyncio.gather(getter, ended, return_exceptions=True)
                if session.ended.is_set():
                    return None
                if getter.cancelled() or getter.exception() is not None:
                    continue
                signal = getter.result()
                if signal.type is SignalType.ANSWER:
                    return signal.sdp
                if signal.type is SignalType.BYE:
                    session.end("bye from the main room")
                    return None

    async def _read(self, inbox: LessonInbox, session: PeerSession) -> None:
        while True:
            signal = await inbox.get()
            if signal.type is SignalType.BYE:
                session.end("bye from the main room")
                return
            log.debug("ignored %s from %s while connected", signal.type, signal.sender)

    async def _watch_media(self, session: PeerSession) -> None:
        """Until the session ends; ends it when no media has arrived for a while (a main
        room that vanished without a bye takes ICE 30 s to notice)."""
        while not session.ended.is_set():
            await wait_first(session.ended, timeout=1.0)
            now = time.monotonic()
            last = session.last_media or session.connected_at or now
            if now - last > self.media_timeout_s:
                session.end(f"no media for {self.media_timeout_s:g} s")

    def stats(self) -> dict[str, Any]:
        lesson = self._chosen
        session = self._session
        return {
            "lesson": None if lesson is None else lesson.lesson_id,
            "role": "receiving",
            "state": str(self._state),
            "peers": {} if session is None else {session.remote: session.describe()},
        }
