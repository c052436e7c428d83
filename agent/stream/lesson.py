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
session. Its :attr:`LessonJoiner.state` (and :attr:`LessonJoiner.reason`) is what the
room's screen shows: ``waiting`` for a lesson (or for a main room that is offline: its
Last Will is watched, a crashed main room's announcement outlives it), ``joining``,
``live``, ``reconnecting``. Every offer carries a fresh attempt id, so a late answer or
bye of an earlier attempt is ignored on both sides. The host's
:meth:`LessonHost.room_states` (joining / live / reconnecting / gone, raised hands) is
what the teacher's panel shows.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from typing import Any, Literal

from agent.backoff import backoff_delay
from agent.capture import AudioHub
from agent.stream.controls import MediaControls
from agent.stream.encoder import SharedH264Encoder
from agent.stream.peer import IceSettings, PeerSession, wait_first
from agent.stream.signalling import (
    LessonInbox,
    RejectionLog,
    Signal,
    Signalling,
    SignalType,
    is_device_id,
    is_lesson_id,
    new_attempt_id,
)
from agent.stream.sinks import MediaSink
from agent.sync import LinkDown, LinkError, MqttLink, Topics

log = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES = 16 * 1024
BYE_TIMEOUT_S = 2.0
CLEAR_TIMEOUT_S = 5.0
START_WAIT_S = 5.0
GONE_AFTER_S = 20.0  # a room dropped this long ago is "gone", not "reconnecting"
MAIN_STATE_WAIT_S = 1.0  # how long a joiner waits for the main room's retained state


class LessonConflict(RuntimeError):
    """Another main room already runs a lesson in this group (the text names it)."""


def _precedes(a: Announcement, b: Announcement) -> bool:
    """Which of two live lessons of one group stands: the earlier start, then the lower
    device id. Both main rooms and every receiving room apply the same rule, so a
    misconfigured second main room never splits a group."""
    return (a.started_at, a.main) < (b.started_at, b.main)


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


# -- presence: the retained birth / Last Will of another room ------------------------------


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


async def _watch_presence(
    link: MqttLink, presence: Presence, on_change: Callable[[], None]
) -> None:
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


async def _first(*waitables: Awaitable[Any], timeout: float | None = None) -> None:  # noqa: ASYNC109
    """Until the first of ``waitables`` finishes (or ``timeout``), leaving no task behind."""
    futures = [asyncio.ensure_future(w) for w in waitables]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)


# -- the main room ------------------------------------------------------------------------

RoomState = Literal["joining", "live", "reconnecting", "gone"]


@dataclass(frozen=True, slots=True)
class RoomStatus:
    """One expected room of the live lesson, as the teacher's panel shows it.

    ``state``: ``joining`` (expected, never connected in this lesson), ``live``,
    ``reconnecting`` (was live and dropped less than ``gone_after_s`` ago, or offered
    again), ``gone`` (dropped longer ago, or its device went offline). ``since``: wall
    time of the last change. ``figures``: its peer's ``PeerSession.describe()``.
    """

    state: RoomState
    since: float
    hand_up: bool
    figures: dict[str, Any] | None
    name: str | None = None  # the room's display name, once its state topic said it


@dataclass(slots=True)
class _Room:
    state: RoomState
    since: float
    ever_live: bool = False
    dropped_at: float | None = None  # monotonic, while reconnecting
    hand_up: bool = False
    attempt: str | None = None  # of the current session

    def move(self, state: RoomState, since: float | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time() if since is None else since


class LessonHost:
    """The main room's side of one group's lessons (a supervisor service).

    :meth:`start_lesson` / :meth:`end_lesson` are the one button; they need ``run()``
    to be running. Offers are accepted only from ``expected`` (the group's receiving
    rooms) and only for the current lesson; a room that offers again (it reconnected)
    replaces its previous connection, and a ``bye`` naming an earlier attempt ends
    nothing. :meth:`room_states` is what the panel's tiles show; the host watches each
    expected room's retained state so a room whose agent died shows ``gone`` at once.
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
        gone_after_s: float = GONE_AFTER_S,
        controls: MediaControls | None = None,
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
        self.gone_after_s = gone_after_s
        self.controls = controls
        self._lesson: Announcement | None = None
        self._serving: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._button = asyncio.Lock()
        self._started: set[str] = set()  # lessons this run announced (never "stale")
        self._finished: set[str] = set()
        self._sessions: dict[str, PeerSession] = {}
        self._peer_tasks: dict[str, asyncio.Task[None]] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._joined: list[str] = []
        self._rooms: dict[str, _Room] = {}
        self.stale_byes = 0
        self._presences: dict[str, Presence] = {}  # the expected rooms' online state
        self._rival: Announcement | None = None  # a live lesson of another main room
        self.rivals = RejectionLog(log, "second main room")

    @property
    def lesson(self) -> Announcement | None:
        return self._lesson

    @property
    def joined(self) -> tuple[str, ...]:
        return tuple(self._joined)

    @property
    def rival(self) -> Announcement | None:
        """A live lesson another main room announced in this group (misconfiguration)."""
        return self._rival

    def sessions(self) -> dict[str, PeerSession]:
        return dict(self._sessions)

    # -- what the teacher's panel shows ---------------------------------------------------

    def room_states(self) -> dict[str, RoomStatus]:
        """Every expected room of the live lesson (empty without one)."""
        if self._lesson is None:
            return {}
        now = time.monotonic()
        states: dict[str, RoomStatus] = {}
        for device in self.expected:
            room = self._rooms.get(device)
            if room is None:
                continue
            if (
                room.state == "reconnecting"
                and room.dropped_at is not None
                and now - room.dropped_at >= self.gone_after_s
            ):
                self._gone(device, room, time.time() - (now - room.dropped_at - self.gone_after_s))
            session = self._sessions.get(device)
            presence = self._presences.get(device)
            states[device] = RoomStatus(
                state=room.state,
                since=room.since,
                hand_up=room.hand_up,
                figures=None if session is None else session.describe(),
                name=None if presence is None else presence.display_name,
            )
        return states

    def lower_hand(self, room: str) -> None:
        """The teacher lowers a room's hand; the room hears it (best effort)."""
        lesson, track = self._lesson, self._rooms.get(room)
        if lesson is None or track is None or not track.hand_up:
            return
        track.hand_up = False
        log.info("hand of %s lowered by the teacher", room)

        async def tell() -> None:
            with contextlib.suppress(LinkError, TimeoutError):
                async with asyncio.timeout(BYE_TIMEOUT_S):
                    await self.signalling.send(room, lesson.lesson_id, SignalType.HAND, up=False)

        task = asyncio.create_task(tell(), name=f"stream-hand-{room}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _gone(self, device: str, room: _Room, since: float | None = None) -> None:
        room.move("gone", since)
        room.dropped_at = None
        if room.hand_up:
            room.hand_up = False
            log.info("hand of %s lowered: the room left", device)

    # -- the service ----------------------------------------------------------------------

    async def run(self) -> None:
        self._running.set()
        try:
            await self._clear_stale()
            # start/end come from outside; run() owns the lesson and guards its topic.
            await self._guard_topic()
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

    async def _guard_topic(self) -> None:
        """Keep the group's announcement ours while our lesson is live: a second main
        room's announcement (a misconfigured group) is refused and ours restored, unless
        its lesson started first (:func:`_precedes`), in which case ours yields; an
        announcement cleared by someone else is restored."""
        async with self.link.subscribe(self.topic, qos=1) as messages:
            async for message in messages:
                try:
                    seen = Announcement.parse(self.group, message.payload)
                except AnnouncementInvalid:
                    continue
                ours = self._lesson
                if seen is not None and seen.main == self.me:
                    continue  # our own announcement coming back
                self._rival = seen if seen is not None and seen.state == "live" else None
                if ours is None or ours.lesson_id in self._finished:
                    continue
                rival = self._rival
                if rival is None:
                    log.warning(
                        "the announcement of lesson %s was cleared: restoring it", ours.lesson_id
                    )
                    await self._announce(ours)
                elif _precedes(ours, rival):
                    self.rivals.note(
                        rival.main,
                        "second-main",
                        f"{rival.main} announced lesson {rival.lesson_id} in group {self.group}, "
                        f"whose lesson {ours.lesson_id} this room runs: refused (check which "
                        "room the group's config makes its main room)",
                    )
                    await self._announce(ours)
                else:
                    log.error(
                        "%s runs lesson %s in group %s since before this room's: ending ours "
                        "(check which room the group's config makes its main room)",
                        rival.main,
                        rival.lesson_id,
                        self.group,
                    )
                    self._finished.add(ours.lesson_id)  # its announcement is not ours to clear
                    task = asyncio.create_task(self.end_lesson(), name=f"stream-yield-{self.group}")
                    self._side_tasks.add(task)
                    task.add_done_callback(self._side_tasks.discard)

    async def _rival_online(self, rival: Announcement) -> bool:
        """Whether the main room of a rival announcement is up (a crashed one's retained
        announcement must not block this group forever)."""
        presence = Presence(rival.main)
        task = asyncio.create_task(
            _watch_presence(self.link, presence, lambda: None), name="stream-rival-presence"
        )
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await presence.known.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return not presence.offline

    async def start_lesson(self, subject: str = "") -> Announcement:
        """Announce a new lesson (or return the live one). Raises the link's errors, and
        `LessonConflict` while another main room's lesson is live in the group."""
        try:
            async with asyncio.timeout(START_WAIT_S):
                await self._running.wait()  # a button pressed while the agent starts up
        except TimeoutError:
            raise RuntimeError(f"{self.name} is not running") from None
        try:
            async with asyncio.timeout(START_WAIT_S):
                await self.link.wait_connected()  # ...or while the broker is coming back
        except TimeoutError:
            raise LinkDown(
                "the broker is not reachable, so the rooms cannot be told: try again when "
                "the room's network is back (the dashboard shows the broker's state)"
            ) from None
        async with self._button:  # a double press must not announce two lessons
            return await self._start(subject)

    async def _start(self, subject: str) -> Announcement:
        if self._lesson is not None:
            return self._lesson
        rival = self._rival
        if rival is not None:
            if await self._rival_online(rival):
                raise LessonConflict(
                    f"group {self.group} already has a live lesson from {rival.main} "
                    f"(lesson {rival.lesson_id}); end it there first"
                )
            log.warning(
                "replacing lesson %s of %s, which is offline, in group %s",
                rival.lesson_id,
                rival.main,
                self.group,
            )
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
        now = time.time()
        self._rooms = {device: _Room("joining", now) for device in self.expected}
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
        self._presences = {device: Presence(device) for device in self.expected}
        watchers = [
            asyncio.create_task(
                _watch_presence(self.link, presence, partial(self._on_presence, presence)),
                name=f"stream-presence-{presence.device}",
            )
            for presence in self._presences.values()
        ]
        try:
            while True:
                self._on_signal(lesson, await inbox.get())
        finally:
            inbox.close()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self._finish(lesson)
            tasks = [*self._peer_tasks.values(), *self._side_tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._peer_tasks.clear()
            self._lesson = None
            self._serving = None
            self._joined = []
            self._rooms = {}
            log.info("lesson %s of group %s ended", lesson.lesson_id, self.group)

    def _on_signal(self, lesson: Announcement, signal: Signal) -> None:
        room = self._rooms.get(signal.sender)
        if room is None:  # the inbox admits expected rooms only
            return
        if signal.type is SignalType.OFFER:
            if signal.attempt is not None and signal.attempt == room.attempt:
                log.debug("duplicate offer %s from %s ignored", signal.attempt, signal.sender)
                return
            self._replace_peer(signal.sender)
            if room.state in ("reconnecting", "gone", "live"):
                room.move("reconnecting" if room.ever_live else "joining")
                room.dropped_at = None
            room.attempt = signal.attempt
            self._peer_tasks[signal.sender] = asyncio.create_task(
                self._host_peer(lesson, signal), name=f"stream-peer-{signal.sender}"
            )
        elif signal.type is SignalType.BYE:
            if signal.attempt is not None and signal.attempt != room.attempt:
                self.stale_byes += 1
                log.info(
                    "bye of an earlier attempt (%s) from %s ignored", signal.attempt, signal.sender
                )
                return
            log.info("%s left lesson %s", signal.sender, lesson.lesson_id)
            self._replace_peer(signal.sender)
        elif signal.type is SignalType.HAND:
            up = bool(signal.up)
            if up != room.hand_up:
                room.hand_up = up
                log.info("%s %s its hand", signal.sender, "raised" if up else "lowered")
        else:
            log.warning("unexpected %s from %s ignored", signal.type, signal.sender)

    def _on_presence(self, presence: Presence) -> None:
        room = self._rooms.get(presence.device)
        if room is None or presence.online is not False:
            return
        if room.state != "gone":
            log.info("%s went offline (%s): gone", presence.device, presence.reason or "no reason")
        self._gone(presence.device, room)
        session = self._sessions.get(presence.device)
        if session is not None:
            session.end("the room went offline")

    def _replace_peer(self, room: str) -> None:
        """End the room's current session; its task winds down in the background (it
        stays owned: the lesson's end cancels and awaits whatever is left)."""
        task = self._peer_tasks.pop(room, None)
        if task is not None:
            task.cancel()
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

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
        rooms = {
            device: self._rooms[device].attempt
            for device in self._sessions
            if device in self._rooms
        }

        async def bye(room: str, attempt: str | None) -> None:
            with contextlib.suppress(LinkError, TimeoutError):
                async with asyncio.timeout(BYE_TIMEOUT_S):
                    await self.signalling.send(
                        room, lesson.lesson_id, SignalType.BYE, attempt=attempt
                    )

        await asyncio.gather(*(bye(room, attempt) for room, attempt in rooms.items()))

    async def _announce(self, lesson: Announcement) -> None:
        if self._lesson is not lesson or lesson.lesson_id in self._finished:
            return
        update = replace(lesson, joined=tuple(self._joined))
        with contextlib.suppress(LinkError):
            await self.link.publish(self.topic, update.to_dict(), qos=1, retain=True)

    async def _host_peer(self, lesson: Announcement, offer: Signal) -> None:
        room = offer.sender
        track = self._rooms[room]
        session = PeerSession(room, lesson.lesson_id, self.ice, self.sink, controls=self.controls)
        self._sessions[room] = session
        try:
            answer = await session.make_answer(offer.sdp or "", self.encoder, self.audio)
            await self.signalling.send(
                room, lesson.lesson_id, SignalType.ANSWER, answer, attempt=offer.attempt
            )
            if not await session.wait_connected(self.connect_timeout_s):
                log.warning(
                    "%s did not connect to lesson %s: %s",
                    room,
                    lesson.lesson_id,
                    session.end_reason or "timed out",
                )
                return
            log.info("%s joined lesson %s", room, lesson.lesson_id)
            track.move("live")
            track.ever_live = True
            track.dropped_at = None
            if room not in self._joined:
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
            current = self._sessions.get(room) is session
            if current:
                del self._sessions[room]
                if track.state == "live":
                    track.move("reconnecting")
                    track.dropped_at = time.monotonic()
            left = current and room in self._joined
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
            "rooms": {
                room: {"state": s.state, "since": round(s.since, 3), "hand_up": s.hand_up}
                for room, s in self.room_states().items()
            },
        }


# -- a receiving room ---------------------------------------------------------------------


class JoinState(StrEnum):
    WAITING = "waiting"  # no lesson for this room is announced, or its main room is offline
    JOINING = "joining"  # first attempt at the announced lesson
    LIVE = "live"
    RECONNECTING = "reconnecting"  # lost it while it is still announced; retrying


MAIN_OFFLINE = "main room offline"
StateListener = Callable[[JoinState, Announcement | None], None]


class LessonJoiner:
    """A receiving room: joins its groups' lessons by itself (a supervisor service).

    :attr:`state` and :attr:`reason` are what the room's screen shows. While the chosen
    lesson's main room is offline (its Last Will on its state topic), the room stays
    ``waiting`` with reason ``"main room offline"`` and offers nothing; it joins again
    as soon as that room is back online and still announces the lesson.
    """

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
        main_state_wait_s: float = MAIN_STATE_WAIT_S,
        rng: random.Random | None = None,
        controls: MediaControls | None = None,
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
        self.main_state_wait_s = main_state_wait_s
        self.controls = controls
        self._rng = rng or random.Random()
        self._announced: dict[str, Announcement] = {}
        self._chosen: Announcement | None = None
        self._choice_changed = asyncio.Event()
        self._state = JoinState.WAITING
        self.reason = ""
        self._session: PeerSession | None = None
        self._attempt: str | None = None
        self._answer_wait: asyncio.Future[str] | None = None
        self._main: Presence | None = None
        self._listeners: list[StateListener] = []
        self.hand_up = False
        self.sessions_started = 0
        self.stale_signals = 0  # answers and byes of earlier attempts, ignored
        self.invalid_announcements = RejectionLog(log, "invalid lesson announcement")
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

    @property
    def main_online(self) -> bool | None:
        """The chosen lesson's main room: online, offline, or None (not known)."""
        return None if self._main is None else self._main.online

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: JoinState, reason: str = "") -> None:
        if state is self._state and reason == self.reason:
            return
        self._state = state
        self.reason = reason
        self.since = time.time()
        lesson = self._chosen
        log.info(
            "lesson: %s%s%s",
            state,
            f" ({reason})" if reason else "",
            "" if lesson is None else f" (lesson {lesson.lesson_id} from {lesson.main})",
            extra={
                "fields": {
                    "state": str(state),
                    "reason": reason,
                    "lesson": lesson and lesson.lesson_id,
                }
            },
        )
        for listener in list(self._listeners):
            try:
                listener(state, lesson)
            except Exception:
                log.exception("lesson state listener failed")

    # -- hands ----------------------------------------------------------------------------

    async def set_hand(self, up: bool) -> None:
        """Raise or lower this room's hand in the live lesson (raises RuntimeError
        without one, and the link's errors when it cannot be sent)."""
        lesson = self._chosen
        if lesson is None:
            raise RuntimeError("no lesson is live for this room")
        await self.signalling.send(lesson.main, lesson.lesson_id, SignalType.HAND, up=up)
        if self._still(lesson):
            self.hand_up = up
            log.info("hand %s", "raised" if up else "lowered")

    # -- announcements ------------------------------------------------------------------

    async def _watch(self, group: str) -> None:
        async with self.link.subscribe(self.link.topics.lesson(group), qos=1) as messages:
            async for message in messages:
                try:
                    lesson = Announcement.parse(group, message.payload)
                except AnnouncementInvalid as exc:
                    self.invalid_announcements.note(f"group {group}", "invalid", str(exc))
                    continue
                if lesson is not None and self.me not in lesson.expected:
                    log.info(
                        "lesson %s of group %s does not expect this room", lesson.lesson_id, group
                    )
                    lesson = None
                if lesson is not None and (lesson.main == self.me or lesson.state != "live"):
                    lesson = None
                current = self._announced.get(group)
                if (
                    lesson is not None
                    and current is not None
                    and lesson.main != current.main
                    and _precedes(current, lesson)
                    and not (
                        self._main is not None
                        and self._main.device == current.main
                        and self._main.offline
                    )
                ):
                    # A second main room in the group (misconfigured): the lesson that
                    # started first stands; its main room restores the announcement.
                    self.invalid_announcements.note(
                        lesson.main,
                        "second-main",
                        f"ignored lesson {lesson.lesson_id} of {lesson.main} in group {group}: "
                        f"lesson {current.lesson_id} of {current.main} started first",
                    )
                    continue
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
            if self.hand_up:
                self.hand_up = False
                log.info("hand lowered: the lesson ended")
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
                tasks.create_task(self._summarise(), name="stream-watch-summaries")
        finally:
            self._set_state(JoinState.WAITING)

    async def _summarise(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.invalid_announcements.window_s / 6))
            self.invalid_announcements.flush()

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
        """Join ``lesson`` and stay in it while it is announced: one inbox for the whole
        lesson (answers of every attempt, byes, the teacher lowering a hand) and a watch
        on the main room's state."""
        presence = Presence(lesson.main)
        self._main = presence
        with self.signalling.open(lesson.lesson_id, {lesson.main}) as inbox:
            helpers = [
                asyncio.create_task(self._dispatch(inbox), name="stream-join-inbox"),
                asyncio.create_task(
                    _watch_presence(self.link, presence, partial(self._on_main, presence)),
                    name=f"stream-presence-{lesson.main}",
                ),
            ]
            try:
                await self._attend_loop(lesson, presence)
            finally:
                for helper in helpers:
                    helper.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                if self._main is presence:
                    self._main = None

    def _on_main(self, presence: Presence) -> None:
        if presence.online is False:
            session = self._session
            if session is not None:
                session.end(MAIN_OFFLINE)

    async def _attend_loop(self, lesson: Announcement, presence: Presence) -> None:
        # A crashed main room's announcement outlives it: its retained state (the Last
        # Will) says so, and it usually arrives within milliseconds. Wait that long
        # rather than offer to a room that is not there.
        if self.main_state_wait_s > 0:
            await _first(
                presence.known.wait(), self._choice_changed.wait(), timeout=self.main_state_wait_s
            )
        attempt = 0
        ever_tried = False
        reason = ""
        while self._still(lesson):
            lesson = self._chosen or lesson
            # Both are stale news here: the lesson is still ours (no await since the
            # check), and the main room's state is read just below.
            self._choice_changed.clear()
            presence.changed.clear()
            if presence.offline:
                self._set_state(JoinState.WAITING, MAIN_OFFLINE)
                await _first(self._choice_changed.wait(), presence.changed.wait())
                attempt = 0
                reason = ""
                continue
            if not self.link.is_connected:
                self._set_state(
                    JoinState.RECONNECTING if ever_tried else JoinState.JOINING,
                    "no connection to the broker",
                )
                await _first(self.link.wait_connected(), self._choice_changed.wait())
                attempt = 0
                continue
            self._set_state(JoinState.RECONNECTING if ever_tried else JoinState.JOINING, reason)
            ever_tried = True
            reason, was_live = await self._one_session(lesson)
            if not self._still(lesson):
                return
            if presence.offline:
                continue
            if was_live:
                attempt = 0
            delay = backoff_delay(attempt, self.retry_min_s, self.retry_max_s, self._rng)
            attempt += 1
            log.warning("lesson %s: %s; reconnecting in %.1f s", lesson.lesson_id, reason, delay)
            self._set_state(JoinState.RECONNECTING, reason)
            if not self.link.is_connected:
                continue  # the top of the loop waits for the link, not for the delay
            # A main room that comes back (or a link that returns) ends the wait early.
            await _first(self._choice_changed.wait(), presence.changed.wait(), timeout=delay)

    async def _dispatch(self, inbox: LessonInbox) -> None:
        """Routes the lesson's signals to the current attempt; earlier ones are ignored."""
        while True:
            signal = await inbox.get()
            current = signal.attempt is None or signal.attempt == self._attempt
            if signal.type is SignalType.ANSWER:
                waiter = self._answer_wait
                if current and waiter is not None and not waiter.done():
                    waiter.set_result(signal.sdp or "")
                else:
                    self.stale_signals += 1
                    log.info(
                        "ignored an answer for attempt %s (this attempt: %s)",
                        signal.attempt,
                        self._attempt,
                    )
            elif signal.type is SignalType.BYE:
                session = self._session
                if current and session is not None:
                    session.end("bye from the main room")
                elif not current:
                    self.stale_signals += 1
                    log.info("ignored a bye for attempt %s", signal.attempt)
            elif signal.type is SignalType.HAND:
                if signal.up is False and self.hand_up:
                    self.hand_up = False
                    log.info("the teacher lowered this room's hand")
            else:
                log.debug("ignored %s from %s", signal.type, signal.sender)

    async def _one_session(self, lesson: Announcement) -> tuple[str, bool]:
        """One offer/answer/connection with the main room; returns (why it ended, was it
        live)."""
        main = lesson.main
        attempt = new_attempt_id()
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        session = PeerSession(main, lesson.lesson_id, self.ice, self.sink, controls=self.controls)
        self._session = session
        self._attempt = attempt
        self._answer_wait = answer
        self.sessions_started += 1
        was_live = False
        say_bye = True
        try:
            async with asyncio.timeout(self.answer_timeout_s):
                await self.signalling.wait_ready()
            offer = await session.make_offer(self.encoder, self.audio)
            await self.signalling.send(
                main, lesson.lesson_id, SignalType.OFFER, offer, attempt=attempt
            )
            async with asyncio.timeout(self.answer_timeout_s):
                await _first(asyncio.shield(answer), session.ended.wait())
            if not answer.done() or answer.cancelled():
                say_bye = session.end_reason not in ("bye from the main room", MAIN_OFFLINE)
                return session.end_reason or "no answer", False
            await session.accept_answer(answer.result())
            if not await session.wait_connected(self.connect_timeout_s):
                session.end(session.end_reason or "connection timed out")
                return session.end_reason, False
            was_live = True
            self._set_state(JoinState.LIVE)
            if self.hand_up:  # a main room that restarted, or missed it: say it again
                with contextlib.suppress(LinkError, TimeoutError):
                    async with asyncio.timeout(BYE_TIMEOUT_S):
                        await self.signalling.send(main, lesson.lesson_id, SignalType.HAND, up=True)
            await self._watch_media(session)
            say_bye = session.end_reason not in (
                "bye from the main room",
                "lesson ended",
                MAIN_OFFLINE,
            )
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
            self._answer_wait = None
            answer.cancel()
            if say_bye and self._still(lesson) and self.link.is_connected:
                with contextlib.suppress(LinkError, TimeoutError):
                    async with asyncio.timeout(BYE_TIMEOUT_S):
                        await self.signalling.send(
                            main, lesson.lesson_id, SignalType.BYE, attempt=attempt
                        )
            self._session = None
            await session.close()

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
            "reason": self.reason,
            "main_online": self.main_online,
            "hand_up": self.hand_up,
            "sessions_started": self.sessions_started,
            "peers": {} if session is None else {session.remote: session.describe()},
        }
