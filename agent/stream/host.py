"""The main room's side of live dual-teacher lessons (see ``joiner.py`` for the other).

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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from agent.capture import AudioHub
from agent.logs import RejectionLog
from agent.stream.announcement import (
    BYE_TIMEOUT_S,
    Announcement,
    AnnouncementInvalid,
    LessonConflict,
    new_lesson_id,
    precedes,
)
from agent.stream.controls import MediaControls
from agent.stream.encoder import SharedH264Encoder
from agent.stream.peer import IceSettings, PeerSession, describe_error
from agent.stream.presence import Presence, watch_presence
from agent.stream.signalling import (
    LessonInbox,
    Signal,
    Signalling,
    SignalType,
    is_device_id,
)
from agent.stream.sinks import MediaSink
from agent.stream.voice import LinkTuning
from agent.sync import LinkDown, LinkError, MqttLink

log = logging.getLogger(__name__)

CLEAR_TIMEOUT_S = 5.0
START_WAIT_S = 5.0
GONE_AFTER_S = 20.0  # a room dropped this long ago is "gone", not "reconnecting"

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
        tuning: LinkTuning | None = None,
    ) -> None:
        self.tuning = tuning or LinkTuning()
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
        self.junk = RejectionLog(log, "invalid lesson announcement")

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
        its lesson started first (:func:`precedes`), in which case ours yields; an
        announcement cleared by someone else is restored, and so is anything else that is
        not our own valid one (junk, or a forgery in our name): retained, it is what a
        room that boots meanwhile would read, so it must not stand."""
        async with self.link.subscribe(self.topic, qos=1) as messages:
            async for message in messages:
                ours = self._lesson
                if ours is not None and ours.lesson_id in self._finished:
                    ours = None
                try:
                    seen = Announcement.parse(self.group, message.payload)
                except AnnouncementInvalid as exc:
                    if ours is not None:
                        self.junk.note(
                            f"group {self.group}",
                            "invalid",
                            f"{exc}: restoring the announcement of lesson {ours.lesson_id}",
                        )
                        await self._announce(ours)
                    continue
                if seen is not None and seen.main == self.me:
                    if ours is None or (seen.lesson_id == ours.lesson_id and seen.state == "live"):
                        continue  # our own announcement coming back
                    self.junk.note(
                        f"group {self.group}",
                        "not-ours",
                        f"lesson {seen.lesson_id} ({seen.state}) announced in this room's "
                        f"name: restoring the announcement of lesson {ours.lesson_id}",
                    )
                    await self._announce(ours)
                    continue
                self._rival = seen if seen is not None and seen.state == "live" else None
                if ours is None or ours.lesson_id in self._finished:
                    continue
                rival = self._rival
                if rival is None:
                    log.warning(
                        "the announcement of lesson %s was cleared: restoring it", ours.lesson_id
                    )
                    await self._announce(ours)
                elif precedes(ours, rival):
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
            watch_presence(self.link, presence, lambda: None), name="stream-rival-presence"
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
                watch_presence(self.link, presence, partial(self._on_presence, presence)),
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
        session = PeerSession(
            room, lesson.lesson_id, self.ice, self.sink, controls=self.controls, tuning=self.tuning
        )
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
                "offer from %s for lesson %s failed: %s",
                room,
                lesson.lesson_id,
                describe_error(exc),
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
