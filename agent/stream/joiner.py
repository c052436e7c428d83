"""A receiving room's side of live lessons: it joins by itself and rejoins.

See ``host.py`` for the lifecycle of a lesson as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from functools import partial
from typing import Any

from agent.aio import first_done, wait_first
from agent.backoff import backoff_delay
from agent.capture import AudioHub
from agent.logs import RejectionLog
from agent.stream.announcement import (
    BYE_TIMEOUT_S,
    Announcement,
    AnnouncementInvalid,
    precedes,
)
from agent.stream.controls import MediaControls
from agent.stream.encoder import SharedH264Encoder
from agent.stream.peer import IceSettings, PeerSession, describe_error
from agent.stream.presence import Presence, watch_presence
from agent.stream.signalling import (
    LessonInbox,
    Signalling,
    SignalType,
    new_attempt_id,
)
from agent.stream.sinks import MediaSink
from agent.stream.voice import LinkTuning
from agent.sync import LinkError, MqttLink

log = logging.getLogger(__name__)

MAIN_STATE_WAIT_S = 1.0  # how long a joiner waits for the main room's retained state

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
        tuning: LinkTuning | None = None,
    ) -> None:
        self.tuning = tuning or LinkTuning()
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
                    and precedes(current, lesson)
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
                    watch_presence(self.link, presence, partial(self._on_main, presence)),
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
            await first_done(
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
                await first_done(self._choice_changed.wait(), presence.changed.wait())
                attempt = 0
                reason = ""
                continue
            if not self.link.is_connected:
                self._set_state(
                    JoinState.RECONNECTING if ever_tried else JoinState.JOINING,
                    "no connection to the broker",
                )
                await first_done(self.link.wait_connected(), self._choice_changed.wait())
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
            await first_done(self._choice_changed.wait(), presence.changed.wait(), timeout=delay)

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
        session = PeerSession(
            main, lesson.lesson_id, self.ice, self.sink, controls=self.controls, tuning=self.tuning
        )
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
                await first_done(asyncio.shield(answer), session.ended.wait())
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
            return f"session failed: {describe_error(exc)}", was_live
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
