"""Live lessons end to end: real aiortc peers on 127.0.0.1 through a real Mosquitto.

Each room is what the daemon would run: its own MqttLink, synthetic camera and
microphone hubs (320x240@15) and a `StreamService`, all in this process. Receiving rooms
and the main room decode each other's pictures with a `ProbeSink`, which reads the
frame number and capture time stamped into every synthetic frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config.models import (
    AudioConfig,
    CaptureConfig,
    GroupMembership,
    IdentityConfig,
    LessonRole,
    StreamConfig,
    VideoConfig,
)
from agent.stream import EncoderSettings, JoinState, ProbeSink, StreamService
from agent.sync import MqttLink
from tests.brokers import BrokerUnderTest, eventually, observing, running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GROUP = "music"
MAIN = "school1.room1"
ROOM2 = "school1.room2"
ROOM3 = "school2.room3"
OUTSIDER = "school9.room9"
SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)


@dataclass
class Room:
    device: str
    link: MqttLink
    video: FrameHub
    audio: AudioHub
    service: StreamService
    probe: ProbeSink
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def host(self) -> Any:
        return self.service.hosts[GROUP]

    @property
    def joiner(self) -> Any:
        assert self.service.joiner is not None
        return self.service.joiner


def identity(device: str, role: LessonRole) -> IdentityConfig:
    site, room = device.split(".")
    receivers = [ROOM2, ROOM3] if role is LessonRole.MAIN else []
    membership = GroupMembership(group=GROUP, role=role, receivers=receivers)
    return IdentityConfig(site=site, room=room, groups=[membership])


@contextlib.asynccontextmanager
async def room(
    broker: BrokerUnderTest,
    device: str,
    *,
    main: bool = False,
    keyframe_interval_s: float = 2.0,
    hubs: tuple[FrameHub, AudioHub] | None = None,
) -> AsyncIterator[Room]:
    """One classroom's agent (link + hubs + stream service), stopped on exit."""
    role = LessonRole.MAIN if main else LessonRole.RECEIVING
    link = MqttLink(
        broker.broker_config(None),
        identity(device, role),
        software_version="0.0.0-test",
        profile_name="virtual",
    )
    own_hubs = hubs is None
    video, audio = hubs or (
        FrameHub(open_video_source(SMALL.video), SMALL),
        AudioHub(open_audio_source(SMALL.audio), SMALL),
    )
    probe = ProbeSink()
    service = StreamService(
        link,
        video,
        audio,
        StreamConfig(video_bitrate_kbps=400),
        host_addresses=["127.0.0.1"],
        sink=probe,
        encoder_settings=EncoderSettings(bitrate_kbps=400, keyframe_interval_s=keyframe_interval_s),
    )
    r = Room(device, link, video, audio, service, probe)
    async with running(link):
        if own_hubs:
            r.tasks += [asyncio.create_task(video.run()), asyncio.create_task(audio.run())]
        r.tasks.append(asyncio.create_task(service.run(), name=f"test-stream-{device}"))
        try:
            yield r
        finally:
            service_task = r.tasks.pop()
            service_task.cancel()
            await asyncio.gather(service_task, return_exceptions=True)
            for task in r.tasks:
                task.cancel()
            await asyncio.gather(*r.tasks, return_exceptions=True)


async def until_live(*rooms: Room, within: float = 30.0) -> None:
    await eventually(
        lambda: all(r.joiner.state is JoinState.LIVE for r in rooms),
        within=within,
        what=f"{', '.join(r.device for r in rooms)} live",
    )


async def frames_advance(sink: ProbeSink, source: str, by: int = 10, within: float = 30.0) -> None:
    stats = sink.stats(source)
    start = stats.last_stamp or 0
    await eventually(
        lambda: stats.last_stamp is not None and stats.last_stamp - start >= by,
        within=within,
        what=f"{by} more stamped frames from {source}",
    )


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
