"""Signalling and announcement validation: every bad message is refused with a reason.

No broker here: `Signalling.deliver` is fed the messages the link would hand it. The
end-to-end tests (test_stream_lesson.py) send the same forgeries through Mosquitto.
"""

from __future__ import annotations

import json
import logging

import pytest

from agent.config.models import BrokerConfig, IdentityConfig
from agent.stream import (
    MAX_MESSAGE_BYTES,
    Announcement,
    AnnouncementInvalid,
    Signalling,
    SignalRejected,
    SignalType,
    parse_signal,
)
from agent.stream.signalling import encode_signal
from agent.sync import Message, MqttLink

ME = "school1.room1"
ROOM = "school1.room2"
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def topic(sender: str = ROOM, to: str = ME, prefix: str = "edu") -> str:
    return f"{prefix}/rtc/{sender}/{to}"


def payload(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "lesson_id": "abc123", "type": "offer", "sdp": SDP}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def parse(topic_: str, data: bytes, retained: bool = False) -> object:
    return parse_signal(topic_, data, prefix="edu", me=ME, retained=retained)


def test_valid_offer_answer_and_bye_parse() -> None:
    offer = parse_signal(topic(), payload(), prefix="edu", me=ME)
    assert (offer.sender, offer.recipient, offer.type, offer.sdp) == (
        ROOM,
        ME,
        SignalType.OFFER,
        SDP,
    )
    answer = parse_signal(topic(), payload(type="answer"), prefix="edu", me=ME)
    assert answer.type is SignalType.ANSWER
    bye = parse_signal(topic(), payload(type="bye", sdp=...), prefix="edu", me=ME)
    assert bye.type is SignalType.BYE
    assert bye.sdp is None
    assert encode_signal("abc123", SignalType.BYE) == {"v": 1, "lesson_id": "abc123", "type": "bye"}


@pytest.mark.parametrize(
    ("topic_", "data", "code"),
    [
        (topic(), b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
        (topic(), payload(sdp=SDP + "a=x\r\n" * 20_000), "oversized"),
        (topic(), b"{not json", "json"),
        (topic(), b"\xff\xfe", "json"),
        (topic(), b"[1, 2]", "json"),
        (topic(), payload(extra=1), "fields"),
        (topic(), payload(v=2), "fields"),
        (topic(), payload(lesson_id="../../x"), "fields"),
        (topic(), payload(lesson_id=...), "fields"),
        (topic(), payload(type="hello"), "fields"),
        (topic(), payload(sdp=...), "fields"),
        (topic(), payload(sdp="not an sdp"), "fields"),
        (topic(), payload(type="bye"), "fields"),
        ("edu/rtc/school1.room2", payload(), "topic"),
        ("other/rtc/school1.room2/school1.room1", payload(), "topic"),
        (topic(sender="no-dot"), payload(), "topic"),
        (topic(to="school1.room9"), payload(), "topic"),
        (topic(sender=ME), payload(), "topic"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(topic_: str, data: bytes, code: str) -> None:
    with pytest.raises(SignalRejected) as info:
        parse(topic_, data)
    assert info.value.code == code
    assert str(info.value)


def test_retained_signalling_is_rejected() -> None:
    with pytest.raises(SignalRejected) as info:
        parse(topic(), payload(), retained=True)
    assert info.value.code == "retained"


def link() -> MqttLink:
    return MqttLink(
        BrokerConfig(url="mqtt://127.0.0.1:1", topic_prefix="edu"),
        IdentityConfig(site="school1", room="room1"),
        software_version="0",
        profile_name="test",
    )


def test_signalling_routes_only_open_lessons_from_expected_peers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signalling = Signalling(link())
    inbox = signalling.open("abc123", [ROOM])
    caplog.set_level(logging.WARNING, logger="agent.stream.signalling")

    accepted = signalling.deliver(Message(topic(), payload(), False, 1))
    assert accepted is not None
    assert accepted.sender == ROOM
    # A room outside the lesson's group, writing as itself (the ACL allows that).
    assert signalling.deliver(Message(topic(sender="school9.room9"), payload(), False, 1)) is None
    # A stale or guessed lesson id.
    assert signalling.deliver(Message(topic(), payload(lesson_id="zzz999"), False, 1)) is None
    assert signalling.deliver(Message(topic(), b"garbage", False, 1)) is None
    assert signalling.rejected == {"foreign": 1, "lesson": 1, "json": 1}
    assert signalling.accepted == 1
    assert caplog.text.count("rejected signalling message") == 3
    assert "school9.room9 is not an expected peer" in caplog.text

    inbox.close()
    assert signalling.deliver(Message(topic(), payload(), False, 1)) is None
    with pytest.raises(ValueError, match="not valid"):
        signalling.open("bad id!", [ROOM])


def announcement(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "lesson_id": "abc123",
        "group": "music",
        "subject": "Music",
        "main": ME,
        "expected": [ROOM],
        "joined": [],
        "started_at": 1.5,
        "state": "live",
    }
    base.update(fields)
    return json.dumps(base).encode()


def test_announcement_round_trip_and_clear() -> None:
    lesson = Announcement.parse("music", announcement())
    assert lesson is not None
    assert (lesson.main, lesson.expected, lesson.subject) == (ME, (ROOM,), "Music")
    assert Announcement.parse("music", json.dumps(lesson.to_dict()).encode()) == lesson
    assert Announcement.parse("music", b"") is None


@pytest.mark.parametrize(
    "data",
    [
        b"x" * 20_000,
        b"nope",
        announcement(v=2),
        announcement(group="art"),
        announcement(main="not a device"),
        announcement(expected="school1.room2"),
        announcement(expected=["bad"]),
        announcement(lesson_id=7),
        announcement(started_at="now"),
    ],
)
def test_invalid_announcements_are_refused(data: bytes) -> None:
    with pytest.raises(AnnouncementInvalid):
        Announcement.parse("music", data)
