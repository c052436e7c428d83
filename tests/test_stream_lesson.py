"""Live lessons end to end: real aiortc peers on 127.0.0.1 through a real Mosquitto.

Each room is what the daemon would run: its own MqttLink, synthetic camera and
microphone hubs (320x240@15) and a `StreamService`, all in this process. Receiving rooms
and the main room decode each other's pictures with a `ProbeSink`, which reads the
frame number and capture time stamped into every synthetic frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path

import jsonschema
import pytest

from agent.stream import (
    IceSettings,
    JoinState,
    PeerSession,
)
from agent.stream.announcement import Announcement, LessonConflict
from agent.stream.joiner import MAIN_OFFLINE
from tests.brokers import BrokerUnderTest, eventually, observing
from tests.rooms import (
    GROUP,
    MAIN,
    OUTSIDER,
    ROOM2,
    ROOM3,
    frames_advance,
    room,
    until_live,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


async def test_lesson_two_rooms_both_ways_encode_once_then_end(
    mosquitto: BrokerUnderTest,
) -> None:
    lesson_topic = f"{mosquitto.prefix}/lesson/{GROUP}"
    async with (
        observing(mosquitto, lesson_topic) as observer,
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
        room(mosquitto, ROOM3) as room3,
    ):
        assert room2.joiner.state is JoinState.WAITING
        started = time.monotonic()
        lesson = await main.host.start_lesson("Music, grade 5")
        await until_live(room2, room3)
        live_after_s = time.monotonic() - started

        # Receiving rooms decode the main room's picture, frame numbers advancing...
        for r in (room2, room3):
            await frames_advance(r.probe, MAIN, by=15)
            assert r.probe.stats(MAIN).backwards == 0
            assert r.probe.stats(MAIN).audio_frames > 0
        # ...and the main room receives both rooms back (two-way).
        for device in (ROOM2, ROOM3):
            await frames_advance(main.probe, device, by=10)
        await eventually(lambda: set(main.host.joined) == {ROOM2, ROOM3}, what="both joined")
        joined = await observer.wait_for(
            lesson_topic, lambda m: bool(m.payload) and len(json.loads(m.payload)["joined"]) == 2
        )
        assert json.loads(joined.payload)["lesson_id"] == lesson.lesson_id

        # The health topic's stream section, as the contract's JSON Schema has it.
        schema = json.loads((ROOT / "schemas" / "health.v1.json").read_text())
        sections = {r.device: r.service.stats() for r in (main, room2)}
        for section in sections.values():
            jsonschema.validate(section, schema["properties"]["stream"])
        assert sections[MAIN]["role"] == "main"
        assert set(sections[MAIN]["peers"]) == {ROOM2, ROOM3}
        assert isinstance(sections[MAIN]["peers"][ROOM2]["frames_dropped"], int)
        assert sections[MAIN]["peers"][ROOM2]["layer"] in ("high", "low")
        assert sections[ROOM2]["role"] == "receiving"
        assert set(sections[ROOM2]["peers"]) == {MAIN}

        # Encode once: one encode per captured frame, not one per peer.
        encoder = main.service.encoder
        assert encoder is not None
        assert encoder.track_count == 2
        stats = encoder.stats()
        consumer = next(c for c in main.video.stats().consumers if c.name == encoder.name)
        assert stats.frames_encoded <= consumer.delivered
        assert stats.frames_encoded <= main.video.stats().frames_read
        delivered = [t.delivered for t in stats.tracks]
        assert all(d > stats.frames_encoded // 2 for d in delivered)
        assert sum(delivered) > stats.frames_encoded  # two peers fed from one encode

        latency = room2.probe.stats(MAIN)
        logging.getLogger(__name__).info(
            "live after %.2f s; first frame after %.2f s; glass-to-glass median %.0f ms "
            "p95 %.0f ms",
            live_after_s,
            latency.first_frame_s or -1,
            latency.latency_ms(0.5) or -1,
            latency.latency_ms(0.95) or -1,
        )
        assert live_after_s < 20

        await main.host.end_lesson()
        await eventually(
            lambda: (
                room2.joiner.state is JoinState.WAITING and room3.joiner.state is JoinState.WAITING
            ),
            within=15,
            what="rooms back to waiting",
        )
        await observer.wait_for(lesson_topic, lambda m: m.payload == b"")
        assert main.host.lesson is None
        assert not main.host.sessions()
        assert room2.joiner.session is None
        assert main.service.stats() is None
        await eventually(lambda: encoder.track_count == 0, what="the encoder idle")

    # The retained announcement is gone: a newcomer sees no lesson.
    async with observing(mosquitto, lesson_topic) as late:
        await asyncio.sleep(0.5)
        assert not [m for m in late.received(lesson_topic) if m.payload]


async def test_late_joiner_starts_at_a_forced_keyframe(mosquitto: BrokerUnderTest) -> None:
    # Natural keyframes every 60 s: the late room can only decode because joining
    # forced one in the shared encoder.
    async with (
        room(mosquitto, MAIN, main=True, keyframe_interval_s=60) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        await main.host.start_lesson()
        await until_live(room2)
        await frames_advance(room2.probe, MAIN, by=20)
        encoder = main.service.encoder
        assert encoder is not None
        forced = encoder.forced_keyframes
        async with room(mosquitto, ROOM3) as room3:
            await until_live(room3)
            await frames_advance(room3.probe, MAIN, by=10)
            assert encoder.forced_keyframes > forced
            assert encoder.stats().keyframes < 10
            # The room already watching was not disturbed.
            await frames_advance(room2.probe, MAIN, by=5)
            assert room2.probe.stats(MAIN).backwards == 0
        await main.host.end_lesson()


async def test_forged_signalling_is_rejected_and_the_lesson_goes_on(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.stream")
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
        observing(mosquitto) as forger,
    ):
        lesson = await main.host.start_lesson()
        await until_live(room2)
        await frames_advance(room2.probe, MAIN, by=5)
        session = main.host.sessions()[ROOM2]
        sdp = session.pc.remoteDescription.sdp
        prefix = mosquitto.prefix
        offer = {"v": 1, "lesson_id": lesson.lesson_id, "type": "offer", "sdp": sdp}
        # A room outside the group offers to the main room with the live lesson id.
        await forger.publish(f"{prefix}/rtc/{OUTSIDER}/{MAIN}", json.dumps(offer))
        # Garbage and an oversized SDP in the name of a real member.
        await forger.publish(f"{prefix}/rtc/{ROOM2}/{MAIN}", b"\x00{garbage")
        big = dict(offer, sdp=sdp + "a=x-pad:" + "x" * 70_000 + "\r\n")
        await forger.publish(f"{prefix}/rtc/{ROOM2}/{MAIN}", json.dumps(big))
        # A member of the group (not connected now) with an SDP aiortc cannot use.
        broken = dict(offer, sdp="v=0\r\nm=nonsense\r\n")
        await forger.publish(f"{prefix}/rtc/{ROOM3}/{MAIN}", json.dumps(broken))
        # A forged bye to the receiving room from someone who is not its main room.
        bye = {"v": 1, "lesson_id": lesson.lesson_id, "type": "bye"}
        await forger.publish(f"{prefix}/rtc/{OUTSIDER}/{ROOM2}", json.dumps(bye))

        await eventually(
            lambda: (
                main.service.signalling.rejected.total() >= 3
                and room2.service.signalling.rejected.total() >= 1
            ),
            what="the forgeries rejected",
        )
        assert main.service.signalling.rejected["foreign"] == 1
        assert main.service.signalling.rejected["json"] == 1
        assert main.service.signalling.rejected["oversized"] == 1
        assert room2.service.signalling.rejected["foreign"] == 1
        assert "is not an expected peer" in caplog.text
        await eventually(
            lambda: f"offer from {ROOM3} for lesson {lesson.lesson_id} failed" in caplog.text,
            what="the unusable offer refused",
        )
        # The lesson is unaffected: same session, still live, pictures still coming.
        await frames_advance(room2.probe, MAIN, by=10)
        assert main.host.sessions() == {ROOM2: session}
        assert room2.joiner.state is JoinState.LIVE
        assert room2.joiner.sessions_started == 1
        await main.host.end_lesson()


async def test_receiving_room_rejoins_by_itself(mosquitto: BrokerUnderTest) -> None:
    async with room(mosquitto, MAIN, main=True) as main:
        await main.host.start_lesson()
        async with room(mosquitto, ROOM2) as room2:
            await until_live(room2)
            await frames_advance(room2.probe, MAIN, by=5)
            hubs = (room2.video, room2.audio)
            # The peer connection dies under the room: it reconnects on its own.
            session = room2.joiner.session
            assert session is not None
            states: list[JoinState] = []
            room2.joiner.add_state_listener(lambda state, lesson: states.append(state))
            await session.pc.close()
            await eventually(lambda: JoinState.RECONNECTING in states, what="the room reconnecting")
            await until_live(room2)
            assert room2.joiner.sessions_started == 2
            await frames_advance(room2.probe, MAIN, by=10)
            first_main_session = main.host.sessions()[ROOM2]
            # The whole agent goes away (link and all) and comes back: it rejoins, and
            # the main room replaces the old connection rather than keeping two.
            hub_tasks, room2.tasks[:2] = room2.tasks[:2], []
        try:
            async with room(mosquitto, ROOM2, hubs=hubs) as again:
                await until_live(again)
                await frames_advance(again.probe, MAIN, by=10)
                await eventually(
                    lambda: (
                        list(main.host.sessions()) == [ROOM2]
                        and main.host.sessions()[ROOM2] is not first_main_session
                    ),
                    what="one fresh session for the room",
                )
                assert main.host.joined == (ROOM2,)
                await main.host.end_lesson()
                await eventually(lambda: again.joiner.state is JoinState.WAITING, what="waiting")
        finally:
            for task in hub_tasks:
                task.cancel()
            await asyncio.gather(*hub_tasks, return_exceptions=True)


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.15])
async def test_lesson_ended_while_a_room_is_joining_leaves_nothing_behind(
    mosquitto: BrokerUnderTest, delay_s: float
) -> None:
    """End the lesson at awkward moments (offer in flight, ICE checking): the room goes
    back to waiting and the task-leak guard finds nothing of aiortc's left running."""
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        for _ in range(2):
            await main.host.start_lesson()
            await eventually(
                lambda: room2.joiner.state is not JoinState.WAITING, what="the room joining"
            )
            await asyncio.sleep(delay_s)
            await main.host.end_lesson()
            await eventually(
                lambda: room2.joiner.state is JoinState.WAITING and room2.joiner.session is None,
                within=15,
                what="the room back to waiting",
            )
            assert not main.host.sessions()
        encoder = main.service.encoder
        assert encoder is not None
        await eventually(lambda: encoder.track_count == 0, what="no video track left")


async def test_room_whose_media_stops_reconnects(mosquitto: BrokerUnderTest) -> None:
    """A main room that vanishes without a bye (power cut, kill -9) stops sending; ICE
    would take 30 s to notice, the room's media watchdog takes media_timeout_s."""
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        room2.joiner.media_timeout_s = 1.5
        await main.host.start_lesson()
        await until_live(room2)
        await frames_advance(room2.probe, MAIN, by=5)
        for sender in main.host.sessions()[ROOM2].pc.getSenders():
            if sender.track is not None:
                sender.track.stop()  # the connection stays up; nothing is sent any more
        await eventually(
            lambda: room2.joiner.sessions_started >= 2, within=20, what="a fresh session"
        )
        await until_live(room2)
        await frames_advance(room2.probe, MAIN, by=10)
        await main.host.end_lesson()


# -- robustness: attempts, hands, room states, a crashed main room --------------------------

LOOPBACK = IceSettings(host_addresses=("127.0.0.1",))
log = logging.getLogger(__name__)


def announcement(lesson_id: str, expected: tuple[str, ...] = (ROOM2,)) -> str:
    return json.dumps(
        {
            "v": 1,
            "lesson_id": lesson_id,
            "group": GROUP,
            "subject": "",
            "main": MAIN,
            "expected": list(expected),
            "joined": [],
            "started_at": time.time(),
            "state": "live",
        }
    )


def device_state(status: str, seq: int, boot: str = "2026-11-02T08:00:00Z") -> str:
    site, name = MAIN.split(".")
    payload = {"status": status, "device": MAIN, "site": site, "room": name, "seq": seq}
    return json.dumps({**payload, "boot_time": boot, "version": "0", "profile": "virtual"})


async def test_a_stale_answer_or_bye_of_an_earlier_attempt_is_ignored(
    mosquitto: BrokerUnderTest,
) -> None:
    """The test plays the main room by hand, with a real aiortc answerer: an answer for
    another attempt would cost an ICE failure if the room took it."""
    prefix = mosquitto.prefix
    lesson_topic = f"{prefix}/lesson/{GROUP}"
    offers = f"{prefix}/rtc/{ROOM2}/{MAIN}"
    to_room = f"{prefix}/rtc/{MAIN}/{ROOM2}"
    state = f"{prefix}/school1/room1/state"
    answerers: list[PeerSession] = []
    async with observing(mosquitto, offers) as main:
        await main.publish(state, device_state("online", 1), retain=True)
        await main.publish(lesson_topic, announcement("attempts1"), retain=True)
        try:
            async with room(mosquitto, ROOM2) as room2:
                message = await main.wait_for(offers, lambda m: m.json()["type"] == "offer")
                offer = message.json()
                attempt = offer["attempt"]
                assert offer["lesson_id"] == "attempts1"
                assert room2.joiner.state is JoinState.JOINING
                for _ in range(2):
                    answerers.append(PeerSession(ROOM2, "attempts1", LOOPBACK, None))
                stale, good = [await a.make_answer(offer["sdp"], None, None) for a in answerers]

                def signal(kind: str, attempt: str, sdp: str | None = None) -> str:
                    body = {"v": 1, "lesson_id": "attempts1", "type": kind, "attempt": attempt}
                    return json.dumps(body if sdp is None else {**body, "sdp": sdp})

                await main.publish(to_room, signal("answer", "earlier1", stale))
                await eventually(lambda: room2.joiner.stale_signals == 1, what="stale ignored")
                await main.publish(to_room, signal("answer", attempt, good))
                await until_live(room2, within=20)
                assert answerers[1].connected.is_set()
                assert not answerers[0].connected.is_set()
                assert room2.joiner.sessions_started == 1

                await main.publish(to_room, signal("bye", "earlier1"))
                await eventually(lambda: room2.joiner.stale_signals == 2, what="stale bye")
                assert room2.joiner.state is JoinState.LIVE
                await main.publish(to_room, signal("bye", attempt))
                await eventually(
                    lambda: room2.joiner.state is not JoinState.LIVE, what="the bye obeyed"
                )
                await main.publish(lesson_topic, b"", retain=True)
                await eventually(lambda: room2.joiner.state is JoinState.WAITING, what="waiting")
        finally:
            for answerer in answerers:
                await answerer.close()
            await main.publish(state, b"", retain=True)


class LongestDelay(random.Random):
    """Backoff at its cap, so a dropped room stays away for a known time."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_room_states_hands_and_a_late_bye_for_the_teachers_panel(
    mosquitto: BrokerUnderTest,
) -> None:
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
        observing(mosquitto) as forger,
    ):
        host = main.host
        assert host.room_states() == {}
        lesson = await host.start_lesson("Hands")
        first = host.room_states()
        assert set(first) == {ROOM2, ROOM3}
        assert first[ROOM3].state in ("joining", "gone")  # room 3's agent never ran
        assert first[ROOM2].state == "joining"
        assert first[ROOM2].hand_up is False
        await until_live(room2)
        await eventually(lambda: host.room_states()[ROOM2].state == "live", what="live")
        status = host.room_states()[ROOM2]
        assert status.figures is not None
        assert status.figures["lesson"] == lesson.lesson_id
        assert status.since <= time.time()

        async with room(mosquitto, ROOM3) as room3:
            await until_live(room3)
            await eventually(lambda: host.room_states()[ROOM3].state == "live", what="room3")
            # Hands: raised by the room, seen by the teacher, lowered by the teacher.
            await room2.joiner.set_hand(True)
            assert room2.joiner.hand_up
            await eventually(lambda: host.room_states()[ROOM2].hand_up, what="hand up")
            assert not host.room_states()[ROOM3].hand_up
            host.lower_hand(ROOM2)
            assert not host.room_states()[ROOM2].hand_up
            await eventually(lambda: not room2.joiner.hand_up, what="the room told")
            await room2.joiner.set_hand(True)
            await room3.joiner.set_hand(True)
            await eventually(
                lambda: all(s.hand_up for s in host.room_states().values()), what="two hands"
            )

            # A late bye of an earlier attempt ends nothing.
            bye = {"v": 1, "lesson_id": lesson.lesson_id, "type": "bye", "attempt": "earlier1"}
            session = host.sessions()[ROOM2]
            await forger.publish(f"{mosquitto.prefix}/rtc/{ROOM2}/{MAIN}", json.dumps(bye))
            await eventually(lambda: host.stale_byes == 1, what="the late bye ignored")
            assert host.sessions()[ROOM2] is session

        # Room 3's agent stops: its state goes offline, the host shows it gone at once.
        await eventually(lambda: host.room_states()[ROOM3].state == "gone", what="room3 gone")
        assert not host.room_states()[ROOM3].hand_up

        # Room 2 drops and stays away for 2 s: reconnecting, then gone after gone_after_s
        # (hand lowered), then back.
        host.gone_after_s = 0.5
        room2.joiner.retry_min_s = room2.joiner.retry_max_s = 2.0
        room2.joiner._rng = LongestDelay()
        own = room2.joiner.session
        assert own is not None
        await own.pc.close()
        await eventually(
            lambda: host.room_states()[ROOM2].state == "reconnecting", what="reconnecting"
        )
        assert host.room_states()[ROOM2].hand_up  # a short drop keeps the hand
        await eventually(lambda: host.room_states()[ROOM2].state == "gone", what="gone")
        gone = host.room_states()[ROOM2]
        assert not gone.hand_up
        await eventually(lambda: host.room_states()[ROOM2].state == "live", within=30, what="back")
        assert host.room_states()[ROOM2].since >= gone.since
        # The room still has its hand up and says so again when it is back.
        assert room2.joiner.hand_up
        await eventually(lambda: host.room_states()[ROOM2].hand_up, what="hand again")

        await host.end_lesson()
        assert host.room_states() == {}
        await eventually(lambda: not room2.joiner.hand_up, what="hand lowered at the end")


async def test_crashed_main_room_stops_the_rooms_and_they_rejoin_the_next_lesson(
    mosquitto: BrokerUnderTest,
) -> None:
    states: list[tuple[JoinState, str]] = []
    async with room(mosquitto, ROOM2) as room2:
        room2.joiner.add_state_listener(lambda s, _: states.append((s, room2.joiner.reason)))
        async with room(mosquitto, MAIN, main=True) as main:
            await main.host.start_lesson()
            await until_live(room2)
            await frames_advance(room2.probe, MAIN, by=5)
            # The main room's agent dies: no DISCONNECT (the broker publishes its Last
            # Will), no cleared announcement, no bye.
            conn = main.link._conn
            assert conn is not None
            assert main.link_task is not None
            crashed = time.monotonic()
            conn.abort()
            main.link_task.cancel()
            for task in main.tasks:
                task.cancel()
            await eventually(
                lambda: room2.joiner.reason == MAIN_OFFLINE, within=10, what="main offline"
            )
            noticed_s = time.monotonic() - crashed
        assert room2.joiner.state is JoinState.WAITING
        assert room2.joiner.lesson is not None  # still announced (retained)...
        assert room2.joiner.session is None  # ...but nobody is called
        started = room2.joiner.sessions_started
        log.info("a crashed main room was noticed after %.3f s", noticed_s)
        assert noticed_s < 5

        # A new main room agent comes up: it clears the stale lesson, starts a new one.
        async with room(mosquitto, MAIN, main=True) as again:
            await eventually(
                lambda: (
                    room2.joiner.lesson is None
                    and room2.joiner.state is JoinState.WAITING
                    and room2.joiner.reason == ""
                ),
                what="the stale lesson cleared",
            )
            assert room2.joiner.sessions_started <= started + 1
            began = time.monotonic()
            await again.host.start_lesson()
            await until_live(room2)
            log.info("rejoined the new main room's lesson in %.2f s", time.monotonic() - began)
            await frames_advance(room2.probe, MAIN, by=5)
            await again.host.end_lesson()
    assert (JoinState.WAITING, MAIN_OFFLINE) in states


async def test_main_room_link_blip_rooms_wait_then_resume_the_same_lesson(
    mosquitto: BrokerUnderTest,
) -> None:
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        reasons: list[str] = []
        room2.joiner.add_state_listener(lambda s, _: reasons.append(room2.joiner.reason))
        lesson = await main.host.start_lesson()
        await until_live(room2)
        conn = main.link._conn
        assert conn is not None
        conn.abort()  # the Last Will fires; the link reconnects by itself at once
        await eventually(lambda: MAIN_OFFLINE in reasons, what="main offline seen")
        await until_live(room2)
        assert room2.joiner.lesson is not None
        assert room2.joiner.lesson.lesson_id == lesson.lesson_id
        assert room2.joiner.sessions_started == 2
        await frames_advance(room2.probe, MAIN, by=5)
        await main.host.end_lesson()


async def test_a_retained_lesson_of_an_offline_main_room_is_not_called(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.stream.joiner")
    prefix = mosquitto.prefix
    lesson_topic = f"{prefix}/lesson/{GROUP}"
    state = f"{prefix}/school1/room1/state"
    offers = f"{prefix}/rtc/{ROOM2}/{MAIN}"
    async with observing(mosquitto, offers) as other:
        # What a main room that died mid-lesson leaves behind.
        await other.publish(state, device_state("online", 3), retain=True)
        await other.publish(lesson_topic, announcement("crashed1"), retain=True)
        await other.publish(state, device_state("offline", 3), retain=True)
        try:
            async with room(mosquitto, ROOM2) as room2:
                await eventually(
                    lambda: room2.joiner.lesson is not None and room2.joiner.reason == MAIN_OFFLINE,
                    what="main offline shown",
                )
                assert room2.joiner.state is JoinState.WAITING
                # A flood of broken announcements: one warning, the rest counted.
                for _ in range(20):
                    await other.publish(lesson_topic, b"{broken")
                await eventually(
                    lambda: room2.joiner.invalid_announcements.suppressed >= 19, what="flood"
                )
                assert caplog.text.count("invalid lesson announcement") == 1
                # The broken ones changed nothing (the retained lesson is still known)...
                assert room2.joiner.reason == MAIN_OFFLINE
                # ...and all that while nobody was called.
                assert room2.joiner.sessions_started == 0
                assert not other.received(offers)
                # A stale Will (an older boot) after a newer birth changes nothing either.
                await other.publish(state, device_state("online", 1, "2026-11-02T09:00:00Z"))
                await eventually(lambda: room2.joiner.sessions_started == 1, what="an offer")
                await other.wait_for(offers, lambda m: m.json()["type"] == "offer")
                presence = room2.joiner._main
                assert presence is not None
                seen = presence.messages
                await other.publish(state, device_state("offline", 7))
                await eventually(lambda: presence.messages > seen, what="the stale Will read")
                assert room2.joiner.main_online is True
                await other.publish(lesson_topic, b"", retain=True)
                await eventually(
                    lambda: room2.joiner.state is JoinState.WAITING and room2.joiner.reason == "",
                    what="waiting for a lesson",
                )
        finally:
            await other.publish(state, b"", retain=True)
            await other.publish(lesson_topic, b"", retain=True)


async def test_a_second_main_room_is_refused_and_the_lesson_goes_on(
    mosquitto: BrokerUnderTest,
) -> None:
    """A group misconfigured with two main rooms: the lesson that started first stands."""
    lesson_topic = f"{mosquitto.prefix}/lesson/{GROUP}"
    rival_device = "school3.room7"
    async with (
        observing(mosquitto, lesson_topic) as observer,
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
        room(mosquitto, rival_device, main=True, receivers=(ROOM2,)) as rival,
    ):
        lesson = await main.host.start_lesson("Music")
        await until_live(room2)
        sessions = room2.joiner.sessions_started

        # The second main room's button is refused while the first one's lesson is live.
        await eventually(lambda: rival.host.rival is not None, what="the rival to see it")
        with pytest.raises(LessonConflict, match=MAIN):
            await rival.host.start_lesson("Maths")

        # One that announces anyway (it bypassed the check): the main room restores its
        # own announcement, and the receiving room never leaves its lesson.
        forged = Announcement(
            lesson_id="rival0lesson0001",
            group=GROUP,
            main=rival_device,
            expected=(ROOM2,),
            started_at=time.time(),
        )
        await observer.publish(lesson_topic, json.dumps(forged.to_dict()), retain=True)
        restored = await observer.wait_for(
            lesson_topic,
            lambda m: (
                bool(m.payload)
                and json.loads(m.payload)["lesson_id"] == lesson.lesson_id
                and len(observer.received(lesson_topic)) > 2
            ),
        )
        assert json.loads(restored.payload)["main"] == MAIN
        await frames_advance(room2.probe, MAIN, by=10)
        assert room2.joiner.state is JoinState.LIVE
        assert room2.joiner.sessions_started == sessions
        assert room2.joiner.lesson.lesson_id == lesson.lesson_id
        assert main.host.rivals.suppressed + main.host.rivals.logged >= 1
